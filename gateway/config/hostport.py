"""``host:port`` addresses, with IPv6 literals in brackets: ``[::1]:5672``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

HOSTPORT_PATTERN = r"^(\[[0-9A-Za-z:.%]+\]|[^:\[\]\s]+):[0-9]{1,5}$"


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """Parse ``host:port``; an IPv6 literal must be written ``[addr]:port``."""
        text = text.strip()
        if text.startswith("["):
            end = text.find("]")
            if end < 0 or text[end + 1 : end + 2] != ":":
                raise ValueError(f"invalid address {text!r}: expected [ipv6]:port")
            host, port_text = text[1:end], text[end + 2 :]
            try:
                ipaddress.IPv6Address(host.split("%", 1)[0])
            except ValueError:
                raise ValueError(
                    f"invalid address {text!r}: {host!r} is not an IPv6 address"
                ) from None
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise ValueError(f"invalid address {text!r}: expected host:port")
            if ":" in host:
                raise ValueError(
                    f"invalid address {text!r}: write IPv6 addresses in brackets, e.g. [::1]:5672"
                )
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"invalid address {text!r}: port must be 0..65535")
        return cls(host, int(port_text))

    @property
    def is_wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::")

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _coerce,
            serialization=core_schema.plain_serializer_function_ser_schema(str, when_used="json"),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "type": "string",
            "pattern": HOSTPORT_PATTERN,
            "description": "host:port; IPv6 in brackets, e.g. [::1]:5672",
        }


def _coerce(value: Any) -> HostPort:
    if isinstance(value, HostPort):
        return value
    if isinstance(value, str):
        return HostPort.parse(value)
    if isinstance(value, tuple | list) and len(value) == 2:
        return HostPort.parse(str(HostPort(str(value[0]), int(value[1]))))
    raise ValueError(f"invalid address {value!r}: expected a string host:port")
