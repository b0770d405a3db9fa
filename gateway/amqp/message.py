"""AMQP 1.0 message sections (spec 3.2): decode, encode, and splice.

The relay path never uses this module: message bytes pass through untouched.
It serves the few places that must read or write a message (CBS requests and
replies, tests). ``split_sections`` and ``replace_section`` let a caller
rewrite one section (e.g. properties) and keep every other section's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .codec import TYPED_ENCODERS, decode_value, encode_into, skip_value
from .constants import DESCRIPTOR_CODES
from .errors import DecodeError, EncodeError
from .performatives import _EXTRA, _composite, _CompositeBase, _f
from .types import Composite, Described, Map, Symbol, UByte, UInt, ULong

__all__ = [
    "Header",
    "Properties",
    "DeliveryAnnotations",
    "MessageAnnotations",
    "ApplicationProperties",
    "Data",
    "AmqpSequence",
    "AmqpValue",
    "Footer",
    "Message",
    "SECTION_CODES",
    "decode_message",
    "encode_message",
    "split_sections",
    "decode_section",
    "replace_section",
]

Buffer = bytes | bytearray | memoryview

HEADER = 0x70
DELIVERY_ANNOTATIONS = 0x71
MESSAGE_ANNOTATIONS = 0x72
PROPERTIES = 0x73
APPLICATION_PROPERTIES = 0x74
DATA = 0x75
AMQP_SEQUENCE = 0x76
AMQP_VALUE = 0x77
FOOTER = 0x78
SECTION_CODES = range(0x70, 0x79)
_BODY_CODES = (DATA, AMQP_SEQUENCE, AMQP_VALUE)


@_composite(HEADER)
@dataclass(slots=True)
class Header(_CompositeBase):
    durable: bool = _f("bool", False)
    priority: int = _f("ubyte", UByte(4))
    ttl: int | None = _f("uint")
    first_acquirer: bool = _f("bool", False)
    delivery_count: int = _f("uint", UInt(0))
    _extra: tuple[Any, ...] = _EXTRA


@_composite(PROPERTIES)
@dataclass(slots=True)
class Properties(_CompositeBase):
    message_id: Any = _f("any")
    user_id: bytes | None = _f("binary")
    to: Any = _f("any")
    subject: str | None = _f("string")
    reply_to: Any = _f("any")
    correlation_id: Any = _f("any")
    content_type: Symbol | str | None = _f("symbol")
    content_encoding: Symbol | str | None = _f("symbol")
    absolute_expiry_time: int | None = _f("timestamp")
    creation_time: int | None = _f("timestamp")
    group_id: str | None = _f("string")
    group_sequence: int | None = _f("uint")
    reply_to_group_id: str | None = _f("string")
    _extra: tuple[Any, ...] = _EXTRA


class _Section(Composite):
    """A section that is a described map or a described single value."""

    __slots__ = ("value",)
    descriptor_code: ClassVar[int]
    _kind: ClassVar[str]

    def __init__(self, value: Any) -> None:
        self.value = value

    def _amqp_encode(self, buf: bytearray) -> None:
        buf += b"\x00\x53"
        buf.append(self.descriptor_code)
        TYPED_ENCODERS[self._kind](buf, self.value)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.value == other.value  # type: ignore[attr-defined, no-any-return]

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value!r})"


class DeliveryAnnotations(_Section):
    __slots__ = ()
    descriptor_code = DELIVERY_ANNOTATIONS
    _kind = "fields"  # symbol keys (plain str keys are promoted)


class MessageAnnotations(_Section):
    __slots__ = ()
    descriptor_code = MESSAGE_ANNOTATIONS
    _kind = "fields"


class ApplicationProperties(_Section):
    __slots__ = ()
    descriptor_code = APPLICATION_PROPERTIES
    _kind = "map"  # string keys


class Data(_Section):
    __slots__ = ()
    descriptor_code = DATA
    _kind = "binary"


class AmqpSequence(_Section):
    __slots__ = ()
    descriptor_code = AMQP_SEQUENCE
    _kind = "any"


class AmqpValue(_Section):
    __slots__ = ()
    descriptor_code = AMQP_VALUE
    _kind = "any"


class Footer(_Section):
    __slots__ = ()
    descriptor_code = FOOTER
    _kind = "fields"


BodySection = Data | AmqpSequence | AmqpValue


@dataclass(slots=True)
class Message:
    """A bare message plus its annotations. ``body`` is a list of Data
    sections, a list of AmqpSequence sections, or one AmqpValue (in a list)."""

    header: Header | None = None
    delivery_annotations: dict[Any, Any] | None = None
    message_annotations: dict[Any, Any] | None = None
    properties: Properties | None = None
    application_properties: dict[Any, Any] | None = None
    body: list[BodySection] = field(default_factory=list)
    footer: dict[Any, Any] | None = None


# ----------------------------------------------------------------------------- splitting


def _section_code(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """Read a section's descriptor at ``pos``; return (code, offset of its value)."""
    if buf[pos] != 0x00:
        raise DecodeError(
            f"offset {pos}: message section must be a described value, got 0x{buf[pos]:02x}"
        )
    if pos + 1 >= end:
        raise DecodeError(f"offset {pos}: truncated section descriptor")
    c = buf[pos + 1]
    if c == 0x53:
        if pos + 2 >= end:
            raise DecodeError(f"offset {pos}: truncated section descriptor")
        return buf[pos + 2], pos + 3
    descriptor, p = decode_value(buf, pos + 1)
    if isinstance(descriptor, ULong):
        code = int(descriptor)
    elif isinstance(descriptor, Symbol) and descriptor in DESCRIPTOR_CODES:
        code = DESCRIPTOR_CODES[descriptor]
    else:
        raise DecodeError(f"offset {pos}: {descriptor!r:.60} is not a message section descriptor")
    return code, p


def split_sections(raw: Buffer) -> list[tuple[int, int, int]]:
    """Return ``(descriptor_code, start, end)`` for each section of an encoded
    message, without decoding the section contents. ``raw[start:end]`` is the
    whole section (descriptor included)."""
    sections = []
    pos = 0
    end = len(raw)
    while pos < end:
        code, p = _section_code(raw, pos, end)
        if code not in SECTION_CODES:
            raise DecodeError(f"offset {pos}: unknown message section descriptor 0x{code:x}")
        stop = skip_value(raw, p)
        sections.append((code, pos, stop))
        pos = stop
    return sections


def decode_section(raw: Buffer, start: int = 0, end: int | None = None) -> Any:
    """Decode one section (as delimited by split_sections) into its class."""
    value, p = decode_value(raw, start)
    if end is not None and p != end:
        raise DecodeError(f"offset {start}: section ends at {p}, expected {end}")
    if type(value) is not Described:
        raise DecodeError(f"offset {start}: message section must be a described value")
    d = value.descriptor
    if isinstance(d, Symbol):
        d = DESCRIPTOR_CODES.get(d, -1)
    code = int(d) if isinstance(d, ULong) or type(d) is int else -1
    v = value.value
    if code == HEADER or code == PROPERTIES:
        cls = Header if code == HEADER else Properties
        if v is None:
            v = []
        if not isinstance(v, list):
            raise DecodeError(f"offset {start}: {cls.__name__} section must be a list")
        return cls._from_list(v)
    section_cls = _SECTION_CLASSES.get(code)
    if section_cls is None:
        raise DecodeError(f"offset {start}: {value.descriptor!r:.60} is not a message section")
    if section_cls._kind in ("fields", "map"):
        if v is None:
            v = {}
        elif not isinstance(v, dict | Map):
            raise DecodeError(f"offset {start}: {section_cls.__name__} section must be a map")
    elif section_cls is Data and not isinstance(v, bytes):
        raise DecodeError(f"offset {start}: data section must be binary")
    elif section_cls is AmqpSequence and not isinstance(v, list):
        raise DecodeError(f"offset {start}: amqp-sequence section must be a list")
    return section_cls(v)


_SECTION_CLASSES: dict[int, type[_Section]] = {
    c.descriptor_code: c
    for c in (DeliveryAnnotations, MessageAnnotations, ApplicationProperties, Data,
              AmqpSequence, AmqpValue, Footer)
}  # fmt: skip


def replace_section(raw: Buffer, code: int, section: bytes | Any | None) -> bytes:
    """Return ``raw`` with the section ``code`` replaced by ``section`` (encoded
    bytes or a section object), inserted at its place in the section order if
    absent, or removed if ``section`` is None. Other sections keep their bytes.
    Body sections (data, amqp-sequence, amqp-value) cannot be replaced this way."""
    if code in _BODY_CODES or code not in SECTION_CODES:
        raise ValueError(
            f"replace_section handles header/annotations/properties/footer, not 0x{code:x}"
        )
    if section is not None and not isinstance(section, bytes | bytearray):
        buf = bytearray()
        encode_into(buf, section)
        section = bytes(buf)
    sections = split_sections(raw)
    parts: list[Buffer] = []
    placed = section is None
    view = memoryview(raw)
    for c, start, end in sections:
        if c == code:
            if not placed:
                parts.append(section)  # type: ignore[arg-type]
                placed = True
            continue
        if not placed and c > code:
            parts.append(section)  # type: ignore[arg-type]
            placed = True
        parts.append(view[start:end])
    if not placed:
        parts.append(section)  # type: ignore[arg-type]
    return b"".join(parts)


# ----------------------------------------------------------------------- whole messages


def decode_message(raw: Buffer) -> Message:
    """Decode every section of an encoded message. Sections must come in the
    spec's order, with one kind of body section."""
    msg = Message()
    last = -1
    body_code = None
    for code, start, end in split_sections(raw):
        section = decode_section(raw, start, end)
        if code in _BODY_CODES:
            if body_code is not None and code != body_code:
                raise DecodeError(f"offset {start}: message mixes body section kinds")
            if code == AMQP_VALUE and body_code is not None:
                raise DecodeError(f"offset {start}: message has more than one amqp-value section")
            if last > code or (last == FOOTER):
                raise DecodeError(f"offset {start}: body section after a later section")
            body_code = code
            msg.body.append(section)
            last = code
            continue
        if code <= last:
            raise DecodeError(
                f"offset {start}: message section 0x{code:x} out of order or repeated"
            )
        last = code
        if code == HEADER:
            msg.header = section
        elif code == DELIVERY_ANNOTATIONS:
            msg.delivery_annotations = section.value
        elif code == MESSAGE_ANNOTATIONS:
            msg.message_annotations = section.value
        elif code == PROPERTIES:
            msg.properties = section
        elif code == APPLICATION_PROPERTIES:
            msg.application_properties = section.value
        else:
            msg.footer = section.value
    return msg


def encode_message(msg: Message) -> bytes:
    """Encode a message's sections in the spec's order."""
    buf = bytearray()
    if msg.header is not None:
        encode_into(buf, msg.header)
    if msg.delivery_annotations is not None:
        encode_into(buf, DeliveryAnnotations(msg.delivery_annotations))
    if msg.message_annotations is not None:
        encode_into(buf, MessageAnnotations(msg.message_annotations))
    if msg.properties is not None:
        encode_into(buf, msg.properties)
    if msg.application_properties is not None:
        encode_into(buf, ApplicationProperties(msg.application_properties))
    body = msg.body
    if isinstance(body, _Section):
        body = [body]
    kinds = {type(s) for s in body}
    if len(kinds) > 1 or (AmqpValue in kinds and len(body) > 1):
        raise EncodeError(
            "a message body is data sections, amqp-sequence sections, or one amqp-value"
        )
    for section in body:
        if not isinstance(section, Data | AmqpSequence | AmqpValue):
            raise EncodeError(
                f"body section must be Data, AmqpSequence or AmqpValue, got {type(section).__name__}"
            )
        encode_into(buf, section)
    if msg.footer is not None:
        encode_into(buf, Footer(msg.footer))
    return bytes(buf)
