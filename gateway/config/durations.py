"""Durations in the config: ``500ms``, ``30s``, ``2m``, ``1h``, ``1d``, ``1m30s`` or a number of seconds."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
DURATION_PATTERN = r"^\s*(\d+(\.\d+)?(ms|s|m|h|d))+\s*$"
DURATION_HINT = "use a number with a unit, e.g. 500ms, 30s, 2m, 1h"


def parse_duration(value: str | int | float) -> float:
    """Return a duration in seconds; a bare number is taken as seconds.

    Raises ValueError with an operator-readable message on anything else,
    including negative values.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: {DURATION_HINT}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if _WHOLE.fullmatch(text):
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _PART.findall(text))
        else:
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(f"invalid duration {value!r}: {DURATION_HINT}") from None
    else:
        raise ValueError(f"invalid duration {value!r}: {DURATION_HINT}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must be zero or positive")
    return seconds


def _validate(value: Any) -> float:
    return parse_duration(value)


# A config field holding seconds as a float, written in YAML as "30s" or a number.
Duration = Annotated[
    float,
    BeforeValidator(_validate),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": DURATION_PATTERN},
                {"type": "number", "minimum": 0},
            ],
            "description": "duration: 500ms, 30s, 2m, 1h, 1d or a number of seconds",
        }
    ),
]
