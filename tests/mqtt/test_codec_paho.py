"""The reader against packets paho-mqtt encodes (the device side of every session)."""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.mqtt import (
    MQTT_3_1,
    MQTT_3_1_1,
    MQTT_5,
    Connect,
    Disconnect,
    PacketReader,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscribe,
    Unsubscribe,
    encode,
)
from gateway.mqtt.properties import Property

from .paho_capture import PahoCapture


def parse_all(data: bytes, level: int | None = None, limit: int = 1 << 24) -> list:
    reader = PacketReader(limit, protocol_level=level)
    reader.feed(data)
    packets = reader.packets()
    assert reader.buffered == 0
    # The views hold the original bytes: concatenated they are exactly what was sent.
    assert b"".join(bytes(p.raw) for p in packets) == data
    return packets


@pytest.fixture
def capture():
    captures: list[PahoCapture] = []

    def make(*args, **kwargs) -> PahoCapture:
        c = PahoCapture(*args, **kwargs)
        captures.append(c)
        return c

    yield make
    for c in captures:
        c.close()


def connected(capture, protocol=paho.MQTTv311, **kwargs) -> PahoCapture:
    c = capture("dev1", protocol=protocol, **kwargs)
    c.connect()
    level = MQTT_5 if protocol == paho.MQTTv5 else MQTT_3_1_1
    c.server_send(encode.connack(0, protocol_level=level))
    assert c.client.is_connected()
    return c


@pytest.mark.parametrize(
    ("protocol", "level", "name"),
    [
        (paho.MQTTv31, MQTT_3_1, "MQIsdp"),
        (paho.MQTTv311, MQTT_3_1_1, "MQTT"),
        (paho.MQTTv5, MQTT_5, "MQTT"),
    ],
)
@pytest.mark.parametrize("will_qos", [None, 0, 1, 2])
def test_connect_variants(capture, protocol, level, name, will_qos):
    c = capture("device-ü/1", protocol=protocol)
    c.client.username_pw_set("myhub.azure-devices.net/device-ü/?api-version=2021-04-12", "s3cret")
    if will_qos is not None:
        c.client.will_set(
            "devices/d/messages/events/", b"\x00gone", qos=will_qos, retain=will_qos == 1
        )
    [p] = parse_all(c.connect(keepalive=1177))
    assert isinstance(p, Connect)
    assert (p.protocol_name, p.protocol_level) == (name, level)
    assert p.client_id == "device-ü/1"
    assert p.username == "myhub.azure-devices.net/device-ü/?api-version=2021-04-12"
    assert p.password == b"s3cret"
    assert p.keep_alive == 1177
    assert p.clean_session
    if will_qos is None:
        assert p.will is None
    else:
        assert p.will is not None
        assert (p.will.topic, p.will.payload, p.will.qos, p.will.retain) == (
            "devices/d/messages/events/",
            b"\x00gone",
            will_qos,
            will_qos == 1,
        )
    assert "s3cret" not in repr(p)


def test_connect_without_credentials_and_persistent_session(capture):
    c = capture("", protocol=paho.MQTTv311, clean_session=True)
    [p] = parse_all(c.connect(keepalive=0))
    assert (p.client_id, p.username, p.password, p.keep_alive) == ("", None, None, 0)
    c2 = capture("keep", protocol=paho.MQTTv311, clean_session=False)
    [p2] = parse_all(c2.connect())
    assert not p2.clean_session


def test_connect_v5_properties(capture):
    c = capture("dev5", protocol=paho.MQTTv5)
    c.client.username_pw_set("user", "pw")
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = 10
    props.UserProperty = ("k", "v")
    will_props = Properties(PacketTypes.WILLMESSAGE)
    will_props.WillDelayInterval = 5
    c.client.will_set("w", b"x", qos=1, properties=will_props)
    [p] = parse_all(c.connect(keepalive=30, properties=props))
    assert p.protocol_level == MQTT_5
    assert p.username == "user" and p.password == b"pw"
    assert dict((k, v) for k, v in p.properties if k != Property.USER_PROPERTY) == {
        Property.SESSION_EXPIRY_INTERVAL: 3600,
        Property.RECEIVE_MAXIMUM: 10,
    }
    assert (Property.USER_PROPERTY, ("k", "v")) in p.properties
    assert p.will is not None and p.will.topic == "w"


@pytest.mark.parametrize("qos", [0, 1, 2])
@pytest.mark.parametrize("size", [0, 1, 100, 16_000, 200_000])
def test_publish(capture, qos, size):
    c = connected(capture)
    payload = bytes(i % 251 for i in range(size))
    c.client.publish(
        "devices/dev1/messages/events/$.ct=a%2Fb&k=v", payload, qos=qos, retain=qos == 2
    )
    [p] = parse_all(c.read(), MQTT_3_1_1)
    assert isinstance(p, Publish)
    assert p.topic == "devices/dev1/messages/events/$.ct=a%2Fb&k=v"
    assert (p.qos, p.retain, p.dup) == (qos, qos == 2, False)
    assert bytes(p.payload) == payload
    assert (p.packet_id is None) == (qos == 0)


def test_publish_v5_properties(capture):
    c = connected(capture, protocol=paho.MQTTv5)
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    props.CorrelationData = b"\x01\x02"
    props.UserProperty = [("a", "1"), ("b", "2")]
    props.MessageExpiryInterval = 60
    c.client.publish("t/ü", b'{"x":1}', qos=1, properties=props)
    [p] = parse_all(c.read(), MQTT_5)
    assert p.topic == "t/ü" and bytes(p.payload) == b'{"x":1}'
    assert (Property.CONTENT_TYPE, "application/json") in p.properties
    assert (Property.CORRELATION_DATA, b"\x01\x02") in p.properties
    assert [v for k, v in p.properties if k == Property.USER_PROPERTY] == [("a", "1"), ("b", "2")]


def test_qos1_and_qos2_acknowledgements(capture):
    c = connected(capture)
    # Server -> paho QoS 1 PUBLISH: paho answers PUBACK.
    c.server_send(encode.publish("c2d/x", b"m1", qos=1, packet_id=7))
    [ack] = parse_all(c.read(), MQTT_3_1_1)
    assert isinstance(ack, Puback) and ack.packet_id == 7
    # Server -> paho QoS 2 PUBLISH: PUBREC, then PUBREL -> PUBCOMP.
    c.server_send(encode.publish("c2d/x", b"m2", qos=2, packet_id=8))
    [rec] = parse_all(c.read(), MQTT_3_1_1)
    assert isinstance(rec, Pubrec) and rec.packet_id == 8
    c.server_send(encode.pubrel(8))
    [comp] = parse_all(c.read(), MQTT_3_1_1)
    assert isinstance(comp, Pubcomp) and comp.packet_id == 8
    assert [m.payload for m in c.received] == [b"m1", b"m2"]
    # paho QoS 2 PUBLISH: server PUBREC -> paho PUBREL.
    info = c.client.publish("d2c", b"m3", qos=2)
    [pub] = parse_all(c.read(), MQTT_3_1_1)
    c.server_send(encode.pubrec(pub.packet_id))
    [rel] = parse_all(c.read(), MQTT_3_1_1)
    assert isinstance(rel, Pubrel) and rel.packet_id == pub.packet_id == info.mid
    assert rel.flags == 2


def test_subscribe_unsubscribe_ping_disconnect(capture):
    c = connected(capture)
    c.client.subscribe(
        [("devices/dev1/messages/devicebound/#", 1), ("$iothub/twin/res/#", 0), ("a/+/c", 2)]
    )
    c.client.unsubscribe(["a/+/c", "$iothub/twin/res/#"])
    c.client._send_pingreq()  # what paho sends when its keep-alive is due
    c.client.disconnect()
    sub, unsub, ping, disc = parse_all(c.read(), MQTT_3_1_1)
    assert isinstance(sub, Subscribe)
    assert sub.subscriptions == [
        ("devices/dev1/messages/devicebound/#", 1),
        ("$iothub/twin/res/#", 0),
        ("a/+/c", 2),
    ]
    assert isinstance(unsub, Unsubscribe) and unsub.topic_filters == ["a/+/c", "$iothub/twin/res/#"]
    assert isinstance(ping, Pingreq) and isinstance(disc, Disconnect)


def test_v5_subscribe_options_and_disconnect_reason(capture):
    c = connected(capture, protocol=paho.MQTTv5)
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = 300
    options = paho.SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True, retainHandling=2)
    c.client.subscribe([("s/#", options)], properties=props)
    c.client.unsubscribe("s/#")
    c.client.disconnect(
        reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
    )
    sub, unsub, disc = parse_all(c.read(), MQTT_5)
    assert sub.subscriptions == [("s/#", 1 | 0x04 | 0x08 | (2 << 4))]
    assert sub.properties == [(Property.SUBSCRIPTION_IDENTIFIER, 300)]
    assert unsub.topic_filters == ["s/#"]
    assert isinstance(disc, Disconnect) and disc.reason_code == 0x04


def test_byte_at_a_time_gives_the_same_packets(capture):
    c = connected(capture)
    c.client.subscribe("x/#", 1)
    c.client.publish("x/y", b"z" * 300, qos=1)
    c.client.disconnect()
    data = c.read()
    reader = PacketReader()
    out = []
    for i in range(len(data)):
        reader.feed(data[i : i + 1])
        while (p := reader.next_packet()) is not None:
            out.append(bytes(p.raw))
    assert b"".join(out) == data and len(out) == 3
