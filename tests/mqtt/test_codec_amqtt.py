"""The codec against amqtt's packet classes, an independent MQTT 3.1.1 encoder/decoder.

amqtt encodes packets of both roles (the server-side ones paho never writes);
our reader must parse them to the same fields, our encoder must produce the
same bytes for the same packet, and amqtt's decoder must read ours back.
"""

from __future__ import annotations

import asyncio

import pytest
from amqtt.adapters import StreamReaderAdapter
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.connect import ConnectPacket, ConnectPayload, ConnectVariableHeader
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.pingreq import PingReqPacket
from amqtt.mqtt.pingresp import PingRespPacket
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.mqtt.suback import SubackPacket
from amqtt.mqtt.subscribe import SubscribePacket
from amqtt.mqtt.unsuback import UnsubackPacket
from amqtt.mqtt.unsubscribe import UnsubscribePacket
from hypothesis import given
from hypothesis import strategies as st

from gateway.mqtt import (
    MQTT_3_1_1,
    Connack,
    Connect,
    Disconnect,
    PacketReader,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    encode,
)

from .strategies import packet_ids, payloads, topic_filters, topic_names


def parse_one(data: bytes):
    reader = PacketReader(1 << 24, protocol_level=MQTT_3_1_1)
    reader.feed(data)
    packet = reader.next_packet()
    assert packet is not None and reader.buffered == 0
    assert bytes(packet.raw) == data
    return packet


def amqtt_decode(cls, data: bytes):
    """Decode `data` with amqtt's own stream decoder."""

    async def run():
        stream = asyncio.StreamReader()
        stream.feed_data(data)
        stream.feed_eof()
        return await cls.from_stream(StreamReaderAdapter(stream))

    return asyncio.run(run())


def amqtt_connect(client_id, *, username=None, password=None, will=None, keep_alive=60, clean=True):
    header = ConnectVariableHeader(0, keep_alive, "MQTT", 4)
    header.clean_session_flag = clean
    payload = ConnectPayload(client_id=client_id)
    if username is not None:
        header.username_flag = True
        payload.username = username
    if password is not None:
        header.password_flag = True
        payload.password = password
    if will is not None:
        header.will_flag = True
        header.will_qos = will[2]
        header.will_retain_flag = will[3]
        payload.will_topic, payload.will_message = will[0], will[1]
    return ConnectPacket(variable_header=header, payload=payload).to_bytes()


# -- amqtt encodes, we parse -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "session_present"), [(0, 0), (0, 1), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0)]
)
def test_connack(code, session_present):
    p = parse_one(ConnackPacket.build(session_present, code).to_bytes())
    assert isinstance(p, Connack)
    assert (p.return_code, p.session_present) == (code, bool(session_present))


def test_connect_from_amqtt():
    data = amqtt_connect(
        "dev1",
        username="hub/dev1/?api-version=2021-04-12",
        password="SharedAccessSignature sr=x&sig=y&se=1",
        will=("devices/dev1/messages/events/", b"gone", 1, True),
        keep_alive=240,
    )
    p = parse_one(data)
    assert isinstance(p, Connect)
    assert p.client_id == "dev1" and p.keep_alive == 240 and p.clean_session
    assert p.username == "hub/dev1/?api-version=2021-04-12"
    assert p.password == b"SharedAccessSignature sr=x&sig=y&se=1"
    assert p.will is not None
    assert (p.will.topic, p.will.payload, p.will.qos, p.will.retain) == (
        "devices/dev1/messages/events/",
        b"gone",
        1,
        True,
    )
    assert "SharedAccessSignature" not in repr(p)


@given(
    topic=topic_names(),
    payload=payloads(),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    dup=st.booleans(),
    pid=packet_ids(),
)
def test_publish_matches_amqtt(topic, payload, qos, retain, dup, pid):
    dup = dup and qos > 0
    packet_id = pid if qos else None
    theirs = PublishPacket.build(topic, payload, packet_id, dup, qos, retain).to_bytes()
    ours = encode.publish(topic, payload, qos=qos, packet_id=packet_id, retain=retain, dup=dup)
    assert ours == theirs
    p = parse_one(theirs)
    assert isinstance(p, Publish)
    assert (p.topic, bytes(p.payload), p.qos, p.retain, p.dup, p.packet_id) == (
        topic,
        payload,
        qos,
        retain,
        dup,
        packet_id,
    )
    back = amqtt_decode(PublishPacket, ours)
    assert (back.topic_name, back.data, back.qos, back.packet_id) == (
        topic,
        payload,
        qos,
        packet_id,
    )


@pytest.mark.parametrize(
    ("amqtt_cls", "ours_cls", "encoder"),
    [
        (PubackPacket, Puback, encode.puback),
        (PubrecPacket, Pubrec, encode.pubrec),
        (PubrelPacket, Pubrel, encode.pubrel),
        (PubcompPacket, Pubcomp, encode.pubcomp),
        (UnsubackPacket, Unsuback, encode.unsuback),
    ],
)
@pytest.mark.parametrize("packet_id", [1, 255, 256, 65535])
def test_packet_id_acks(amqtt_cls, ours_cls, encoder, packet_id):
    theirs = amqtt_cls.build(packet_id).to_bytes()
    assert encoder(packet_id) == theirs
    p = parse_one(theirs)
    assert isinstance(p, ours_cls) and p.packet_id == packet_id
    assert amqtt_decode(amqtt_cls, theirs).variable_header.packet_id == packet_id


@given(
    pid=packet_ids(),
    filters=st.lists(st.tuples(topic_filters(), st.integers(0, 2)), min_size=1, max_size=5),
)
def test_subscribe_matches_amqtt(pid, filters):
    theirs = SubscribePacket.build(filters, pid).to_bytes()
    assert encode.subscribe(pid, filters) == theirs
    p = parse_one(theirs)
    assert isinstance(p, Subscribe)
    assert (p.packet_id, p.subscriptions) == (pid, filters)


@given(pid=packet_ids(), codes=st.lists(st.sampled_from([0, 1, 2, 0x80]), min_size=1, max_size=5))
def test_suback_matches_amqtt(pid, codes):
    theirs = SubackPacket.build(pid, codes).to_bytes()
    assert encode.suback(pid, codes) == theirs
    p = parse_one(theirs)
    assert isinstance(p, Suback) and (p.packet_id, p.return_codes) == (pid, codes)


@given(pid=packet_ids(), filters=st.lists(topic_filters(), min_size=1, max_size=5))
def test_unsubscribe_matches_amqtt(pid, filters):
    theirs = UnsubscribePacket.build(filters, pid).to_bytes()
    assert encode.unsubscribe(pid, filters) == theirs
    p = parse_one(theirs)
    assert isinstance(p, Unsubscribe) and (p.packet_id, p.topic_filters) == (pid, filters)


@pytest.mark.parametrize(
    ("packet", "ours_cls", "ours_bytes"),
    [
        (PingReqPacket(), Pingreq, encode.pingreq()),
        (PingRespPacket(), Pingresp, encode.pingresp()),
        (DisconnectPacket(), Disconnect, encode.disconnect()),
    ],
)
def test_empty_packets(packet, ours_cls, ours_bytes):
    theirs = packet.to_bytes()
    assert theirs == ours_bytes
    assert isinstance(parse_one(theirs), ours_cls)


# -- we encode, amqtt parses: the packets the gateway writes itself ---------------------------


@pytest.mark.parametrize("code", [1, 3, 5])
def test_gateway_connack_refusal_reads_back_in_amqtt(code):
    back = amqtt_decode(ConnackPacket, encode.connack(code))
    assert back.return_code == code and not back.session_parent


_text = st.text(max_size=40).filter(lambda s: "\x00" not in s)


@given(
    client_id=_text.filter(bool),
    keep_alive=st.integers(0, 65535),
    username=st.none() | _text,
    password=_text,
    will=st.none()
    | st.tuples(topic_names(), st.binary(max_size=50), st.integers(0, 2), st.booleans()),
)
def test_connect_round_trip_through_amqtt(client_id, keep_alive, username, password, will):
    data = encode.connect(
        client_id,
        keep_alive=keep_alive,
        username=username,
        password=password.encode() if username is not None else None,
        will_topic=will[0] if will else None,
        will_payload=will[1] if will else b"",
        will_qos=will[2] if will else 0,
        will_retain=will[3] if will else False,
    )
    p = parse_one(data)
    assert (p.client_id, p.keep_alive, p.username) == (client_id, keep_alive, username)
    back = amqtt_decode(ConnectPacket, data)
    header, payload = back.variable_header, back.payload
    assert (header.proto_name, header.proto_level, header.keep_alive) == ("MQTT", 4, keep_alive)
    assert header.flags == p.connect_flags
    assert (payload.client_id, payload.username) == (client_id, username)
    if username is not None:
        assert payload.password == password
    if will is not None:
        assert (payload.will_topic, payload.will_message) == (will[0], will[1])
        assert (header.will_qos, header.will_retain_flag) == (will[2], will[3])


@pytest.mark.parametrize("length", [0, 127, 128, 16383, 16384, 2097151, 2097152, 268435455])
def test_remaining_length_encoding_matches_amqtt(length):
    assert encode.encode_remaining_length(length) == MQTTFixedHeader(3, 0, length).to_bytes()[1:]
