"""Framing and validation rules of MQTT 3.1.1 (and 5.0 where they differ)."""

from __future__ import annotations

import pytest

from gateway.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    MalformedPacket,
    MQTTProtocolError,
    PacketReader,
    PacketTooLarge,
    Puback,
    Publish,
    Subscribe,
    Unsuback,
    UnsupportedProtocolVersion,
    encode,
)
from gateway.mqtt.properties import Property

LIMIT = 268_435_455 + 5


def read(data: bytes, level: int | None = MQTT_3_1_1, limit: int = LIMIT):
    reader = PacketReader(limit, protocol_level=level)
    reader.feed(data)
    return reader.next_packet()


def refused(data: bytes, level: int | None = MQTT_3_1_1, error=MQTTProtocolError) -> str:
    with pytest.raises(error) as info:
        read(data, level)
    return info.value.reason


# -- remaining length ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (2097151, b"\xff\xff\x7f"),
        (2097152, b"\x80\x80\x80\x01"),
        (268435455, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length_boundaries(length, encoded):
    """3.1.1 table 2.4: the encoding, and a packet of exactly that length frames."""
    assert encode.encode_remaining_length(length) == encoded
    header = b"\x30" + encoded
    if length > 2097152:
        # Too big to build in a test: the size is known (and refused) from the header alone.
        with pytest.raises(PacketTooLarge) as info:
            read(header, limit=length)
        assert info.value.size == 1 + len(encoded) + length
        return
    body = b"\x00\x01t" + b"x" * (length - 3) if length >= 3 else None
    if body is None:
        packet = b"\xc0" + encoded  # PINGREQ, remaining length 0
        assert read(packet) is not None
        return
    packet = header + body
    reader = PacketReader(len(packet), protocol_level=MQTT_3_1_1)
    reader.feed(packet[:-1])
    assert reader.next_packet() is None
    reader.feed(packet[-1:])
    p = reader.next_packet()
    assert isinstance(p, Publish) and p.remaining_length == length and p.size == len(packet)
    assert p.payload_length == length - 3


def test_remaining_length_over_four_bytes():
    assert "longer than 4 bytes" in refused(b"\x30\xff\xff\xff\xff\x01")


def test_non_minimal_remaining_length_is_accepted():
    # 3.1.1 asks senders for the minimal encoding but a receiver can decode either.
    p = read(b"\xc0\x80\x00")
    assert p is not None and p.size == 3


def test_oversize_refused_before_the_body_arrives():
    reader = PacketReader(1000, protocol_level=MQTT_3_1_1)
    reader.feed(b"\x30\xe9\x07")  # remaining length 1001: body not sent
    with pytest.raises(PacketTooLarge) as info:
        reader.next_packet()
    assert (info.value.size, info.value.limit) == (1004, 1000)
    assert info.value.reason_code == 0x95


def test_limit_counts_the_whole_packet():
    packet = encode.publish("t", b"x" * 95)  # 2 header + 3 topic + 95 = 100 bytes
    assert len(packet) == 100
    assert read(packet, limit=100) is not None
    with pytest.raises(PacketTooLarge):
        read(packet, limit=99)


def test_reader_stays_failed():
    reader = PacketReader(protocol_level=MQTT_3_1_1)
    reader.feed(b"\x00\x00")
    with pytest.raises(MalformedPacket):
        reader.next_packet()
    with pytest.raises(MalformedPacket):
        reader.feed(encode.pingreq())
    with pytest.raises(MalformedPacket):
        reader.next_packet()


# -- fixed header flags (3.1.1 section 2.2.2) ----------------------------------------------------

VALID = {
    "CONNECT": encode.connect("c"),
    "CONNACK": encode.connack(0),
    "PUBACK": encode.puback(1),
    "PUBREC": encode.pubrec(1),
    "PUBREL": encode.pubrel(1),
    "PUBCOMP": encode.pubcomp(1),
    "SUBSCRIBE": encode.subscribe(1, [("a", 0)]),
    "SUBACK": encode.suback(1, [0]),
    "UNSUBSCRIBE": encode.unsubscribe(1, ["a"]),
    "UNSUBACK": encode.unsuback(1),
    "PINGREQ": encode.pingreq(),
    "PINGRESP": encode.pingresp(),
    "DISCONNECT": encode.disconnect(),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_packets_parse(name):
    p = read(VALID[name])
    assert p is not None and p.type.name == name and bytes(p.raw) == VALID[name]


@pytest.mark.parametrize(
    ("name", "flags"),
    [(name, flags) for name in sorted(VALID) for flags in range(16) if flags != VALID[name][0] & 0x0F],
)
def test_reserved_flags_must_match(name, flags):
    """Every flags value but the one the packet type requires (which parses, see above)."""
    data = VALID[name]
    bad = bytes([(data[0] & 0xF0) | flags]) + data[1:]
    assert bad != data
    assert "flags" in refused(bad[:2])  # refused from the first bytes, before the body


def test_reserved_packet_types():
    refused(b"\x00\x00", error=MalformedPacket)
    refused(b"\xf0\x00", level=MQTT_3_1_1, error=MalformedPacket)
    assert isinstance(read(b"\xf0\x00", level=MQTT_5), Auth)


def test_publish_flags():
    assert "QoS is 3" in refused(b"\x36\x05\x00\x01t\x00\x01")
    assert "DUP" in refused(b"\x38\x03\x00\x01t")
    p = read(b"\x3d\x05\x00\x01t\x00\x01")  # DUP + QoS 2 + RETAIN
    assert (p.dup, p.qos, p.retain, p.packet_id) == (True, 2, True, 1)


# -- variable header and payload rules ---------------------------------------------------------


def test_publish_rules():
    assert "packet identifier is 0" in refused(encode.publish("t", qos=1, packet_id=0))
    assert "empty topic" in refused(encode.publish(""))
    assert "wildcard" in refused(encode.publish("a/+"))
    assert "wildcard" in refused(encode.publish("a/#"))
    assert "UTF-8" in refused(b"\x30\x04\x00\x02\xc3\x28")
    assert "U+0000" in refused(b"\x30\x04\x00\x02a\x00")
    # An encoded surrogate (U+D800) is not valid UTF-8 in MQTT (3.1.1 section 1.5.3).
    assert "UTF-8" in refused(b"\x30\x05\x00\x03\xed\xa0\x80")
    assert "too short" in refused(b"\x30\x03\x00\x05a")
    assert "too short" in refused(b"\x32\x03\x00\x01t")  # QoS 1 without a packet id
    # QoS 0 has no packet id: these two bytes are payload.
    p = read(b"\x30\x05\x00\x01t\x00\x01")
    assert p.packet_id is None and bytes(p.payload) == b"\x00\x01"


def test_connect_rules():
    def connect(flags: int, tail: bytes = b"", name: bytes = b"MQTT", level: int = 4) -> bytes:
        body = len(name).to_bytes(2, "big") + name + bytes([level, flags]) + b"\x00\x3c"
        body += b"\x00\x01c" + tail
        return encode.packet(1, 0, body)

    assert isinstance(read(connect(0x02), level=None), Connect)
    assert "reserved flag" in refused(connect(0x03), None)
    assert "Will QoS is 3" in refused(connect(0x1C, b"\x00\x01w\x00\x00"), None)
    assert "without the Will flag" in refused(connect(0x08), None)
    assert "without the Will flag" in refused(connect(0x20), None)
    assert "password flag" in refused(connect(0x40, b"\x00\x00"), None)
    assert "unexpected bytes" in refused(connect(0x00, b"\x00"), None)
    assert "too short" in refused(connect(0x80), None)  # user name flag, no user name
    assert "wildcard" in refused(connect(0x04, b"\x00\x01#\x00\x00"), None)
    with pytest.raises(UnsupportedProtocolVersion) as info:
        read(connect(0, name=b"MQTT", level=6), None)
    assert info.value.connack_code == 1
    with pytest.raises(UnsupportedProtocolVersion):
        read(connect(0, name=b"MQTX"), None)
    with pytest.raises(UnsupportedProtocolVersion):
        read(connect(0, name=b"MQIsdp", level=4), None)


def test_connect_sets_the_reader_level():
    reader = PacketReader()
    reader.feed(
        encode.connect("c", protocol_level=MQTT_5) + encode.disconnect(0x04, protocol_level=5)
    )
    assert reader.next_packet().protocol_level == MQTT_5
    assert reader.protocol_level == MQTT_5
    assert reader.next_packet().reason_code == 0x04


def test_v5_password_without_username_is_allowed():
    p = read(encode.connect("c", password=b"pw", protocol_level=MQTT_5), level=None)
    assert p.username is None and p.password == b"pw"


def test_subscribe_rules():
    assert "without topic filters" in refused(encode.packet(8, 2, b"\x00\x01"))
    assert "reserved bits" in refused(encode.subscribe(1, [("a", 0x04)]))
    assert "QoS is 3" in refused(encode.subscribe(1, [("a", 3)]))
    assert "'#'" in refused(encode.subscribe(1, [("a/#/b", 0)]))
    assert "'+'" in refused(encode.subscribe(1, [("a/b+", 0)]))
    assert "empty topic filter" in refused(encode.subscribe(1, [("", 0)]))
    assert "packet identifier is 0" in refused(encode.subscribe(0, [("a", 0)]))
    # 5.0 options: No Local, Retain As Published, Retain Handling are legal there.
    p = read(encode.subscribe(1, [("a", 0x2D)], protocol_level=MQTT_5), MQTT_5)
    assert isinstance(p, Subscribe) and p.subscriptions == [("a", 0x2D)]
    assert "retain handling" in refused(
        encode.subscribe(1, [("a", 0x30)], protocol_level=5), MQTT_5
    )
    assert "reserved bits" in refused(encode.subscribe(1, [("a", 0x40)], protocol_level=5), MQTT_5)


def test_unsubscribe_and_acks():
    assert "without topic filters" in refused(encode.packet(10, 2, b"\x00\x01"))
    assert "unexpected bytes" in refused(encode.packet(4, 0, b"\x00\x01\x00"))
    assert "non-zero remaining length" in refused(b"\xc0\x01\x00")
    assert "without return codes" in refused(encode.packet(9, 0, b"\x00\x01"))
    assert "reserved" in refused(encode.suback(1, [0x03]))
    assert "reserved flags" in refused(b"\x20\x02\x02\x00")
    assert "reserved" in refused(encode.connack(6))
    assert "session present" in refused(encode.connack(5, session_present=True))


def test_v5_acks_reason_codes_and_properties():
    p = read(
        encode.puback(5, 0x10, protocol_level=5, properties=[(Property.REASON_STRING, "no")]),
        MQTT_5,
    )
    assert isinstance(p, Puback)
    assert (p.packet_id, p.reason_code, p.properties) == (5, 0x10, [(Property.REASON_STRING, "no")])
    assert read(encode.puback(5, protocol_level=5), MQTT_5).reason_code == 0
    ack = read(encode.unsuback(3, [0x00, 0x11], protocol_level=5), MQTT_5)
    assert isinstance(ack, Unsuback) and ack.reason_codes == [0x00, 0x11]
    connack = read(
        encode.connack(0x87, protocol_level=5, properties=[(Property.SERVER_KEEP_ALIVE, 20)]),
        MQTT_5,
    )
    assert isinstance(connack, Connack) and connack.return_code == 0x87
    assert connack.property(Property.SERVER_KEEP_ALIVE) == 20
    assert isinstance(read(encode.disconnect(protocol_level=5), MQTT_5), Disconnect)
    auth = read(encode.auth(0x18, properties=[(Property.AUTHENTICATION_METHOD, "SCRAM")]), MQTT_5)
    assert (auth.reason_code, auth.properties) == (
        0x18,
        [(Property.AUTHENTICATION_METHOD, "SCRAM")],
    )


def test_v5_publish_topic_alias():
    p = read(
        encode.publish("", b"x", protocol_level=5, properties=[(Property.TOPIC_ALIAS, 4)]), MQTT_5
    )
    assert p.topic == "" and p.topic_alias == 4
    assert "neither" in refused(encode.publish("", b"x", protocol_level=5), MQTT_5)


def test_v5_properties_decode_lazily_and_strictly():
    # Unknown property 0x7f: framing skips it; asking for the properties refuses it.
    body = b"\x00\x01t" + b"\x02\x7f\x00" + b"payload"
    p = read(encode.packet(3, 0, body), MQTT_5)
    assert bytes(p.payload) == b"payload"
    with pytest.raises(MalformedPacket):
        _ = p.properties
    assert "property length" in refused(encode.packet(3, 0, b"\x00\x01t\xff\xff\xff\xff"), MQTT_5)


def test_password_is_hidden():
    p = read(encode.connect("c", username="u", password=b"hunter2"), None)
    assert "hunter2" not in repr(p) and "hunter2" not in str(p)
    assert p.password == b"hunter2"
