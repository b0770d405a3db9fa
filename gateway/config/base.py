"""Building blocks shared by every config section: the strict base model,
located errors, names and networks."""

from __future__ import annotations

import os
import re
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

Loc = tuple[str | int, ...]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def errors_at(title: str, problems: list[tuple[Loc, str]]) -> ValidationError:
    """A ValidationError whose entries sit at the given locations.

    Raised from a model validator, pydantic prefixes each location with the
    model's own path, so the loader can map it to a file line.
    """
    return ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(type=PydanticCustomError("config", message), loc=loc, input=None)
            for loc, message in problems
        ],
    )


class Section(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _check_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(
            f"invalid name {value!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


Name = Annotated[
    str,
    PlainValidator(lambda v: _check_name(_str(v))),
    WithJsonSchema({"type": "string", "pattern": NAME_RE.pattern}),
]


def _network(value: Any) -> IPv4Network | IPv6Network:
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    try:
        return ip_network(_str(value).strip())
    except ValueError as exc:
        raise ValueError(f"invalid network {value!r}: {exc}") from None


# A CIDR (or a single address, meaning /32 or /128).
Network = Annotated[
    IPv4Network | IPv6Network,
    PlainValidator(_network),
    PlainSerializer(str),
    WithJsonSchema({"type": "string", "description": "CIDR, e.g. 192.168.1.0/24, or an address"}),
]


def resolve_file(value: Path, base_dir: Path | None) -> Path:
    """``value`` made absolute (relative paths against the config file's directory)."""
    path = value.expanduser()
    if not path.is_absolute():
        path = Path(base_dir or ".") / path
    return Path(os.path.normpath(path.absolute()))


def readable_file(value: Path, base_dir: Path | None) -> Path:
    """The resolved path of an existing, readable regular file; ValueError otherwise."""
    path = resolve_file(value, base_dir)
    if not path.exists():
        raise ValueError(f"file not found: {path}")
    if not path.is_file():
        raise ValueError(f"not a file: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"file not readable: {path}")
    return path
