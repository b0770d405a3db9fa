"""Per-frame protocol trace, one readable line per AMQP frame or MQTT packet.

Modelled on proton's ``PN_TRACE_FRM=1`` output::

    [c12]:0 <- @attach(18) [name="sender-link", handle=0, role=false, ...]
    [c12]:0 -> @transfer(20) [handle=0, delivery-id=3, delivery-tag=b"\\x00\\x03", ...] <131 bytes>
    [m7] -> CONNECT [client-id="dev1", username="hub/dev1/?api-version=...", password=<redacted>]

Performatives are formatted generically from their dataclass fields, so the
tracer follows the codec without knowing every class. What must never be
printed is decided here, not by callers: message bodies (transfer payload,
PUBLISH payload) appear as their length only; SASL responses, MQTT passwords
and every other binary field except delivery tags appear as ``<N bytes>`` or
``<redacted>``; any text is scrubbed of SAS signatures and shared access keys.

A disabled tracer costs one attribute check per call.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["FrameTracer", "NULL_TRACER", "format_amqp", "format_mqtt", "redact_text"]

# -- text redaction ------------------------------------------------------------

_SIG = re.compile(r"(?i)\b(sig=)[^&\s\"',;]+")
_SHARED_KEY = re.compile(r"(?i)\b(SharedAccessKey=)[^;\s\"',]+")

_log_redact: Callable[[str], str] | None = None
_log_redact_resolved = False


def redact_text(text: str) -> str:
    """Mask SAS token signatures and shared access keys in free text."""
    global _log_redact, _log_redact_resolved
    if not text:
        return text
    if not _log_redact_resolved:
        try:
            from gateway.ops.logging import redact as log_redact
        except ImportError:
            log_redact = None
        _log_redact, _log_redact_resolved = log_redact, True
    if _log_redact is not None:
        text = _log_redact(text)
    if "sig=" in text or "SIG=" in text or "Sig=" in text:
        text = _SIG.sub(r"\1<redacted>", text)
    if "=" in text:
        text = _SHARED_KEY.sub(r"\1<redacted>", text)
    return text


# -- generic value formatting -------------------------------------------------------

# Descriptor codes of the AMQP 1.0 described types, by class name, for
# performative classes that do not carry their own code.
_AMQP_CODES: dict[str, int] = {
    "open": 0x10, "begin": 0x11, "attach": 0x12, "flow": 0x13, "transfer": 0x14,
    "disposition": 0x15, "detach": 0x16, "end": 0x17, "close": 0x18,
    "error": 0x1D, "received": 0x23, "accepted": 0x24, "rejected": 0x25,
    "released": 0x26, "modified": 0x27, "source": 0x28, "target": 0x29,
    "sasl-mechanisms": 0x40, "sasl-init": 0x41, "sasl-challenge": 0x42,
    "sasl-response": 0x43, "sasl-outcome": 0x44,
}  # fmt: skip

_CODE_ATTRS = ("DESCRIPTOR", "DESCRIPTOR_CODE", "descriptor_code", "CODE", "descriptor")

# Binary fields that are safe and useful to print; every other binary value
# (SASL responses, outcome data, bodies, anything unknown) is shown as a length.
_SAFE_BINARY = frozenset({"delivery_tag", "delivery-tag"})

# Field names whose values are secrets whatever their type.
_SECRET_NAMES = frozenset(
    {
        "password", "passwd", "secret", "token", "key", "sas_token", "signature",
        "initial_response", "response", "challenge", "additional_data",
        "auth_data", "authentication_data", "sasl_password",
    }
)  # fmt: skip

# Field names that carry message bodies: printed as a length.
_BODY_NAMES = frozenset(
    {"payload", "body", "data", "message", "will_message", "will_payload", "application_data"}
)

_MAX_BINARY = 32
_MAX_DEPTH = 8
_MAX_LINE = 4000


def _kebab(name: str) -> str:
    return name.strip("_").replace("_", "-")


def _class_kebab(name: str) -> str:
    # SaslInit -> sasl-init, Open -> open
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _descriptor_code(obj: Any, kebab_name: str) -> int | None:
    cls = type(obj)
    for attr in _CODE_ATTRS:
        value = getattr(cls, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    return _AMQP_CODES.get(kebab_name)


def _bytes_literal(data: bytes) -> str:
    shown = data[:_MAX_BINARY]
    body = "".join(
        chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\x{b:02x}" for b in shown
    )
    more = "..." if len(data) > _MAX_BINARY else ""
    return f'b"{body}"{more}'


def _length_of(value: Any) -> int | None:
    try:
        return len(value)
    except TypeError:
        return None


def _format_value(value: Any, depth: int = 0, field_name: str = "") -> str:
    if depth > _MAX_DEPTH:
        return "..."
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _format_value(value.value, depth, field_name)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, str):
        text = redact_text(str(value))
        if type(value).__name__ == "Symbol":
            return ":" + (text if re.fullmatch(r"[\w.:$/-]+", text) else json.dumps(text))
        return json.dumps(text, ensure_ascii=False)
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if field_name in _SAFE_BINARY:
            return _bytes_literal(data)
        return f"<{len(data)} bytes>"
    if isinstance(value, uuid.UUID):
        return f"UUID({value})"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _format_dataclass(value, depth + 1)
    if isinstance(value, Mapping):
        items = ", ".join(
            f"{_format_value(k, depth + 1)}={_format_value(v, depth + 1)}" for k, v in value.items()
        )
        return "{" + items + "}"
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(_format_value(v, depth + 1) for v in value) + "]"
    cls_name = type(value).__name__
    if cls_name == "Described":
        descriptor = getattr(value, "descriptor", None)
        inner = getattr(value, "value", None)
        return f"@{_format_value(descriptor, depth + 1)} {_format_value(inner, depth + 1)}"
    if cls_name == "Array":
        items = getattr(value, "items", None)
        if items is None:
            items = getattr(value, "values", ())
        try:
            return "@[" + ", ".join(_format_value(v, depth + 1) for v in items) + "]"
        except TypeError:
            pass
    return redact_text(f"<{cls_name}>")


def _field_pairs(obj: Any) -> Iterable[tuple[str, Any]]:
    for f in dataclasses.fields(obj):
        if f.name.startswith("_"):
            continue
        try:
            yield f.name, getattr(obj, f.name)
        except Exception:  # a lazily parsed field that fails must not break tracing
            yield f.name, "<unreadable>"


def _format_field(name: str, value: Any, depth: int) -> str | None:
    if value is None:
        return None
    key = _kebab(name)
    lowered = name.lower()
    if lowered in _SECRET_NAMES:
        return f"{key}=<redacted>"
    if lowered in _BODY_NAMES:
        n = _length_of(value)
        return f"{key}=<{n if n is not None else '?'} bytes>"
    return f"{key}={_format_value(value, depth, name)}"


def _format_dataclass(obj: Any, depth: int = 0) -> str:
    name = _class_kebab(type(obj).__name__)
    code = _descriptor_code(obj, name)
    head = f"@{name}({code})" if code is not None else f"@{name}"
    if name == "sasl-init":
        return head + " [" + ", ".join(_sasl_init_fields(obj, depth)) + "]"
    parts = [p for n, v in _field_pairs(obj) if (p := _format_field(n, v, depth)) is not None]
    return head + " [" + ", ".join(parts) + "]"


def _sasl_init_fields(obj: Any, depth: int) -> list[str]:
    parts: list[str] = []
    mechanism = getattr(obj, "mechanism", None)
    for name, value in _field_pairs(obj):
        if name == "initial_response" and value is not None:
            parts.append("initial-response=" + _sasl_initial_response(mechanism, value))
            continue
        part = _format_field(name, value, depth)
        if part is not None:
            parts.append(part)
    return parts


def _sasl_initial_response(mechanism: Any, value: Any) -> str:
    """PLAIN shows the user name only; every other mechanism shows a length."""
    try:
        data = bytes(value)
    except TypeError:
        return "<redacted>"
    if str(mechanism).upper() == "PLAIN":
        fields = data.split(b"\0")
        if len(fields) == 3:
            user = redact_text(fields[1].decode("utf-8", "replace"))
            return f"<PLAIN user={json.dumps(user)} password=<redacted>>"
    return f"<{len(data)} bytes>"


def _clip(line: str) -> str:
    return line if len(line) <= _MAX_LINE else line[: _MAX_LINE - 3] + "..."


# -- AMQP --------------------------------------------------------------------------

_AMQP_HEADERS = {0: "AMQP", 2: "TLS", 3: "SASL"}


def format_amqp(
    conn_id: Any, direction: str, channel: int | None, frame: Any, payload_len: int | None = None
) -> str:
    """One trace line for an AMQP frame, protocol header or empty (heartbeat) frame."""
    prefix = f"[{conn_id}]" if channel is None else f"[{conn_id}]:{channel}"
    # A frame object wrapping a performative and its payload.
    if frame is not None and hasattr(frame, "performative") and hasattr(frame, "payload"):
        payload = getattr(frame, "payload", None)
        if payload_len is None and payload is not None:
            payload_len = _length_of(payload)
        frame = frame.performative
    if frame is None:
        return f"{prefix} {direction} (empty frame)"
    if isinstance(frame, bytes | bytearray | memoryview):
        data = bytes(frame)
        if len(data) == 8 and data[:4] == b"AMQP":
            name = _AMQP_HEADERS.get(data[4], f"AMQP({data[4]})")
            return f"{prefix} {direction} {name} {data[5]}.{data[6]}.{data[7]}"
        return f"{prefix} {direction} <{len(data)} bytes>"
    if dataclasses.is_dataclass(frame):
        body = _format_dataclass(frame)
    else:
        body = _format_value(frame)
    line = f"{prefix} {direction} {body}"
    if payload_len:
        line += f" <{payload_len} bytes>"
    return _clip(line)


# -- MQTT ----------------------------------------------------------------------------

_MQTT_TYPES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
    7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH",
}  # fmt: skip

# Attributes worth showing per packet type, under the names a packet view is
# likely to use; the first present candidate wins. Secrets and bodies go
# through _format_field, which redacts them by name.
_MQTT_FIELDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "CONNECT": (
        ("protocol_name",), ("protocol_level", "protocol_version", "level"),
        ("client_id", "client_identifier"), ("username", "user_name"), ("password",),
        ("keep_alive", "keepalive"), ("clean_session", "clean_start"),
        ("will",), ("will_topic",), ("will_qos",), ("will_retain",),
        ("will_message", "will_payload"),
    ),
    "CONNACK": (("session_present",), ("return_code", "reason_code", "code")),
    "PUBLISH": (
        ("topic", "topic_name"), ("qos",), ("dup",), ("retain",),
        ("packet_id", "packet_identifier", "mid"), ("payload",),
    ),
    "SUBSCRIBE": (("packet_id", "packet_identifier"), ("topics", "topic_filters", "filters", "subscriptions")),
    "SUBACK": (("packet_id", "packet_identifier"), ("return_codes", "reason_codes", "codes")),
    "UNSUBSCRIBE": (("packet_id", "packet_identifier"), ("topics", "topic_filters", "filters")),
    "UNSUBACK": (("packet_id", "packet_identifier"),),
    "PUBACK": (("packet_id", "packet_identifier"), ("reason_code",)),
    "PUBREC": (("packet_id", "packet_identifier"), ("reason_code",)),
    "PUBREL": (("packet_id", "packet_identifier"), ("reason_code",)),
    "PUBCOMP": (("packet_id", "packet_identifier"), ("reason_code",)),
    "DISCONNECT": (("reason_code",),),
    "AUTH": (("reason_code",),),
}  # fmt: skip


def _mqtt_type_name(packet: Any) -> str:
    for attr in ("type", "packet_type", "kind"):
        value = getattr(packet, attr, None)
        if value is None:
            continue
        if isinstance(value, enum.Enum):
            return str(value.name).upper()
        if isinstance(value, int) and not isinstance(value, bool):
            return _MQTT_TYPES.get(int(value), f"TYPE{int(value)}")
        if isinstance(value, str):
            return value.upper()
    name = type(packet).__name__.upper()
    for suffix in ("PACKET", "VIEW"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def _mqtt_raw_summary(data: bytes) -> str:
    if not data:
        return "<0 bytes>"
    name = _MQTT_TYPES.get(data[0] >> 4, f"TYPE{data[0] >> 4}")
    return f"{name} <{len(data)} bytes>"


def _mqtt_payload_len(packet: Any) -> int | None:
    payload = getattr(packet, "payload", None)
    if payload is not None:
        return _length_of(payload)
    raw = getattr(packet, "raw", None)
    offset = getattr(packet, "payload_offset", None)
    if raw is not None and isinstance(offset, int):
        return max(0, len(raw) - offset)
    return None


def _format_will(will: Any) -> str:
    parts = []
    for attr in ("topic", "qos", "retain", "payload"):
        value = getattr(will, attr, None)
        part = _format_field(attr, value, 1)
        if part is not None:
            parts.append(part)
    return "[" + ", ".join(parts) + "]"


def format_mqtt(conn_id: Any, direction: str, packet: Any) -> str:
    """One trace line for an MQTT packet (a parsed packet view or raw bytes)."""
    prefix = f"[{conn_id}] {direction}"
    if isinstance(packet, bytes | bytearray | memoryview):
        return f"{prefix} {_mqtt_raw_summary(bytes(packet))}"
    name = _mqtt_type_name(packet)
    parts: list[str] = []
    if dataclasses.is_dataclass(packet) and not isinstance(packet, type):
        for field_name, value in _field_pairs(packet):
            if field_name in ("raw", "type", "packet_type", "flags", "payload_offset"):
                continue
            part = _format_field(field_name, value, 0)
            if part is not None:
                parts.append(part)
    else:
        for candidates in _MQTT_FIELDS.get(name, ()):
            for attr in candidates:
                try:
                    value = getattr(packet, attr)
                except AttributeError:
                    continue
                except Exception:
                    value = "<unreadable>"
                if attr == "will" and value is not None:
                    parts.append(f"will={_format_will(value)}")
                elif attr == "payload":
                    # A view may expose the payload lazily; its length is all we show.
                    n = _mqtt_payload_len(packet)
                    parts.append(f"payload=<{n if n is not None else '?'} bytes>")
                else:
                    part = _format_field(attr, value, 0)
                    if part is not None:
                        parts.append(part)
                break
            else:
                if candidates == ("payload",):
                    n = _mqtt_payload_len(packet)
                    if n is not None:
                        parts.append(f"payload=<{n} bytes>")
    raw = getattr(packet, "raw", None)
    size = f" ({len(raw)})" if raw is not None and _length_of(raw) is not None else ""
    fields = f" [{', '.join(parts)}]" if parts else ""
    return _clip(f"{prefix} {name}{size}{fields}")


# -- the tracer ------------------------------------------------------------------------


class FrameTracer:
    """Logs decoded frames per connection when enabled for that protocol.

    ``protocols`` is a subset of {"amqp", "mqtt"}. Callers on a hot path may
    test ``tracer.amqp_enabled`` before building arguments; the methods check
    it first themselves, so calling them unconditionally is cheap too.
    """

    __slots__ = ("logger", "level", "amqp_enabled", "mqtt_enabled")

    def __init__(
        self,
        logger: logging.Logger | None = None,
        protocols: Iterable[str] = (),
        enabled: bool = True,
        *,
        level: int = logging.INFO,
    ) -> None:
        self.logger = logger if logger is not None else logging.getLogger("gateway.trace")
        self.level = level
        self.amqp_enabled = False
        self.mqtt_enabled = False
        self.configure(protocols, enabled)

    def configure(self, protocols: Iterable[str], enabled: bool = True) -> None:
        """Change what is traced (SIGHUP reload or --trace)."""
        wanted = {p.strip().lower() for p in protocols}
        unknown = wanted - {"amqp", "mqtt", ""}
        if unknown:
            raise ValueError(f"unknown trace protocol(s): {', '.join(sorted(unknown))}")
        self.amqp_enabled = enabled and "amqp" in wanted
        self.mqtt_enabled = enabled and "mqtt" in wanted

    def amqp(
        self,
        conn_id: Any,
        direction: str,
        channel: int | None,
        frame: Any,
        payload_len: int | None = None,
    ) -> None:
        if not self.amqp_enabled or not self.logger.isEnabledFor(self.level):
            return
        try:
            line = format_amqp(conn_id, direction, channel, frame, payload_len)
        except Exception as exc:  # tracing must never break the connection
            line = f"[{conn_id}] {direction} <untraceable frame: {type(exc).__name__}>"
        self.logger.log(self.level, "%s", line)

    def mqtt(self, conn_id: Any, direction: str, packet: Any) -> None:
        if not self.mqtt_enabled or not self.logger.isEnabledFor(self.level):
            return
        try:
            line = format_mqtt(conn_id, direction, packet)
        except Exception as exc:
            line = f"[{conn_id}] {direction} <untraceable packet: {type(exc).__name__}>"
        self.logger.log(self.level, "%s", line)


NULL_TRACER = FrameTracer(protocols=(), enabled=False)
