"""Packet views: each holds a packet's original bytes and its parsed headers.

A view never re-encodes anything: `raw` is exactly what arrived on the wire,
which is what the relay forwards. Parsing reads the fixed header, the variable
header and the small payloads the relay looks at; a PUBLISH payload is only
located (`payload_offset`), MQTT 5 property blocks are only skipped
(`properties_span`) and decoded when someone asks (`properties`).

`parse_packet` validates per 3.1.1 / 5.0 and raises only `MQTTProtocolError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from .constants import (
    MQTT_3_1,
    MQTT_5,
    REQUIRED_FLAGS,
    SUPPORTED_PROTOCOLS,
    PacketType,
)
from .errors import MalformedPacket, MQTTProtocolError, UnsupportedProtocolVersion
from .properties import Property, PropertyValue, decode_properties, skip_properties
from .topics import validate_topic_filter, validate_topic_name
from .wire import Cursor

Raw = bytes | memoryview
Span = tuple[int, int]


class Packet:
    """Common part of every packet view."""

    __slots__ = ("raw", "flags", "body_offset")
    type: ClassVar[PacketType]

    def __init__(self, raw: Raw, flags: int, body_offset: int) -> None:
        self.raw = raw
        self.flags = flags
        self.body_offset = body_offset

    @property
    def size(self) -> int:
        """Whole packet size in bytes (fixed header included)."""
        return len(self.raw)

    @property
    def remaining_length(self) -> int:
        return len(self.raw) - self.body_offset

    def _fields(self) -> str:
        return ""

    def __repr__(self) -> str:
        fields = self._fields()
        return f"<{self.type.name}{' ' + fields if fields else ''} size={self.size}>"


class _HasProperties(Packet):
    """A packet whose variable header may carry an MQTT 5 property block."""

    __slots__ = ("properties_span",)

    def __init__(self, raw: Raw, flags: int, body_offset: int) -> None:
        super().__init__(raw, flags, body_offset)
        self.properties_span: Span | None = None

    @property
    def properties(self) -> list[tuple[int, PropertyValue]]:
        """Decoded MQTT 5 properties (empty for 3.1.1); validates them on the way."""
        if self.properties_span is None:
            return []
        return decode_properties(self.raw, *self.properties_span)

    def property(self, ident: int) -> PropertyValue | None:
        for key, value in self.properties:
            if key == ident:
                return value
        return None


class Will:
    """The Will message a CONNECT registers."""

    __slots__ = ("topic", "payload", "qos", "retain", "properties_span")

    def __init__(
        self, topic: str, payload: bytes, qos: int, retain: bool, properties_span: Span | None
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.properties_span = properties_span

    def __repr__(self) -> str:
        return (
            f"Will(topic={self.topic!r}, qos={self.qos}, retain={self.retain}, "
            f"payload=<{len(self.payload)} bytes>)"
        )


class Connect(_HasProperties):
    __slots__ = (
        "protocol_name",
        "protocol_level",
        "connect_flags",
        "keep_alive",
        "client_id",
        "will",
        "username",
        "_password",
    )
    type = PacketType.CONNECT

    protocol_name: str
    protocol_level: int
    connect_flags: int
    keep_alive: int
    client_id: str
    will: Will | None
    username: str | None
    _password: bytes | None

    @property
    def clean_session(self) -> bool:
        """Clean Session (3.1.1) / Clean Start (5.0)."""
        return bool(self.connect_flags & 0x02)

    @property
    def password(self) -> bytes | None:
        # A property, so it never shows up in vars()/repr-style dumps by accident.
        return self._password

    @property
    def has_password(self) -> bool:
        return self._password is not None

    def _fields(self) -> str:
        return (
            f"protocol={self.protocol_name!r}/{self.protocol_level} client_id={self.client_id!r} "
            f"username={self.username!r} password={'<hidden>' if self.has_password else None} "
            f"keep_alive={self.keep_alive} clean={self.clean_session} will={self.will!r}"
        )


class Connack(_HasProperties):
    __slots__ = ("session_present", "return_code")
    type = PacketType.CONNACK
    session_present: bool
    return_code: int  # 3.1.1 return code or 5.0 reason code

    def _fields(self) -> str:
        return f"return_code={self.return_code} session_present={self.session_present}"


class Publish(_HasProperties):
    __slots__ = ("topic", "packet_id", "payload_offset")
    type = PacketType.PUBLISH
    topic: str  # may be "" in MQTT 5 when a Topic Alias stands in
    packet_id: int | None
    payload_offset: int

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 0x03

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def retain(self) -> bool:
        return bool(self.flags & 0x01)

    @property
    def payload(self) -> memoryview:
        return memoryview(self.raw)[self.payload_offset :]

    @property
    def payload_length(self) -> int:
        return len(self.raw) - self.payload_offset

    @property
    def topic_alias(self) -> int | None:
        value = self.property(Property.TOPIC_ALIAS) if self.properties_span else None
        return value if isinstance(value, int) else None

    def _fields(self) -> str:
        return (
            f"topic={self.topic!r} qos={self.qos} dup={self.dup} retain={self.retain} "
            f"packet_id={self.packet_id} payload=<{self.payload_length} bytes>"
        )


class _Ack(_HasProperties):
    """PUBACK, PUBREC, PUBREL, PUBCOMP: a packet id and (5.0) a reason code."""

    __slots__ = ("packet_id", "reason_code")
    packet_id: int
    reason_code: int

    def _fields(self) -> str:
        return f"packet_id={self.packet_id} reason_code={self.reason_code}"


class Puback(_Ack):
    __slots__ = ()
    type = PacketType.PUBACK


class Pubrec(_Ack):
    __slots__ = ()
    type = PacketType.PUBREC


class Pubrel(_Ack):
    __slots__ = ()
    type = PacketType.PUBREL


class Pubcomp(_Ack):
    __slots__ = ()
    type = PacketType.PUBCOMP


class Subscribe(_HasProperties):
    __slots__ = ("packet_id", "subscriptions")
    type = PacketType.SUBSCRIBE
    packet_id: int
    subscriptions: list[tuple[str, int]]  # (topic filter, options byte; QoS = options & 3)

    @property
    def topic_filters(self) -> list[str]:
        return [f for f, _ in self.subscriptions]

    def _fields(self) -> str:
        return f"packet_id={self.packet_id} subscriptions={self.subscriptions!r}"


class Suback(_HasProperties):
    __slots__ = ("packet_id", "return_codes")
    type = PacketType.SUBACK
    packet_id: int
    return_codes: list[int]

    def _fields(self) -> str:
        return f"packet_id={self.packet_id} return_codes={self.return_codes}"


class Unsubscribe(_HasProperties):
    __slots__ = ("packet_id", "topic_filters")
    type = PacketType.UNSUBSCRIBE
    packet_id: int
    topic_filters: list[str]

    def _fields(self) -> str:
        return f"packet_id={self.packet_id} topic_filters={self.topic_filters!r}"


class Unsuback(_HasProperties):
    __slots__ = ("packet_id", "reason_codes")
    type = PacketType.UNSUBACK
    packet_id: int
    reason_codes: list[int]  # MQTT 5 only; empty for 3.1.1

    def _fields(self) -> str:
        return f"packet_id={self.packet_id}"


class Pingreq(Packet):
    __slots__ = ()
    type = PacketType.PINGREQ


class Pingresp(Packet):
    __slots__ = ()
    type = PacketType.PINGRESP


class _ReasonOnly(_HasProperties):
    """DISCONNECT, AUTH: (5.0) a reason code and properties, nothing else."""

    __slots__ = ("reason_code",)
    reason_code: int

    def _fields(self) -> str:
        return f"reason_code={self.reason_code}"


class Disconnect(_ReasonOnly):
    __slots__ = ()
    type = PacketType.DISCONNECT


class Auth(_ReasonOnly):
    __slots__ = ()
    type = PacketType.AUTH


# ---------------------------------------------------------------------------
# Parsers. Each gets the raw packet, its flags nibble, the offset of the
# variable header and the session's protocol level, and returns the view.


def _packet_id(cur: Cursor, what: str) -> int:
    packet_id = cur.uint16(f"{what} packet identifier")
    if packet_id == 0:
        raise MalformedPacket(f"{what} packet identifier is 0")
    return packet_id


def _parse_connect(raw: Raw, flags: int, off: int, level: int | None) -> Connect:
    cur = Cursor(raw, off, len(raw))
    p = Connect(raw, flags, off)
    p.protocol_name = cur.utf8("CONNECT protocol name")
    p.protocol_level = cur.uint8("CONNECT protocol level")
    if (p.protocol_name, p.protocol_level) not in SUPPORTED_PROTOCOLS:
        raise UnsupportedProtocolVersion(p.protocol_name, p.protocol_level)
    v5 = p.protocol_level == MQTT_5
    cflags = p.connect_flags = cur.uint8("CONNECT flags")
    if cflags & 0x01:
        raise MalformedPacket("CONNECT reserved flag is set")
    will_flag = bool(cflags & 0x04)
    will_qos = (cflags >> 3) & 0x03
    will_retain = bool(cflags & 0x20)
    has_password = bool(cflags & 0x40)
    has_username = bool(cflags & 0x80)
    if will_qos == 3:
        raise MalformedPacket("CONNECT Will QoS is 3")
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("CONNECT Will QoS/Retain set without the Will flag")
    if has_password and not has_username and not v5:
        raise MalformedPacket("CONNECT password flag set without the user name flag")
    p.keep_alive = cur.uint16("CONNECT keep alive")
    if v5:
        p.properties_span = skip_properties(cur, "CONNECT")
    p.client_id = cur.utf8("CONNECT client identifier")
    p.will = None
    if will_flag:
        will_props = skip_properties(cur, "Will") if v5 else None
        topic = cur.utf8("Will topic")
        validate_topic_name(topic)
        payload = cur.binary("Will payload")
        p.will = Will(topic, payload, will_qos, will_retain, will_props)
    p.username = cur.utf8("CONNECT user name") if has_username else None
    p._password = cur.binary("CONNECT password") if has_password else None
    cur.expect_end("CONNECT")
    return p


def _parse_connack(raw: Raw, flags: int, off: int, level: int | None) -> Connack:
    cur = Cursor(raw, off, len(raw))
    p = Connack(raw, flags, off)
    ack_flags = cur.uint8("CONNACK flags")
    # MQTT 3.1 had an unused byte here; 3.1.1 and 5.0 reserve bits 7-1.
    if ack_flags & 0xFE and level != MQTT_3_1:
        raise MalformedPacket("CONNACK reserved flags are set")
    p.session_present = bool(ack_flags & 0x01) and level != MQTT_3_1
    p.return_code = cur.uint8("CONNACK return code")
    if level == MQTT_5:
        p.properties_span = skip_properties(cur, "CONNACK")
    elif p.return_code > 5:
        raise MalformedPacket(f"CONNACK return code {p.return_code} is reserved")
    if p.return_code and p.session_present:
        raise MalformedPacket("CONNACK refusal with session present")
    cur.expect_end("CONNACK")
    return p


def _parse_publish(raw: Raw, flags: int, off: int, level: int | None) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise MalformedPacket("PUBLISH QoS is 3")
    if qos == 0 and flags & 0x08:
        raise MalformedPacket("PUBLISH with QoS 0 has the DUP flag set")
    cur = Cursor(raw, off, len(raw))
    p = Publish(raw, flags, off)
    p.topic = cur.utf8("PUBLISH topic name")
    v5 = level == MQTT_5
    validate_topic_name(p.topic, allow_empty=v5)
    p.packet_id = _packet_id(cur, "PUBLISH") if qos else None
    if v5:
        p.properties_span = skip_properties(cur, "PUBLISH")
        if not p.topic and p.topic_alias is None:
            raise MalformedPacket("PUBLISH has neither a topic name nor a topic alias")
    p.payload_offset = cur.pos
    return p


def _make_ack_parser(cls: type[_Ack]) -> Callable[[Raw, int, int, int | None], _Ack]:
    what = cls.type.name

    def parse(raw: Raw, flags: int, off: int, level: int | None) -> _Ack:
        cur = Cursor(raw, off, len(raw))
        p = cls(raw, flags, off)
        p.packet_id = _packet_id(cur, what)
        p.reason_code = 0
        if level == MQTT_5:
            # 5.0 section 3.4.2.1: reason code and properties may be omitted.
            if cur.remaining:
                p.reason_code = cur.uint8(f"{what} reason code")
            if cur.remaining:
                p.properties_span = skip_properties(cur, what)
        cur.expect_end(what)
        return p

    return parse


def _parse_subscribe(raw: Raw, flags: int, off: int, level: int | None) -> Subscribe:
    cur = Cursor(raw, off, len(raw))
    p = Subscribe(raw, flags, off)
    p.packet_id = _packet_id(cur, "SUBSCRIBE")
    v5 = level == MQTT_5
    if v5:
        p.properties_span = skip_properties(cur, "SUBSCRIBE")
    # 3.1.1: upper six bits reserved; 5.0: bits 6-7 reserved, Retain Handling 3 invalid.
    reserved = 0xC0 if v5 else 0xFC
    subs: list[tuple[str, int]] = []
    while cur.remaining:
        topic_filter = cur.utf8("SUBSCRIBE topic filter")
        validate_topic_filter(topic_filter)
        options = cur.uint8("SUBSCRIBE options")
        if options & reserved:
            raise MalformedPacket("SUBSCRIBE options reserved bits are set")
        if options & 0x03 == 3:
            raise MalformedPacket("SUBSCRIBE requested QoS is 3")
        if v5 and (options >> 4) & 0x03 == 3:
            raise MalformedPacket("SUBSCRIBE retain handling is 3")
        subs.append((topic_filter, options))
    if not subs:
        raise MQTTProtocolError("SUBSCRIBE without topic filters")
    p.subscriptions = subs
    return p


_V311_SUBACK_CODES = frozenset({0x00, 0x01, 0x02, 0x80})


def _parse_suback(raw: Raw, flags: int, off: int, level: int | None) -> Suback:
    cur = Cursor(raw, off, len(raw))
    p = Suback(raw, flags, off)
    p.packet_id = _packet_id(cur, "SUBACK")
    if level == MQTT_5:
        p.properties_span = skip_properties(cur, "SUBACK")
    codes = list(bytes(raw[cur.pos :]))
    if not codes:
        raise MalformedPacket("SUBACK without return codes")
    if level != MQTT_5:
        for code in codes:
            if code not in _V311_SUBACK_CODES:
                raise MalformedPacket(f"SUBACK return code 0x{code:02x} is reserved")
    p.return_codes = codes
    return p


def _parse_unsubscribe(raw: Raw, flags: int, off: int, level: int | None) -> Unsubscribe:
    cur = Cursor(raw, off, len(raw))
    p = Unsubscribe(raw, flags, off)
    p.packet_id = _packet_id(cur, "UNSUBSCRIBE")
    if level == MQTT_5:
        p.properties_span = skip_properties(cur, "UNSUBSCRIBE")
    filters: list[str] = []
    while cur.remaining:
        topic_filter = cur.utf8("UNSUBSCRIBE topic filter")
        validate_topic_filter(topic_filter)
        filters.append(topic_filter)
    if not filters:
        raise MQTTProtocolError("UNSUBSCRIBE without topic filters")
    p.topic_filters = filters
    return p


def _parse_unsuback(raw: Raw, flags: int, off: int, level: int | None) -> Unsuback:
    cur = Cursor(raw, off, len(raw))
    p = Unsuback(raw, flags, off)
    p.packet_id = _packet_id(cur, "UNSUBACK")
    p.reason_codes = []
    if level == MQTT_5:
        p.properties_span = skip_properties(cur, "UNSUBACK")
        p.reason_codes = list(bytes(raw[cur.pos :]))
        if not p.reason_codes:
            raise MalformedPacket("UNSUBACK without reason codes")
    else:
        cur.expect_end("UNSUBACK")
    return p


def _make_empty_parser(cls: type[Packet]) -> Callable[[Raw, int, int, int | None], Packet]:
    what = cls.type.name

    def parse(raw: Raw, flags: int, off: int, level: int | None) -> Packet:
        if len(raw) != off:
            raise MalformedPacket(f"{what} has a non-zero remaining length")
        return cls(raw, flags, off)

    return parse


def _make_reason_parser(
    cls: type[_ReasonOnly],
) -> Callable[[Raw, int, int, int | None], Packet]:
    what = cls.type.name

    def parse(raw: Raw, flags: int, off: int, level: int | None) -> Packet:
        cur = Cursor(raw, off, len(raw))
        p = cls(raw, flags, off)
        p.reason_code = 0
        if level == MQTT_5:
            if cur.remaining:
                p.reason_code = cur.uint8(f"{what} reason code")
            if cur.remaining:
                p.properties_span = skip_properties(cur, what)
        cur.expect_end(what)
        return p

    return parse


PARSERS: dict[int, Callable[[Raw, int, int, int | None], Packet]] = {
    PacketType.CONNECT: _parse_connect,
    PacketType.CONNACK: _parse_connack,
    PacketType.PUBLISH: _parse_publish,
    PacketType.PUBACK: _make_ack_parser(Puback),
    PacketType.PUBREC: _make_ack_parser(Pubrec),
    PacketType.PUBREL: _make_ack_parser(Pubrel),
    PacketType.PUBCOMP: _make_ack_parser(Pubcomp),
    PacketType.SUBSCRIBE: _parse_subscribe,
    PacketType.SUBACK: _parse_suback,
    PacketType.UNSUBSCRIBE: _parse_unsubscribe,
    PacketType.UNSUBACK: _parse_unsuback,
    PacketType.PINGREQ: _make_empty_parser(Pingreq),
    PacketType.PINGRESP: _make_empty_parser(Pingresp),
    PacketType.DISCONNECT: _make_reason_parser(Disconnect),
    PacketType.AUTH: _make_reason_parser(Auth),
}


def check_fixed_header(first_byte: int, level: int | None) -> None:
    """Validate packet type and flags from the first byte alone (3.1.1 section 2.2)."""
    ptype = first_byte >> 4
    flags = first_byte & 0x0F
    if ptype == 0:
        raise MalformedPacket("reserved packet type 0")
    if ptype == PacketType.AUTH and level != MQTT_5:
        raise MalformedPacket("reserved packet type 15")
    if ptype == PacketType.PUBLISH:
        return  # DUP/QoS/RETAIN: checked with the rest of the PUBLISH
    if flags != REQUIRED_FLAGS[ptype]:
        raise MalformedPacket(
            f"{PacketType(ptype).name} fixed header flags 0x{flags:x} are invalid"
        )


def parse_packet(raw: Raw, body_offset: int, level: int | None) -> Packet:
    """Parse one complete packet. `level` is the session's protocol level (None: not known yet).

    Fixed-header flags must already have passed `check_fixed_header`.
    """
    first = raw[0]
    ptype = first >> 4
    if ptype == PacketType.CONNECT:
        return _parse_connect(raw, first & 0x0F, body_offset, level)
    return PARSERS[ptype](raw, first & 0x0F, body_offset, level)
