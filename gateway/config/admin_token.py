"""The admin API's bearer token (``admin.token_file``), and when one is required.

``/api/*`` shows device ids, their addresses and the identities the gateway
holds keys for. An admin endpoint reachable from other hosts (``admin.listen``
not on loopback) must therefore name a token file; `/healthz`, `/readyz` and
`/metrics` stay open for probes and Prometheus. The file holds the token alone
(surrounding white space ignored) and must be private, as the secrets file:
no access for others, and none for the group unless the group is the
gateway's own and may only read (how Kubernetes mounts a Secret with
``fsGroup``).
"""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from gateway.config.base import Loc, resolve_file
from gateway.config.private_file import read_private_file

MIN_TOKEN_LENGTH = 16
MAX_TOKEN_FILE = 4096


def is_loopback(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1) or ``localhost``; a wildcard,
    another address or any other name is reachable from elsewhere."""
    host = host.strip("[]").split("%", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _group_may_read(info: os.stat_result) -> bool:
    """Group read-only access by the gateway's own group (a Kubernetes Secret with fsGroup)."""
    mode = stat.S_IMODE(info.st_mode)
    own_groups = {os.getegid(), *os.getgroups()}
    return mode & 0o070 == 0o040 and info.st_gid in own_groups


def read_token_file(path: Path) -> str:
    """The token in ``path``; ValueError (naming the file, never the token) otherwise."""
    data = read_private_file(path, label="", max_bytes=MAX_TOKEN_FILE,
                             group_may_read=_group_may_read)  # fmt: skip
    if len(data) > MAX_TOKEN_FILE:
        raise ValueError(f"{path} is larger than {MAX_TOKEN_FILE} bytes (it holds the token alone)")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the token must be printable ASCII") from None
    if len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(
            f"{path}: the token must be one word of at least {MIN_TOKEN_LENGTH} printable "
            "characters; make one with: head -c 32 /dev/urandom | base64"
        )
    return token


def admin_token(section: Any, base_dir: Path | None) -> tuple[SecretStr | None, list[tuple[Loc, str]]]:
    """Resolve and read ``section.token_file`` (an `AdminSection`); the token and the
    problems found, located at the section's keys."""
    if section.token_file is not None:
        path = resolve_file(section.token_file, base_dir)
        section.token_file = path
        try:
            return SecretStr(read_token_file(path)), []
        except ValueError as exc:
            return None, [(("token_file",), str(exc))]
    if section.enabled and not is_loopback(section.listen.host):
        return None, [
            (
                ("listen",),
                f"{section.listen} is reachable from other hosts, and /api/* shows device ids, "
                "addresses and credentials: set admin.token_file to a file holding a bearer "
                "token (mode 0600; make one with: head -c 32 /dev/urandom | base64), or "
                "listen on loopback (127.0.0.1)",
            )
        ]
    return None, []
