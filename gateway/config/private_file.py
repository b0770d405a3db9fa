"""Reading a file that must be private (the secrets file, the admin token file).

The mode is checked on the open file, so the file read is the file checked;
O_NONBLOCK keeps a FIFO in the file's place from hanging the loader. Errors are
ValueErrors naming the file, never its contents.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path


def read_private_file(
    path: Path,
    *,
    label: str,
    max_bytes: int,
    group_may_read: Callable[[os.stat_result], bool] | None = None,
) -> bytes:
    """Up to ``max_bytes + 1`` bytes of ``path`` (the caller judges the size).

    ``label`` prefixes the file in messages (``"secrets file "``, or ``""``). Others
    may have no access; the group none either, unless ``group_may_read`` allows it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ValueError(f"{label or 'file '}not found: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {label}{path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{label}{path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        group_ok = group_may_read is not None and group_may_read(info)
        if mode & 0o007 or (mode & 0o070 and not group_ok):
            raise ValueError(
                f"{label}{path} is accessible by group or others (mode {mode:04o}); "
                f"refusing to use it: chmod 600 {path}"
            )
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(max_bytes + 1)
    finally:
        os.close(fd)
