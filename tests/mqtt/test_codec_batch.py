"""Framing in batches (`PacketReader.next_spans`) and the relay's fast path (`Triage`),
against packets paho-mqtt writes: spans must frame exactly what the per-packet
parser does, and the fast path must never let through a packet the parser refuses.
"""

from __future__ import annotations

import random

import paho.mqtt.client as paho
import pytest

from gateway.mqtt import MQTT_3_1_1, MQTT_5, MalformedPacket, PacketReader, PacketTooLarge, Publish
from gateway.mqtt.reader import parse_span
from gateway.mqtt.triage import CLIENT, SERVER, Triage

from .paho_capture import PahoCapture


def paho_session(protocol: int = paho.MQTTv311) -> bytes:
    """The bytes of a paho session: CONNECT, PUBLISH QoS 0/1/2, SUBSCRIBE, PING, ..."""
    capture = PahoCapture(protocol=protocol)
    try:
        data = capture.connect()
        for i in range(20):
            capture.client.publish(
                "devices/dev1/messages/events/", bytes([i]) * (i * 37), qos=i % 3
            )
        capture.client.subscribe("devices/dev1/messages/devicebound/#", qos=1)
        capture.client.unsubscribe("devices/dev1/messages/devicebound/#")
        capture.client.publish("$iothub/twin/GET/?$rid=1", b"", qos=0)
        capture.client._send_pingreq()
        capture.client.disconnect()
        return data + capture.read()
    finally:
        capture.close()


@pytest.fixture(scope="module")
def session_bytes() -> bytes:
    return paho_session()


def spans_in_pieces(data: bytes, cut: random.Random, level: int | None = None):
    reader = PacketReader(1 << 20, protocol_level=level)
    out = []
    pos = 0
    while pos < len(data):
        step = cut.randint(1, 300)
        reader.feed(data[pos : pos + step])
        pos += step
        buf, spans = reader.next_spans()
        out += [(bytes(buf[s:e]), first, body - s) for first, s, body, e in spans]
    assert reader.buffered == 0
    return out


@pytest.mark.parametrize("seed", range(5))
def test_spans_frame_as_the_parser_does(session_bytes, seed):
    framed = spans_in_pieces(session_bytes, random.Random(seed))
    reader = PacketReader(1 << 20)
    reader.feed(session_bytes)
    packets = reader.packets()
    assert [raw for raw, _, _ in framed] == [bytes(p.raw) for p in packets]
    assert [first >> 4 for _, first, _ in framed] == [int(p.type) for p in packets]
    assert [off for _, _, off in framed] == [p.body_offset for p in packets]


def test_framing_error_behind_good_packets_comes_after_them(session_bytes):
    reader = PacketReader(1 << 20)
    reader.feed(session_bytes + b"\x00\x00")
    buf, spans = reader.next_spans()
    assert bytes(buf[spans[0][1] : spans[-1][3]]) == session_bytes
    with pytest.raises(MalformedPacket):
        reader.next_spans()
    with pytest.raises(MalformedPacket):
        reader.next_spans()  # and stays failed


def test_size_refused_before_the_body_arrives():
    reader = PacketReader(100)
    reader.feed(b"\x30\xff\x01")  # PUBLISH of 255 bytes, nothing of it yet
    with pytest.raises(PacketTooLarge):
        reader.next_spans()


def test_fast_path_only_for_checked_topics(session_bytes):
    reader = PacketReader(1 << 20)
    reader.feed(session_bytes)
    buf, spans = reader.next_spans()
    spans = spans[1:]  # after CONNECT
    triage = Triage(CLIENT, MQTT_3_1_1)
    first_publish = 0
    assert triage.fast_prefix(buf, spans) == first_publish  # topic not seen yet
    packet = parse_span(buf, spans[first_publish], MQTT_3_1_1)
    assert isinstance(packet, Publish)
    triage.learn_topic(packet)
    stop = triage.fast_prefix(buf, spans)
    # Every PUBLISH to that topic and every PUBREL passes; the SUBSCRIBE does not.
    kinds = [first >> 4 for first, _, _, _ in spans]
    assert stop == kinds.index(8)
    assert all(kind in (3, 6) for kind in kinds[:stop])


@pytest.mark.parametrize(
    "raw",
    [
        b"\x32\x05\x00\x01t\x00\x00",  # QoS 1 with packet id 0
        b"\x32\x03\x00\x01t",  # QoS 1 without a packet id
        b"\x30\x02\x00\x05",  # topic longer than the packet
        b"\x40\x02\x00\x00",  # PUBACK id 0
        b"\x40\x03\x00\x01\x00",  # PUBACK too long for 3.1.1
        b"\xd0\x01\x00",  # PINGRESP with a body
        b"\x30\x06\x00\x02t+xx",  # a new topic (wildcard: the parser refuses it)
    ],
)
def test_fast_path_leaves_the_unusual_to_the_parser(raw):
    known = b"\x30\x03\x00\x01t"
    for side in (CLIENT, SERVER):
        triage = Triage(side, MQTT_3_1_1)
        reader = PacketReader(1 << 20, protocol_level=MQTT_3_1_1)
        reader.feed(known)
        buf, spans = reader.next_spans()
        triage.learn_topic(parse_span(buf, spans[0], MQTT_3_1_1))
        reader.feed(known + raw)
        buf, spans = reader.next_spans()
        assert triage.fast_prefix(buf, spans) == 1


def test_mqtt5_publish_always_parsed():
    session = paho_session(paho.MQTTv5)
    reader = PacketReader(1 << 20)
    reader.feed(session)
    buf, spans = reader.next_spans()
    publish = next(i for i, s in enumerate(spans) if s[0] >> 4 == 3)
    triage = Triage(CLIENT, MQTT_5)
    triage.learn_topic(parse_span(buf, spans[publish], MQTT_5))
    assert triage.fast_prefix(buf, spans, publish) == publish
