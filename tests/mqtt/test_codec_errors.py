"""What the parser says about each way a packet can be wrong, exactly.

The reason goes to the log line and the metric of a refused device: a wrong or missing field
name there sends an operator looking at the wrong byte. So every truncation point of every
packet type, every reserved value and every leftover byte is checked for its exact reason,
and the views' fields and reprs for their exact values.
"""

from __future__ import annotations

import pytest

from gateway.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    MalformedPacket,
    MQTTProtocolError,
    PacketReader,
    UnsupportedProtocolVersion,
    encode,
)
from gateway.mqtt.properties import Property


def read(data: bytes, level: int | None = MQTT_3_1_1):
    reader = PacketReader(1 << 20, protocol_level=level)
    reader.feed(data)
    return reader.next_packet()


def reason(data: bytes, level: int | None = MQTT_3_1_1) -> str:
    with pytest.raises(MQTTProtocolError) as info:
        read(data, level)
    return info.value.reason


def body_of(packet: bytes) -> bytes:
    i = 1
    while packet[i] & 0x80:
        i += 1
    return packet[i + 1 :]


def reframed(packet: bytes, body: bytes) -> bytes:
    """The packet's first byte with another body (and its remaining length)."""
    return bytes([packet[0]]) + encode.encode_remaining_length(len(body)) + body


def truncation_reasons(packet: bytes, level: int) -> list[str]:
    """The reason for every proper prefix of the body, consecutive repeats collapsed."""
    body = body_of(packet)
    out: list[str] = []
    for k in range(len(body)):
        try:
            read(reframed(packet, body[:k]), level)
            got = "ok"
        except MQTTProtocolError as exc:
            got = exc.reason
        if not out or out[-1] != got:
            out.append(got)
    return out


def short(*fields: str) -> list[str]:
    return [f"packet too short for {f}" for f in fields]


FULL_CONNECT = dict(username="u", password=b"p", will_topic="w", will_payload=b"x")

TRUNCATIONS = {
    "CONNECT 3.1.1": (
        encode.connect("c", **FULL_CONNECT),  # type: ignore[arg-type]
        MQTT_3_1_1,
        short("CONNECT protocol name", "CONNECT protocol level", "CONNECT flags",
              "CONNECT keep alive", "CONNECT client identifier", "Will topic", "Will payload",
              "CONNECT user name", "CONNECT password"),
    ),
    "CONNECT 5": (
        encode.connect("c", protocol_level=MQTT_5, **FULL_CONNECT),  # type: ignore[arg-type]
        MQTT_5,
        short("CONNECT protocol name", "CONNECT protocol level", "CONNECT flags",
              "CONNECT keep alive", "CONNECT property length", "CONNECT client identifier",
              "Will property length", "Will topic", "Will payload", "CONNECT user name",
              "CONNECT password"),
    ),
    "CONNACK": (encode.connack(0), MQTT_3_1_1, short("CONNACK flags", "CONNACK return code")),
    "CONNACK 5": (
        encode.connack(0, protocol_level=MQTT_5),
        MQTT_5,
        short("CONNACK flags", "CONNACK return code", "CONNACK property length"),
    ),
    "PUBLISH": (
        encode.publish("t", b"x", qos=1, packet_id=7),
        MQTT_3_1_1,
        [*short("PUBLISH topic name", "PUBLISH packet identifier"), "ok"],
    ),
    "PUBLISH 5": (
        encode.publish("t", b"x", qos=1, packet_id=7, protocol_level=MQTT_5),
        MQTT_5,
        [*short("PUBLISH topic name", "PUBLISH packet identifier", "PUBLISH property length"),
         "ok"],
    ),
    "PUBACK": (encode.puback(1), MQTT_3_1_1, short("PUBACK packet identifier")),
    "PUBREC 5": (
        encode.pubrec(1, reason_code=0x10, properties=[(Property.REASON_STRING, "r")],
                      protocol_level=MQTT_5),
        MQTT_5,
        [*short("PUBREC packet identifier"), "ok", "packet too short for PUBREC properties"],
    ),
    "SUBSCRIBE": (
        encode.subscribe(1, [("a", 0)]),
        MQTT_3_1_1,
        [*short("SUBSCRIBE packet identifier"), "SUBSCRIBE without topic filters",
         *short("SUBSCRIBE topic filter", "SUBSCRIBE options")],
    ),
    "SUBSCRIBE 5": (
        encode.subscribe(1, [("a", 0)], protocol_level=MQTT_5),
        MQTT_5,
        [*short("SUBSCRIBE packet identifier", "SUBSCRIBE property length"),
         "SUBSCRIBE without topic filters",
         *short("SUBSCRIBE topic filter", "SUBSCRIBE options")],
    ),
    "SUBACK": (
        encode.suback(1, [0]),
        MQTT_3_1_1,
        [*short("SUBACK packet identifier"), "SUBACK without return codes"],
    ),
    "SUBACK 5": (
        encode.suback(1, [0], protocol_level=MQTT_5),
        MQTT_5,
        [*short("SUBACK packet identifier", "SUBACK property length"),
         "SUBACK without return codes"],
    ),
    "UNSUBSCRIBE": (
        encode.unsubscribe(1, ["a"]),
        MQTT_3_1_1,
        [*short("UNSUBSCRIBE packet identifier"), "UNSUBSCRIBE without topic filters",
         *short("UNSUBSCRIBE topic filter")],
    ),
    "UNSUBSCRIBE 5": (
        encode.unsubscribe(1, ["a"], protocol_level=MQTT_5),
        MQTT_5,
        [*short("UNSUBSCRIBE packet identifier", "UNSUBSCRIBE property length"),
         "UNSUBSCRIBE without topic filters", *short("UNSUBSCRIBE topic filter")],
    ),
    "UNSUBACK": (encode.unsuback(1), MQTT_3_1_1, short("UNSUBACK packet identifier")),
    "UNSUBACK 5": (
        encode.unsuback(1, [0], protocol_level=MQTT_5),
        MQTT_5,
        [*short("UNSUBACK packet identifier", "UNSUBACK property length"),
         "UNSUBACK without reason codes"],
    ),
    "DISCONNECT 5": (
        encode.disconnect(0x04, properties=[(Property.REASON_STRING, "r")], protocol_level=MQTT_5),
        MQTT_5,
        ["ok", "packet too short for DISCONNECT properties"],
    ),
    "AUTH": (
        encode.auth(0x18, properties=[(Property.AUTHENTICATION_METHOD, "m")]),
        MQTT_5,
        ["ok", "packet too short for AUTH properties"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TRUNCATIONS))
def test_every_truncation_names_the_missing_field(name: str) -> None:
    packet, level, expected = TRUNCATIONS[name]
    read(packet, level)  # the whole packet parses
    assert truncation_reasons(packet, level) == expected


@pytest.mark.parametrize(
    ("packet", "level", "expected"),
    [
        (encode.connect("c"), MQTT_3_1_1, "1 unexpected bytes at the end of CONNECT"),
        (encode.connack(0), MQTT_3_1_1, "1 unexpected bytes at the end of CONNACK"),
        (encode.unsuback(1), MQTT_3_1_1, "1 unexpected bytes at the end of UNSUBACK"),
        (encode.puback(1), MQTT_3_1_1, "1 unexpected bytes at the end of PUBACK"),
        (encode.pubrel(1, reason_code=0x92, protocol_level=MQTT_5,
                       properties=[(Property.REASON_STRING, "r")]), MQTT_5,
         "1 unexpected bytes at the end of PUBREL"),
        (encode.disconnect(0x04, protocol_level=MQTT_5, properties=[(Property.REASON_STRING, "r")]),
         MQTT_5, "1 unexpected bytes at the end of DISCONNECT"),
        (encode.disconnect(), MQTT_3_1_1, "1 unexpected bytes at the end of DISCONNECT"),
        (encode.pingreq(), MQTT_3_1_1, "PINGREQ has a non-zero remaining length"),
        (encode.pingresp(), MQTT_3_1_1, "PINGRESP has a non-zero remaining length"),
    ],
)  # fmt: skip
def test_leftover_bytes(packet: bytes, level: int, expected: str) -> None:
    assert reason(reframed(packet, body_of(packet) + b"\x00"), level) == expected


def connect_with_flags(flags: int, level: int = MQTT_3_1_1) -> bytes:
    body = bytearray(body_of(encode.connect("c", protocol_level=level)))
    body[7] = flags  # protocol name (6 bytes), level, then the flags
    return reframed(encode.connect("c"), bytes(body))


def with_packet_id_0(packet: bytes) -> bytes:
    body = body_of(packet)
    return reframed(packet, b"\x00\x00" + body[2:])


@pytest.mark.parametrize(
    ("data", "level", "expected"),
    [
        (connect_with_flags(0x03), MQTT_3_1_1, "CONNECT reserved flag is set"),
        (connect_with_flags(0x1E), MQTT_3_1_1, "CONNECT Will QoS is 3"),
        (connect_with_flags(0x0A), MQTT_3_1_1, "CONNECT Will QoS/Retain set without the Will flag"),
        (connect_with_flags(0x22), MQTT_3_1_1, "CONNECT Will QoS/Retain set without the Will flag"),
        (connect_with_flags(0x42), MQTT_3_1_1,
         "CONNECT password flag set without the user name flag"),
        (reframed(encode.connack(0), b"\x02\x00"), MQTT_3_1_1, "CONNACK reserved flags are set"),
        (reframed(encode.connack(0), b"\x00\x06"), MQTT_3_1_1, "CONNACK return code 6 is reserved"),
        (reframed(encode.connack(0), b"\x01\x05"), MQTT_3_1_1,
         "CONNACK refusal with session present"),
        (b"\x36\x05\x00\x01t\x00\x01", MQTT_3_1_1,
         "PUBLISH QoS is 3"),
        (b"\x38\x03\x00\x01t", MQTT_3_1_1, "PUBLISH with QoS 0 has the DUP flag set"),
        (b"\x32\x05\x00\x01t\x00\x00", MQTT_3_1_1, "PUBLISH packet identifier is 0"),
        (b"\x30\x03\x00\x00\x00", MQTT_5, "PUBLISH has neither a topic name nor a topic alias"),
        (with_packet_id_0(encode.puback(1)), MQTT_3_1_1, "PUBACK packet identifier is 0"),
        (with_packet_id_0(encode.pubrel(1)), MQTT_3_1_1, "PUBREL packet identifier is 0"),
        (with_packet_id_0(encode.subscribe(1, [("a", 0)])), MQTT_3_1_1,
         "SUBSCRIBE packet identifier is 0"),
        (with_packet_id_0(encode.suback(1, [0])), MQTT_3_1_1, "SUBACK packet identifier is 0"),
        (with_packet_id_0(encode.unsubscribe(1, ["a"])), MQTT_3_1_1,
         "UNSUBSCRIBE packet identifier is 0"),
        (with_packet_id_0(encode.unsuback(1)), MQTT_3_1_1, "UNSUBACK packet identifier is 0"),
        (encode.subscribe(1, [("a", 0x04)]), MQTT_3_1_1, "SUBSCRIBE options reserved bits are set"),
        (encode.subscribe(1, [("a", 0x40)], protocol_level=MQTT_5), MQTT_5,
         "SUBSCRIBE options reserved bits are set"),
        (encode.subscribe(1, [("a", 3)]), MQTT_3_1_1, "SUBSCRIBE requested QoS is 3"),
        (encode.subscribe(1, [("a", 0x30)], protocol_level=MQTT_5), MQTT_5,
         "SUBSCRIBE retain handling is 3"),
        (encode.suback(1, [0x03]), MQTT_3_1_1, "SUBACK return code 0x03 is reserved"),
    ],
)  # fmt: skip
def test_reserved_values(data: bytes, level: int, expected: str) -> None:
    assert reason(data, level) == expected


def test_reserved_values_that_are_valid_elsewhere() -> None:
    """What 3.1.1 reserves but 5.0 allows parses under 5.0."""
    assert read(encode.subscribe(1, [("a", 0x2C)], protocol_level=MQTT_5), MQTT_5) is not None
    assert read(encode.suback(1, [0x83], protocol_level=MQTT_5), MQTT_5).return_codes == [0x83]
    password_only = encode.connect("c", password=b"p", protocol_level=MQTT_5)
    assert read(password_only, MQTT_5).password == b"p"


def test_unsupported_protocol_names_the_version() -> None:
    body = bytearray(body_of(encode.connect("c")))
    body[6] = 9
    with pytest.raises(UnsupportedProtocolVersion) as info:
        read(reframed(encode.connect("c"), bytes(body)), None)
    assert (info.value.protocol_name, info.value.protocol_level) == ("MQTT", 9)


def test_views_carry_their_fields() -> None:
    c = read(encode.connect("c", keep_alive=30, will_topic="w", will_payload=b"x", will_qos=1,
                            will_retain=True, protocol_level=MQTT_5,
                            will_properties=[(Property.WILL_DELAY_INTERVAL, 3)]), MQTT_5)  # fmt: skip
    assert (c.flags, c.body_offset, c.keep_alive, c.clean_session) == (0, 2, 30, True)
    assert c.will is not None and (c.will.topic, c.will.payload) == ("w", b"x")
    assert (c.will.qos, c.will.retain) == (1, True)
    assert c.will.properties_span is not None and c.properties_span is not None
    start, end = c.will.properties_span
    assert bytes(c.raw[start:end]) == b"\x18\x00\x00\x00\x03"  # Will Delay Interval 3
    assert read(encode.connect("c")).properties_span is None
    ack = read(encode.connack(0, session_present=True))
    assert (ack.flags, ack.body_offset, ack.remaining_length, ack.session_present) == (0, 2, 2, True)
    pub = read(encode.publish("t", b"x", qos=1, packet_id=7, retain=True))
    assert (pub.flags, pub.qos, pub.retain, pub.dup, pub.packet_id) == (3, 1, True, False, 7)


@pytest.mark.parametrize(
    ("packet", "level", "expected"),
    [
        (encode.connect("c", **FULL_CONNECT), MQTT_3_1_1,  # type: ignore[arg-type]
         "<CONNECT protocol='MQTT'/4 client_id='c' username='u' password=<hidden> keep_alive=60 "
         "clean=True will=Will(topic='w', qos=0, retain=False, payload=<1 bytes>) size=27>"),
        (encode.connect("c"), MQTT_3_1_1,
         "<CONNECT protocol='MQTT'/4 client_id='c' username=None password=None keep_alive=60 "
         "clean=True will=None size=15>"),
        (encode.connack(0), MQTT_3_1_1, "<CONNACK return_code=0 session_present=False size=4>"),
        (encode.pingreq(), MQTT_3_1_1, "<PINGREQ size=2>"),
        (encode.disconnect(), MQTT_3_1_1, "<DISCONNECT reason_code=0 size=2>"),
    ],
)  # fmt: skip
def test_reprs(packet: bytes, level: int, expected: str) -> None:
    assert repr(read(packet, level)) == expected


def test_malformed_is_a_protocol_error() -> None:
    with pytest.raises(MalformedPacket):
        read(connect_with_flags(0x03))


@pytest.mark.parametrize(
    ("data", "level", "expected"),
    [
        (b"\x00\x00", MQTT_3_1_1, "reserved packet type 0"),
        (b"\xf0\x00", MQTT_3_1_1, "reserved packet type 15"),
        (b"\xf0\x00", None, "reserved packet type 15"),
        (b"\x60\x02\x00\x01", MQTT_3_1_1, "PUBREL fixed header flags 0x0 are invalid"),
        (b"\x81\x06\x00\x01\x00\x01a\x00", MQTT_3_1_1,
         "SUBSCRIBE fixed header flags 0x1 are invalid"),
        (b"\x41\x02\x00\x01", MQTT_3_1_1, "PUBACK fixed header flags 0x1 are invalid"),
    ],
)  # fmt: skip
def test_fixed_header_reasons(data: bytes, level: int | None, expected: str) -> None:
    assert reason(data, level) == expected


@pytest.mark.parametrize(
    ("packet", "level", "flags"),
    [
        (encode.subscribe(1, [("a", 0)]), MQTT_3_1_1, 2),
        (encode.suback(1, [0]), MQTT_3_1_1, 0),
        (encode.unsubscribe(1, ["a"]), MQTT_3_1_1, 2),
        (encode.unsuback(1), MQTT_3_1_1, 0),
        (encode.pubrel(1), MQTT_3_1_1, 2),
        (encode.puback(1), MQTT_3_1_1, 0),
        (encode.pingreq(), MQTT_3_1_1, 0),
        (encode.disconnect(), MQTT_3_1_1, 0),
        (encode.auth(0x18), MQTT_5, 0),
    ],
)
def test_views_keep_flags_and_offsets(packet: bytes, level: int, flags: int) -> None:
    p = read(packet, level)
    assert (p.flags, p.body_offset, p.size) == (flags, 2, len(packet))
    assert p.remaining_length == len(packet) - 2


def test_acks_and_their_reason_codes() -> None:
    assert read(encode.unsuback(1)).reason_codes == []
    assert read(encode.unsuback(1, [0, 0x11], protocol_level=MQTT_5), MQTT_5).reason_codes == [
        0,
        0x11,
    ]
    assert read(encode.puback(3)).reason_code == 0
    assert read(encode.puback(3), MQTT_5).reason_code == 0  # omitted: success
    ack = read(encode.puback(3, reason_code=0x10, protocol_level=MQTT_5), MQTT_5)
    assert (ack.packet_id, ack.reason_code, ack.properties_span) == (3, 0x10, None)
    with_props = read(encode.pubcomp(3, reason_code=0x92, protocol_level=MQTT_5,
                                     properties=[(Property.REASON_STRING, "r")]), MQTT_5)  # fmt: skip
    assert with_props.reason_code == 0x92 and with_props.property(Property.REASON_STRING) == "r"
    bye = read(encode.disconnect(0x04, protocol_level=MQTT_5), MQTT_5)
    assert bye.reason_code == 0x04 and bye.properties_span is None
    assert read(encode.disconnect()).reason_code == 0
    assert read(encode.auth(0x18, properties=[(Property.AUTHENTICATION_METHOD, "m")]),
                MQTT_5).property(Property.AUTHENTICATION_METHOD) == "m"  # fmt: skip
