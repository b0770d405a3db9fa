"""Encoders for the packets the gateway emits itself, and for tests.

The relay never re-encodes relayed packets (it forwards `Packet.raw`); the
gateway only writes a CONNACK refusal (3.1.1 code 3 "server unavailable",
5 "not authorized", 1 "unacceptable protocol version") or, for MQTT 5, a
DISCONNECT with a reason code. Two rewrites exist for credentials the gateway
holds for a device: a CONNECT with its password replaced or removed
(`connect_with_password`), a PUBLISH retransmitted with DUP set (`with_dup`)
and an MQTT 5 PUBLISH given back the topic its alias stood for
(`publish_with_topic`, for a new upstream connection that never learnt it). The rest is here so tests and tools can build packets,
including invalid ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from .constants import MAX_REMAINING_LENGTH, MQTT_3_1_1, MQTT_5, PacketType
from .properties import PROPERTY_TYPES, PropertyType, PropertyValue

if TYPE_CHECKING:
    from .packets import Connect, Publish

Properties = Sequence[tuple[int, PropertyValue]] | None


def encode_varint(value: int) -> bytes:
    """Variable byte integer / remaining length, minimal encoding."""
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"{value} cannot be encoded in 4 bytes")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


encode_remaining_length = encode_varint


def encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return encode_binary(data)


def encode_binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("field longer than 65535 bytes")
    return len(data).to_bytes(2, "big") + data


def encode_properties(props: Properties) -> bytes:
    """A property block including its length prefix."""
    body = bytearray()
    for ident, value in props or ():
        kind = PROPERTY_TYPES[ident]
        body += encode_varint(ident)
        if kind is PropertyType.BYTE:
            body.append(int(value))  # type: ignore[arg-type]
        elif kind is PropertyType.UINT16:
            body += int(value).to_bytes(2, "big")  # type: ignore[arg-type]
        elif kind is PropertyType.UINT32:
            body += int(value).to_bytes(4, "big")  # type: ignore[arg-type]
        elif kind is PropertyType.VARINT:
            body += encode_varint(int(value))  # type: ignore[arg-type]
        elif kind is PropertyType.UTF8:
            body += encode_string(str(value))
        elif kind is PropertyType.BINARY:
            body += encode_binary(bytes(value))  # type: ignore[arg-type]
        else:
            name, val = value  # type: ignore[misc]
            body += encode_string(name) + encode_string(val)
    return encode_varint(len(body)) + bytes(body)


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    """Fixed header + body."""
    return bytes([(ptype << 4) | flags]) + encode_varint(len(body)) + body


def connect(
    client_id: str,
    *,
    keep_alive: int = 60,
    clean_session: bool = True,
    username: str | None = None,
    password: bytes | None = None,
    will_topic: str | None = None,
    will_payload: bytes = b"",
    will_qos: int = 0,
    will_retain: bool = False,
    protocol_level: int = MQTT_3_1_1,
    properties: Properties = None,
    will_properties: Properties = None,
) -> bytes:
    v5 = protocol_level == MQTT_5
    name = "MQIsdp" if protocol_level == 3 else "MQTT"
    flags = 0x02 if clean_session else 0
    if will_topic is not None:
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
    if password is not None:
        flags |= 0x40
    if username is not None:
        flags |= 0x80
    body = encode_string(name) + bytes([protocol_level, flags]) + keep_alive.to_bytes(2, "big")
    if v5:
        body += encode_properties(properties)
    body += encode_string(client_id)
    if will_topic is not None:
        if v5:
            body += encode_properties(will_properties)
        body += encode_string(will_topic) + encode_binary(will_payload)
    if username is not None:
        body += encode_string(username)
    if password is not None:
        body += encode_binary(password)
    return packet(PacketType.CONNECT, 0, body)


def connack(
    return_code: int,
    *,
    session_present: bool = False,
    protocol_level: int = MQTT_3_1_1,
    properties: Properties = None,
) -> bytes:
    """CONNACK; for MQTT 5 `return_code` is the reason code."""
    body = bytes([1 if session_present else 0, return_code])
    if protocol_level == MQTT_5:
        body += encode_properties(properties)
    return packet(PacketType.CONNACK, 0, body)


def publish(
    topic: str,
    payload: bytes = b"",
    *,
    qos: int = 0,
    packet_id: int | None = None,
    retain: bool = False,
    dup: bool = False,
    protocol_level: int = MQTT_3_1_1,
    properties: Properties = None,
) -> bytes:
    flags = (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = encode_string(topic)
    if qos:
        if packet_id is None:
            raise ValueError("QoS 1/2 PUBLISH needs a packet id")
        body += packet_id.to_bytes(2, "big")
    if protocol_level == MQTT_5:
        body += encode_properties(properties)
    return packet(PacketType.PUBLISH, flags, body + payload)


def _reason_and_properties(reason_code: int | None, properties: Properties) -> bytes:
    """MQTT 5's optional tail: a reason code, then properties; each left out when there is
    nothing more to say (5.0 sections 3.4.2.1, 3.14.2.1, 3.15.2.1)."""
    if not (reason_code or properties):
        return b""
    tail = bytes([reason_code or 0])
    if properties:
        tail += encode_properties(properties)
    return tail


def _id_and_properties(packet_id: int, protocol_level: int, properties: Properties) -> bytes:
    """A packet id, then (MQTT 5) a property block: how SUBSCRIBE and its kin begin."""
    head = packet_id.to_bytes(2, "big")
    if protocol_level == MQTT_5:
        head += encode_properties(properties)
    return head


class AckEncoder(Protocol):
    def __call__(
        self,
        packet_id: int,
        reason_code: int | None = None,
        *,
        protocol_level: int = MQTT_3_1_1,
        properties: Properties = None,
    ) -> bytes: ...


def _ack_encoder(ptype: PacketType) -> AckEncoder:
    """The encoder of PUBACK, PUBREC, PUBREL or PUBCOMP: a packet id and (5.0) a reason code."""
    flags = 2 if ptype == PacketType.PUBREL else 0

    def encode(
        packet_id: int,
        reason_code: int | None = None,
        *,
        protocol_level: int = MQTT_3_1_1,
        properties: Properties = None,
    ) -> bytes:
        body = packet_id.to_bytes(2, "big")
        if protocol_level == MQTT_5:
            body += _reason_and_properties(reason_code, properties)
        return packet(ptype, flags, body)

    encode.__name__ = encode.__qualname__ = ptype.name.lower()
    return encode


puback = _ack_encoder(PacketType.PUBACK)
pubrec = _ack_encoder(PacketType.PUBREC)
pubrel = _ack_encoder(PacketType.PUBREL)
pubcomp = _ack_encoder(PacketType.PUBCOMP)


def subscribe(
    packet_id: int,
    subscriptions: Iterable[tuple[str, int]],
    *,
    protocol_level: int = MQTT_3_1_1,
    properties: Properties = None,
) -> bytes:
    """`subscriptions`: (topic filter, options byte); for 3.1.1 the options byte is the QoS."""
    body = _id_and_properties(packet_id, protocol_level, properties)
    for topic_filter, options in subscriptions:
        body += encode_string(topic_filter) + bytes([options])
    return packet(PacketType.SUBSCRIBE, 2, body)


def suback(
    packet_id: int,
    return_codes: Iterable[int],
    *,
    protocol_level: int = MQTT_3_1_1,
    properties: Properties = None,
) -> bytes:
    body = _id_and_properties(packet_id, protocol_level, properties)
    return packet(PacketType.SUBACK, 0, body + bytes(return_codes))


def unsubscribe(
    packet_id: int,
    topic_filters: Iterable[str],
    *,
    protocol_level: int = MQTT_3_1_1,
    properties: Properties = None,
) -> bytes:
    body = _id_and_properties(packet_id, protocol_level, properties)
    for topic_filter in topic_filters:
        body += encode_string(topic_filter)
    return packet(PacketType.UNSUBSCRIBE, 2, body)


def unsuback(
    packet_id: int,
    reason_codes: Iterable[int] = (),
    *,
    protocol_level: int = MQTT_3_1_1,
    properties: Properties = None,
) -> bytes:
    body = _id_and_properties(packet_id, protocol_level, properties)
    if protocol_level == MQTT_5:
        body += bytes(reason_codes)
    return packet(PacketType.UNSUBACK, 0, body)


def pingreq() -> bytes:
    return b"\xc0\x00"


def pingresp() -> bytes:
    return b"\xd0\x00"


def disconnect(
    reason_code: int | None = None,
    *,
    protocol_level: int = MQTT_3_1_1,
    properties: Properties = None,
) -> bytes:
    """DISCONNECT; a reason code (and properties) only for MQTT 5."""
    body = _reason_and_properties(reason_code, properties) if protocol_level == MQTT_5 else b""
    return packet(PacketType.DISCONNECT, 0, body)


def auth(reason_code: int = 0, *, properties: Properties = None) -> bytes:
    return packet(PacketType.AUTH, 0, _reason_and_properties(reason_code, properties))


# -- rewriting received packets (credentials filled in by the gateway) -------------------------

_PASSWORD_FLAG = 0x40
_USERNAME_FLAG = 0x80
_DUP_FLAG = 0x08


def connect_with_password(connect: Connect, password: bytes | None) -> bytes:
    """The CONNECT `connect` with its password replaced (None: removed, flag cleared).

    Everything else stays byte-identical: protocol name and level, the other
    flags, keep-alive, MQTT 5 properties, client id, Will and user name. The
    password is the last field of a CONNECT (3.1.1 section 3.1.3, 5.0 section
    3.1.3), so the rewrite is a cut at that point plus a new fixed header.
    MQTT 3.1 and 3.1.1 allow a password only with a user name (ValueError).
    """
    raw = bytes(connect.raw)
    body = raw[connect.body_offset :]
    old = connect.password
    if old is not None:
        body = body[: len(body) - 2 - len(old)]
    flags_at = 2 + len(connect.protocol_name.encode("utf-8")) + 1
    flags = body[flags_at]
    if password is None:
        flags &= ~_PASSWORD_FLAG
    else:
        if not flags & _USERNAME_FLAG and connect.protocol_level != MQTT_5:
            raise ValueError("a CONNECT before MQTT 5 cannot carry a password without a user name")
        flags |= _PASSWORD_FLAG
        body += encode_binary(password)
    body = body[:flags_at] + bytes([flags]) + body[flags_at + 1 :]
    return packet(PacketType.CONNECT, 0, body)


def with_dup(raw: bytes | memoryview) -> bytes:
    """A QoS 1/2 PUBLISH with the DUP flag set (3.1.1 section 3.3.1.1), for a retransmission."""
    data = bytes(raw)
    if data[0] >> 4 != PacketType.PUBLISH or not data[0] & 0x06:
        raise ValueError("only a QoS 1 or 2 PUBLISH carries a DUP flag")
    return bytes([data[0] | _DUP_FLAG]) + data[1:]


def publish_with_topic(publish: Publish, topic: str) -> bytes:
    """An MQTT 5 PUBLISH that names its topic only by Topic Alias, with `topic` written
    in; the alias property and everything else unchanged, so the receiver (re)learns
    the alias from it (5.0 section 3.3.2.3.4)."""
    raw = bytes(publish.raw)
    start = publish.body_offset
    old_length = int.from_bytes(raw[start : start + 2], "big")
    body = encode_string(topic) + raw[start + 2 + old_length :]
    return bytes([raw[0]]) + encode_varint(len(body)) + body
