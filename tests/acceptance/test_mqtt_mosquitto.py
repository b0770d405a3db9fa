"""MQTT through `iot-gateway run`, with mosquitto as the TLS upstream.

paho devices connect to the gateway's plaintext listener; a second paho client connected
to mosquitto directly (TLS, verified chain) observes what crossed the gateway.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.waiting import FAILSAFE

from .conftest import Pki
from .gateway_proc import GatewayProcess, settled_delta, snapshot, start_gateway, write_config
from .mqtt_peers import (
    MOSQUITTO,
    PINGREQ,
    PINGRESP,
    Mosquitto,
    PahoClient,
    raw_connect,
    recv_exact,
    start_mosquitto,
)

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto is not installed"),
]

HUB = "myhub.azure-devices.net"
TOKEN = "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev&sig=abc%3D&se=4102444800"


@dataclass
class MqttStack:
    broker: Mosquitto
    gateway: GatewayProcess
    observer: PahoClient
    pki: Pki

    @property
    def port(self) -> int:
        return self.gateway.port("mqtt")

    def device(self, client_id: str, username: str | None = None, **kwargs: object) -> PahoClient:
        dev = PahoClient(
            client_id, username=username, password=TOKEN if username else None, **kwargs
        )  # type: ignore[arg-type]
        rc = dev.connect_plain(self.port)
        assert rc == 0, f"CONNACK {rc}"
        return dev

    def observed(self, topic_prefix: str, count: int, timeout: float = FAILSAFE) -> list:
        """The next `count` messages the direct subscriber saw under topic_prefix."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            msg = self.observer.receive(timeout=max(0.01, deadline - time.monotonic()))
            if msg.topic.startswith(topic_prefix):
                out.append(msg)
        return out


def mqtt_gateway_yaml(pki: Pki, broker_port: int) -> str:
    return f"""\
gateway:
  id: acceptance-gw-mqtt
admin:
  listen: 127.0.0.1:0
log: {{level: info, format: text}}
tls_profiles:
  upstream:
    ca_file: {pki.ca_file}
    server_name: {pki.server_name}
listeners:
  - {{name: mqtt, protocol: mqtt, bind: "127.0.0.1:0", handshake_timeout: 2s}}
connectors:
  - {{name: broker, protocol: mqtt, host: 127.0.0.1, port: {broker_port}, tls_profile: upstream}}
mqtt_routes:
  - {{hub: "*", connector: broker}}
"""


@pytest.fixture(scope="module")
def mqtt_stack(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[MqttStack]:
    tmp = tmp_path_factory.mktemp("gw-mqtt")
    broker = start_mosquitto(tmp, pki.cert_file, pki.key_file)
    gw = None
    observer = PahoClient("acceptance-observer")
    try:
        gw = start_gateway(
            write_config(tmp, mqtt_gateway_yaml(pki, broker.port)),
            listeners=("mqtt",),
            extra_args=("--trace", "mqtt"),
        )
        assert observer.connect_tls(broker.port, pki.ca_file, pki.server_name) == 0
        assert observer.subscribe("#", qos=1) == [1]
        yield MqttStack(broker, gw, observer, pki)
    finally:
        observer.close()
        if gw is not None:
            gw.stop()
        broker.stop()


@pytest.mark.parametrize(
    ("client_id", "username"),
    [
        ("dev1", f"{HUB}/dev1/?api-version=2021-04-12"),
        ("plain-user", "sensor-7"),
        ("no-user", None),
    ],
)
def test_publish_qos0_and_qos1_arrive_identical(
    mqtt_stack: MqttStack, client_id: str, username: str | None
) -> None:
    dev = mqtt_stack.device(client_id, username)
    try:
        topic = f"devices/{client_id}/messages/events/$.ct=application%2Fjson&$.ce=utf-8&p=a%20b"
        payloads = [bytes(range(256)), b'{"t": 21.5}', b"", "ünïcode ✓".encode()]
        for i, payload in enumerate(payloads):
            dev.publish(topic, payload, qos=i % 2)
        seen = mqtt_stack.observed(f"devices/{client_id}/", len(payloads))
        assert [(m.topic, m.payload, m.qos) for m in seen] == [
            (topic, p, i % 2) for i, p in enumerate(payloads)
        ]
    finally:
        dev.close()


def test_many_qos1_in_flight_and_a_large_payload(mqtt_stack: MqttStack) -> None:
    dev = mqtt_stack.device("bulk", f"{HUB}/bulk/?api-version=2021-04-12")
    try:
        topic = "devices/bulk/messages/events/"
        payloads = [b"%05d" % i + bytes(i % 251 for _ in range(i % 300)) for i in range(300)]
        infos = [dev.client.publish(topic, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(20)
        big = bytes(range(256)) * 800  # 200 KiB, below the default max_packet_size
        dev.publish(topic, big, qos=1, timeout=FAILSAFE)
        seen = mqtt_stack.observed("devices/bulk/", len(payloads) + 1, timeout=FAILSAFE)
        assert [m.payload for m in seen] == [*payloads, big]
    finally:
        dev.close()


def test_subscribe_round_trip_bytes_identical(mqtt_stack: MqttStack) -> None:
    dev = mqtt_stack.device("c2d-dev", f"{HUB}/c2d-dev/?api-version=2021-04-12")
    try:
        assert dev.subscribe("devices/c2d-dev/messages/devicebound/#", qos=1) == [1]
        sent = []
        for i in range(5):
            topic = f"devices/c2d-dev/messages/devicebound/%24.mid={i}&%24.to=%2Fdevices%2Fc2d-dev&k=v{i}"
            payload = bytes([i]) * (i * 1000) + b"\xff\x00end"
            mqtt_stack.observer.publish(topic, payload, qos=1)
            sent.append((topic, payload))
        got = dev.receive_n(5)
        assert [(m.topic, m.payload, m.qos) for m in got] == [(t, p, 1) for t, p in sent]
    finally:
        dev.close()


def test_will_published_on_abrupt_device_loss(mqtt_stack: MqttStack) -> None:
    will_topic = "devices/will-dev/messages/events/iothub-MessageType=Will"
    dev = mqtt_stack.device(
        "will-dev",
        f"{HUB}/will-dev/?api-version=2021-04-12",
        will=(will_topic, b"device lost \x00\x01", 1),
    )
    dev.publish("devices/will-dev/messages/events/", b"alive", qos=1)
    assert mqtt_stack.observed("devices/will-dev/", 1)[0].payload == b"alive"
    dev.drop()
    will = mqtt_stack.observed("devices/will-dev/", 1, timeout=FAILSAFE)[0]
    assert (will.topic, will.payload, will.qos) == (will_topic, b"device lost \x00\x01", 1)


def test_clean_disconnect_publishes_no_will(mqtt_stack: MqttStack) -> None:
    will_topic = "devices/tidy-dev/messages/events/will"
    dev = mqtt_stack.device("tidy-dev", "tidy", will=(will_topic, b"should not appear", 0))
    dev.close()
    # A marker published afterwards by another client must be the next thing seen.
    marker = mqtt_stack.device("tidy-marker", "tidy2")
    try:
        marker.publish("devices/tidy-dev/messages/events/marker", b"marker", qos=1)
        assert mqtt_stack.observed("devices/tidy-dev/", 1)[0].payload == b"marker"
    finally:
        marker.close()


def test_keepalive_ping_round_trip_and_silence_closes(mqtt_stack: MqttStack) -> None:
    sock = raw_connect(mqtt_stack.port, "ka-dev", keepalive=1)
    try:
        sock.sendall(PINGREQ)
        assert recv_exact(sock, 2) == PINGRESP
        # Now stay silent: with keep-alive 1 s the device must be closed after ~1.5 s.
        started = time.monotonic()
        sock.settimeout(10)
        closed = False
        try:
            while sock.recv(1024):
                pass
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        elapsed = time.monotonic() - started
        print(f"silent device closed after {elapsed:.2f}s")
        assert closed, "a silent device was never closed"
        assert 1.0 <= elapsed <= 5.0, f"closed after {elapsed:.2f}s"
    finally:
        sock.close()


def test_metrics_match_what_crossed(mqtt_stack: MqttStack) -> None:
    gw = mqtt_stack.gateway
    before = snapshot(gw)
    dev = mqtt_stack.device("metrics-dev", f"{HUB}/metrics-dev/?api-version=2021-04-12")
    try:
        d2c = [(b"q1-%d" % i, 1) for i in range(5)] + [(b"q0-%d" % i, 0) for i in range(3)]
        for payload, qos in d2c:
            dev.publish("devices/metrics-dev/messages/events/", payload, qos=qos)
        seen = mqtt_stack.observed("devices/metrics-dev/", len(d2c))
        assert dev.subscribe("devices/metrics-dev/messages/devicebound/#", qos=1) == [1]
        for i in range(4):
            mqtt_stack.observer.publish(
                "devices/metrics-dev/messages/devicebound/x", b"c2d-%d" % i, qos=1
            )
        got = dev.receive_n(4)
    finally:
        dev.close()
    expected = {
        ("iotgw_device_connections_total", (("protocol", "mqtt"),)): 1,
        ("iotgw_messages_total", (("direction", "in"),)): len(seen),
        ("iotgw_messages_total", (("direction", "out"),)): len(got),
        ("iotgw_mqtt_packets_total", (("direction", "in"), ("type", "PUBLISH"))): len(seen),
        ("iotgw_mqtt_packets_total", (("direction", "out"), ("type", "PUBACK"))): 5,
        ("iotgw_mqtt_packets_total", (("direction", "out"), ("type", "PUBLISH"))): len(got),
        ("iotgw_mqtt_packets_total", (("direction", "in"), ("type", "PUBACK"))): len(got),
        ("iotgw_mqtt_packets_total", (("direction", "in"), ("type", "SUBSCRIBE"))): 1,
    }
    for (name, labels), want in expected.items():
        value = settled_delta(gw, before, name, want, **dict(labels))
        assert value == want, f"{name}{dict(labels)}: metric {value}, observed {want}"
    gw.wait_metric("iotgw_device_connections_open", lambda v: v == 0, protocol="mqtt")


def test_api_connections_lists_a_live_mqtt_session(mqtt_stack: MqttStack) -> None:
    dev = mqtt_stack.device("api-dev", f"{HUB}/api-dev/?api-version=2021-04-12")
    try:
        dev.publish("devices/api-dev/messages/events/", b"hello", qos=1)
        status, body, _ = mqtt_stack.gateway.http_get("/api/connections")
        assert status == 200
        connections = json.loads(body)
        assert any(c.get("protocol") == "mqtt" for c in connections), body
    finally:
        dev.close()


def test_mqtt5_session_with_user_properties_relayed_unchanged(mqtt_stack: MqttStack) -> None:
    watcher = PahoClient("v5-watcher", protocol=paho.MQTTv5)
    dev = PahoClient("v5-dev", username="v5-user", password="pw", protocol=paho.MQTTv5)
    try:
        assert (
            watcher.connect_tls(
                mqtt_stack.broker.port, mqtt_stack.pki.ca_file, mqtt_stack.pki.server_name
            )
            == 0
        )
        assert watcher.subscribe("v5/#", qos=1) == [1]
        rc = dev.connect_plain(mqtt_stack.port)
        assert rc == 0, rc
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("iothub-app", "accept"), ("ünï", "çødé")]
        props.ContentType = "application/json"
        dev.publish("v5/devices/v5-dev/events", b'{"v": 5}', qos=1, properties=props)
        got = watcher.receive()
        assert (got.topic, got.payload, got.qos) == ("v5/devices/v5-dev/events", b'{"v": 5}', 1)
        assert got.user_properties == [("iothub-app", "accept"), ("ünï", "çødé")]
    finally:
        dev.close()
        watcher.close()


def test_retained_message_reaches_a_later_subscriber_through_the_gateway(
    mqtt_stack: MqttStack,
) -> None:
    topic = "retained/devices/ret-dev/state"
    mqtt_stack.observer.publish(topic, b"retained-state", qos=1, retain=True)
    dev = mqtt_stack.device("ret-dev", "ret-user")
    try:
        assert dev.subscribe(topic, qos=1) == [1]
        got = dev.receive()
        assert (got.topic, got.payload, got.retain) == (topic, b"retained-state", True)
    finally:
        dev.close()
        mqtt_stack.observer.publish(topic, b"", qos=1, retain=True)


def test_persistent_session_gets_queued_messages_after_reconnect(mqtt_stack: MqttStack) -> None:
    topic = "devices/persist-dev/messages/devicebound/q"
    dev = PahoClient("persist-dev", username="persist", password="pw", clean_session=False)
    assert dev.connect_plain(mqtt_stack.port) == 0
    assert dev.subscribe("devices/persist-dev/messages/devicebound/#", qos=1) == [1]
    dev.close()
    mqtt_stack.observer.publish(topic, b"queued while away", qos=1)
    again = PahoClient("persist-dev", username="persist", password="pw", clean_session=False)
    try:
        assert again.connect_plain(mqtt_stack.port) == 0
        got = again.receive()
        assert (got.topic, got.payload, got.qos) == (topic, b"queued while away", 1)
    finally:
        again.close()
        cleanup = PahoClient("persist-dev", clean_session=True)
        if cleanup.connect_plain(mqtt_stack.port) == 0:
            cleanup.close()


def test_second_connection_with_the_same_client_id_kicks_the_first(mqtt_stack: MqttStack) -> None:
    first = mqtt_stack.device("dup-dev", "dup")
    second = mqtt_stack.device("dup-dev", "dup")
    try:
        first.disconnects.get(timeout=FAILSAFE)
        second.publish("devices/dup-dev/messages/events/", b"still here", qos=1)
        assert mqtt_stack.observed("devices/dup-dev/", 1)[0].payload == b"still here"
    finally:
        first.close()
        second.close()


def test_oversize_packet_closes_only_that_device(mqtt_stack: MqttStack) -> None:
    bystander = mqtt_stack.device("size-ok", "size-ok")
    sock = raw_connect(mqtt_stack.port, "size-big", keepalive=30)
    try:
        # PUBLISH QoS 0 with a remaining length of 300,000 (> 256 KiB + header room).
        topic = b"devices/size-big/messages/events/"
        body = struct.pack(">H", len(topic)) + topic + b"x" * (300_000 - 2 - len(topic))
        length = len(body)
        header = bytearray([0x30])
        while True:
            byte, length = length % 128, length // 128
            header.append(byte | (0x80 if length else 0))
            if not length:
                break
        sock.settimeout(10)
        try:
            sock.sendall(bytes(header) + body)
            closed = sock.recv(1024) == b""
        except (ConnectionResetError, BrokenPipeError):
            closed = True
        assert closed, "an oversize PUBLISH did not close the device"
        bystander.publish("devices/size-ok/messages/events/", b"unaffected", qos=1)
        assert mqtt_stack.observed("devices/size-ok/", 1)[0].payload == b"unaffected"
        assert not [
            m for m in _drain(mqtt_stack.observer) if m.topic.startswith("devices/size-big/")
        ]
    finally:
        sock.close()
        bystander.close()


def test_device_that_never_sends_connect_is_closed(mqtt_stack: MqttStack) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", mqtt_stack.port), timeout=15) as sock:
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed <= 5.0, f"closed after {elapsed:.1f}s with handshake_timeout 2s"


def _drain(client: PahoClient) -> list:
    out = []
    while True:
        try:
            out.append(client.messages.get_nowait())
        except Exception:
            return out


def test_trace_shows_packets_but_not_passwords_or_payloads(mqtt_stack: MqttStack) -> None:
    secret = "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Ftrace-dev&sig=VHJhY2VTZWNyZXQ%3D&se=1"
    dev = PahoClient(
        "trace-dev", username=f"{HUB}/trace-dev/?api-version=2021-04-12", password=secret
    )
    try:
        assert dev.connect_plain(mqtt_stack.port) == 0
        dev.publish("devices/trace-dev/messages/events/", b"payload-that-must-not-be-logged", qos=1)
    finally:
        dev.close()
    mqtt_stack.gateway.wait_metric("iotgw_mqtt_sessions_closed_total", lambda v: v >= 1)
    log = mqtt_stack.gateway.log()
    assert "trace-dev" in log and "PUBLISH" in log, "no MQTT packet trace for the session"
    assert "VHJhY2VTZWNyZXQ" not in log and secret not in log, "the MQTT password reached the log"
    assert "payload-that-must-not-be-logged" not in log, "a payload reached the log"


def test_api_routes_lists_mqtt_routes(mqtt_stack: MqttStack) -> None:
    status, body, _ = mqtt_stack.gateway.http_get("/api/routes")
    assert status == 200
    assert "broker" in body, body
