"""Arbitrary bytes never make the codec raise anything but MQTTProtocolError."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.mqtt import MQTT_3_1_1, MQTT_5, MQTTProtocolError, PacketReader, RelayState, encode
from gateway.mqtt.properties import Property

V3, V5 = MQTT_3_1_1, MQTT_5

# (valid packet, the protocol level it is valid for)
SEEDS = [
    (
        encode.connect(
            "dev", username="h/dev/?api-version=1", password=b"p", will_topic="w", will_qos=1
        ),
        V3,
    ),
    (
        encode.connect(
            "dev5",
            protocol_level=V5,
            properties=[(Property.SESSION_EXPIRY_INTERVAL, 9)],
            will_topic="w",
            will_properties=[(Property.WILL_DELAY_INTERVAL, 1)],
        ),
        V5,
    ),
    (encode.connack(0), V3),
    (encode.connack(0, protocol_level=V5, properties=[(Property.SERVER_KEEP_ALIVE, 5)]), V5),
    (encode.publish("a/b", b"payload", qos=1, packet_id=3), V3),
    (
        encode.publish(
            "a/b",
            b"x",
            qos=2,
            packet_id=3,
            protocol_level=V5,
            properties=[(Property.USER_PROPERTY, ("k", "v"))],
        ),
        V5,
    ),
    (encode.subscribe(1, [("a/#", 1), ("b/+", 0)]), V3),
    (encode.subscribe(1, [("a/#", 0x2D)], protocol_level=V5), V5),
    (encode.suback(1, [0, 1, 0x80]), V3),
    (encode.unsubscribe(2, ["a/#"]), V3),
    (encode.unsuback(2, [0], protocol_level=V5), V5),
    (encode.puback(4, 0x10, protocol_level=V5, properties=[(Property.REASON_STRING, "r")]), V5),
    (encode.pubrel(4), V3),
    (encode.pingreq(), V3),
    (encode.disconnect(4, protocol_level=V5), V5),
    (encode.auth(0x18, properties=[(Property.AUTHENTICATION_DATA, b"d")]), V5),
]


def exercise(data: bytes, level: int | None) -> None:
    """Feed, frame, parse, touch every lazily decoded field, and run the session checks."""
    reader = PacketReader(4096, protocol_level=level)
    state = RelayState()
    try:
        reader.feed(data)
        while (p := reader.next_packet()) is not None:
            repr(p)
            getattr(p, "properties", None)
            getattr(p, "topic_alias", None)
            will = getattr(p, "will", None)
            if will is not None:
                repr(will)
            try:
                state.client_packet(p)
            except MQTTProtocolError:
                pass
            try:
                state.server_packet(p)
            except MQTTProtocolError:
                pass
    except MQTTProtocolError:
        pass


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), level=st.sampled_from([None, MQTT_3_1_1, MQTT_5]))
def test_random_bytes(data, level):
    exercise(data, level)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS))[0])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated(), level=st.sampled_from([None, MQTT_3_1_1, MQTT_5]))
def test_mutated_packets(data, level):
    exercise(data, level)


@pytest.mark.parametrize(("seed", "level"), SEEDS)
def test_seeds_are_valid(seed, level):
    reader = PacketReader(protocol_level=level if seed[0] >> 4 != 1 else None)
    reader.feed(seed)
    assert reader.next_packet() is not None
