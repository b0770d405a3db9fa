"""Byte sizes in the config: ``64MiB``, ``512KiB``, ``1GB``, ``4096B`` or a plain number of bytes.

Binary units (KiB, MiB, GiB) are powers of 1024; KB, MB, GB are powers of 1000,
as their names say.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]*)$")
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([KkMmGg]i?[Bb]|[Bb])?\s*$"
SIZE_HINT = "use a number with a unit, e.g. 512KiB, 64MiB, 1GiB (KB/MB/GB are 1000-based)"


def parse_size(value: str | int | float) -> int:
    """A size in bytes; a bare number is bytes. ValueError with an operator message otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}: {SIZE_HINT}")
    if isinstance(value, int):
        size = float(value)
    elif isinstance(value, float):
        size = value
    elif isinstance(value, str):
        match = _SIZE.match(value.strip().lower())
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(f"invalid size {value!r}: {SIZE_HINT}")
        size = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"invalid size {value!r}: {SIZE_HINT}")
    if size < 0 or size != size:
        raise ValueError(f"invalid size {value!r}: must be zero or positive")
    return int(size)


def _validate(value: Any) -> int:
    return parse_size(value)


# A config field holding bytes as an int, written in YAML as "64MiB" or a number.
ByteSize = Annotated[
    int,
    BeforeValidator(_validate),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": SIZE_PATTERN},
                {"type": "integer", "minimum": 0},
            ],
            "description": "size: 512KiB, 64MiB, 1GiB (KB/MB/GB: 1000-based) or bytes",
        }
    ),
]
