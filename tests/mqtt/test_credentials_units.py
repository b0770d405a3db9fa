"""Pieces of gateway-held MQTT credentials: the CONNECT rewrite and the session tracker.

CONNECTs come from paho (captured off a socket); rewritten ones are read back
with amqtt's decoder (3.1.1) or field by field here (5.0), and an MQTT 5
device runs through the relay against mosquitto, an independent broker.
"""

from __future__ import annotations

import asyncio

import paho.mqtt.client as paho
import pytest
import trio
from amqtt.adapters import StreamReaderAdapter
from amqtt.mqtt.connect import ConnectPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.auth.credentials import CredentialStore
from gateway.config import parse_config_text
from gateway.daemon import serve_mqtt_listener
from gateway.mqtt import PacketReader, encode
from gateway.mqtt.tracking import SessionTracker

from .paho_capture import PahoCapture
from .paho_device import PahoDevice

TOKEN = b"SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev1&sig=abc&se=1"
USER = "myhub.azure-devices.net/dev1/?api-version=2021-04-12"


def capture_connect(protocol: int, password: str | None, will: bool) -> bytes:
    capture = PahoCapture("dev1", protocol=protocol)
    try:
        capture.client.username_pw_set(USER, password)
        if will:
            capture.client.will_set("devices/dev1/messages/events/", b"gone", qos=1)
        kwargs = {}
        if protocol == paho.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 120
            kwargs["properties"] = props
        return capture.connect(keepalive=45, **kwargs)
    finally:
        capture.close()


def parse(data: bytes):
    reader = PacketReader()
    reader.feed(data)
    packet = reader.next_packet()
    assert packet is not None and reader.buffered == 0
    return packet


def amqtt_connect(data: bytes) -> ConnectPacket:
    async def run():
        stream = asyncio.StreamReader()
        stream.feed_data(data)
        stream.feed_eof()
        return await ConnectPacket.from_stream(StreamReaderAdapter(stream))

    return asyncio.run(run())


@pytest.mark.parametrize("will", [False, True])
@pytest.mark.parametrize("password", ["local-password", None])
def test_token_put_into_a_paho_connect_read_by_amqtt(password, will):
    original = capture_connect(paho.MQTTv311, password, will)
    rewritten = encode.connect_with_password(parse(original), TOKEN)
    before, after = amqtt_connect(original), amqtt_connect(rewritten)
    assert after.payload.password == TOKEN.decode()
    assert after.variable_header.password_flag
    for field in ("client_id", "username", "will_topic", "will_message"):
        assert getattr(after.payload, field) == getattr(before.payload, field)
    for field in ("keep_alive", "clean_session_flag", "will_flag", "will_qos", "username_flag"):
        assert getattr(after.variable_header, field) == getattr(before.variable_header, field)


def test_password_removed_for_an_x509_device_read_by_amqtt():
    original = capture_connect(paho.MQTTv311, "local-password", True)
    rewritten = encode.connect_with_password(parse(original), None)
    after = amqtt_connect(rewritten)
    assert not after.variable_header.password_flag
    assert after.payload.password is None
    assert after.payload.username == USER and after.payload.will_message == b"gone"


def test_mqtt5_connect_rewritten_byte_for_byte():
    """Everything before the password field is unchanged but the flags byte."""
    original = capture_connect(paho.MQTTv5, "local-password", True)
    rewritten = encode.connect_with_password(parse(original), TOKEN)

    def body(data: bytes) -> bytes:
        i = 1
        while data[i] & 0x80:
            i += 1
        return data[i + 1 :]

    old, new = body(original), body(rewritten)
    flags_at = 2 + 4 + 1  # "MQTT" and the level
    assert old[:flags_at] == new[:flags_at] and old[flags_at] == new[flags_at]  # flags kept
    cut = len(old) - 2 - len(b"local-password")
    assert new[:cut] == old[:cut]
    assert new[cut:] == len(TOKEN).to_bytes(2, "big") + TOKEN
    assert parse(rewritten).connect_flags == parse(original).connect_flags


def test_mqtt311_connect_without_user_name_cannot_carry_a_password():
    with pytest.raises(ValueError):
        encode.connect_with_password(parse(encode.connect("dev1")), TOKEN)


# -- the tracker ------------------------------------------------------------------------------


def test_tracker_replays_what_the_hub_has_not_answered():
    tracker = SessionTracker(4)
    sub = parse(encode.subscribe(1, [("devices/dev1/messages/devicebound/#", 1)]))
    assert tracker.client_packet(sub)
    assert tracker.server_packet(parse(encode.suback(1, [1])), 0)
    assert tracker.subscriptions == {"devices/dev1/messages/devicebound/#": 1}
    refused = parse(encode.subscribe(2, [("$iothub/methods/POST/#", 0)]))
    tracker.client_packet(refused)
    tracker.server_packet(parse(encode.suback(2, [0x80])), 0)
    assert list(tracker.subscriptions) == ["devices/dev1/messages/devicebound/#"]

    for pid in (10, 11, 12):
        tracker.client_packet(parse(encode.publish("t", b"x", qos=1, packet_id=pid)))
    tracker.client_packet(parse(encode.publish("t", b"q0")))
    tracker.server_packet(parse(encode.puback(11)), 0)
    pending_sub = parse(encode.subscribe(3, [("$iothub/twin/res/#", 0)]))
    tracker.client_packet(pending_sub)
    tracker.client_packet(parse(encode.pingreq()))

    replay = tracker.next_generation()
    assert tracker.generation == 1
    resub = parse(replay.resubscribe)
    assert resub.subscriptions == [("devices/dev1/messages/devicebound/#", 1)]
    assert resub.packet_id not in (10, 12, 3)
    resent = [parse(raw) for raw in replay.resend]
    assert [(p.type.name, p.packet_id) for p in resent] == [
        ("PUBLISH", 10),
        ("PUBLISH", 12),
        ("SUBSCRIBE", 3),
    ]
    assert resent[0].dup and resent[1].dup
    assert replay.pings == 1 and len(replay.packets()) == 5
    # The gateway's own SUBACK is swallowed, the device's is relayed.
    assert not tracker.server_packet(parse(encode.suback(resub.packet_id, [1])), 1)
    assert tracker.server_packet(parse(encode.suback(3, [0])), 1)


def test_device_acks_for_a_retired_connection_are_dropped():
    tracker = SessionTracker(4)
    tracker.server_packet(parse(encode.publish("c2d", b"a", qos=1, packet_id=7)), 0)
    tracker.server_packet(parse(encode.publish("c2d", b"b", qos=1, packet_id=8)), 0)
    tracker.client_packet(parse(encode.puback(7)))  # acked on the old connection
    tracker.next_generation()
    # The new connection reuses id 8 before the device acked the old 8.
    tracker.server_packet(parse(encode.publish("c2d", b"c", qos=1, packet_id=8)), 1)
    assert not tracker.client_packet(parse(encode.puback(8)))  # the old 8: dropped
    assert tracker.client_packet(parse(encode.puback(8)))  # the new 8: forwarded
    assert tracker.client_packet(parse(encode.puback(99)))  # unknown: forwarded as is
    assert tracker.dropped_acks == 1


def test_tracker_is_bounded():
    tracker = SessionTracker(4, max_unacked=3)
    for pid in (1, 2):
        tracker.client_packet(parse(encode.publish("t", b"x", qos=1, packet_id=pid)))
    assert not tracker.full
    tracker.client_packet(parse(encode.publish("t", b"x", qos=1, packet_id=2)))  # DUP resend
    assert tracker.unacked == 2
    tracker.client_packet(parse(encode.publish("t", b"x", qos=1, packet_id=3)))
    assert tracker.full
    tracker.server_packet(parse(encode.puback(1)), 0)
    assert not tracker.full


# -- MQTT 5 through the relay, against mosquitto ---------------------------------------------


async def test_mqtt5_device_with_gateway_credentials_through_mosquitto(
    nursery, mosquitto, certs, tmp_path
):
    """mosquitto (no auth) checks the rewritten MQTT 5 CONNECT is well formed and the
    session works; the token's content is checked against hubsim elsewhere."""
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text("dev1-key: " + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\n")
    secrets.chmod(0o600)
    config = parse_config_text(
        f"""
admin: {{enabled: false}}
tls_profiles:
  upstream: {{ca_file: {certs.ca_file}}}
listeners:
  - {{name: mqtt, protocol: mqtt, bind: "127.0.0.1:0"}}
connectors:
  - {{name: broker, protocol: mqtt, host: 127.0.0.1, port: {mosquitto.port}, tls_profile: upstream}}
mqtt_routes:
  - {{hub: "*", connector: broker}}
credentials:
  secrets_file: {secrets}
  devices:
    - {{id: dev1, key: dev1-key, trust: network}}
""",
        "gateway.yaml",
    )
    store = CredentialStore.from_config(config.credentials)
    bound = await nursery.start(
        lambda task_status: serve_mqtt_listener(
            config.listeners[0], config, task_status=task_status, credentials=store
        )
    )
    device = PahoDevice("dev1", protocol=paho.MQTTv5, username=USER, password="ignored")
    try:
        assert await device.connect(bound[0][1]) == 0
        await device.subscribe("v5/echo", qos=1)
        await device.publish("v5/echo", b"through", qos=1)
        msg = await device.receive()
        assert (msg.topic, msg.payload) == ("v5/echo", b"through")
    finally:
        await trio.to_thread.run_sync(device.close)


def test_mqtt5_topic_alias_written_out_for_a_new_connection():
    tracker = SessionTracker(5)

    def publish(topic: str, pid: int) -> bytes:
        return encode.publish(
            topic, b"x", qos=1, packet_id=pid, protocol_level=5, properties=[(0x23, 1)]
        )

    def parse5(data: bytes):
        reader = PacketReader(protocol_level=5)
        reader.feed(data)
        return reader.next_packet()

    first = parse5(publish("devices/d/messages/events/", 1))
    assert tracker.client_packet(first) == first.raw
    second = parse5(publish("", 2))
    assert tracker.client_packet(second) == second.raw  # the connection knows alias 1
    tracker.server_packet(parse5(encode.puback(1, protocol_level=5)), 0)

    replay = tracker.next_generation()
    (resent,) = [parse5(raw) for raw in replay.resend]
    assert (resent.topic, resent.topic_alias, resent.packet_id, resent.dup) == (
        "devices/d/messages/events/", 1, 2, True,
    )  # fmt: skip
    # The retransmission taught the new connection alias 1: alias-only is fine again.
    third = parse5(publish("", 3))
    assert tracker.client_packet(third) == third.raw


def test_mqtt5_alias_only_publish_after_renewal_gets_its_topic():
    tracker = SessionTracker(5)
    props = [(0x23, 4)]
    named = encode.publish("t/a", b"1", protocol_level=5, properties=props)
    reader = PacketReader(protocol_level=5)
    reader.feed(named + encode.publish("", b"2", protocol_level=5, properties=props))
    tracker.client_packet(reader.next_packet())
    tracker.next_generation()
    alias_only = reader.next_packet()
    sent = tracker.client_packet(alias_only)
    check = PacketReader(protocol_level=5)
    check.feed(sent)
    rewritten = check.next_packet()
    assert (rewritten.topic, rewritten.topic_alias, bytes(rewritten.payload)) == ("t/a", 4, b"2")
    assert tracker.client_packet(alias_only) == alias_only.raw  # learnt now
