"""Token renewal under a live MQTT session, unseen by the device.

A 3-second token (renewed at 80 %) under a stream of QoS 1 telemetry and C2D
messages: hubsim (token_skew 0) closes any connection whose token expires
and verifies every new CONNECT's token; paho must see no disconnect, get
exactly one PUBACK per publish, and the hub must have recorded every message.
"""

from __future__ import annotations

import collections
import logging
import re
import ssl
import threading
import time

import paho.mqtt.client as paho
import pytest
import trio
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.auth.credentials import CredentialStore
from gateway.config import parse_config_text
from gateway.daemon import serve_mqtt_listener
from gateway.hubsim import HubSim
from gateway.mqtt_relay import CloseReason, Opened, UpstreamUnavailable, relay_mqtt_connection
from gateway.mqtt_relay.credentials import MqttCredentials
from gateway.mqtt_relay.renewal import RenewalMode

from .paho_device import PahoDevice
from .test_credentials_hubsim import (
    EVENTS,
    HUB,
    WAIT,
    Keys,
    Observer,
    credentials_yaml,
    gateway_config,
    no_secrets_in,
    username,
    wait_for,
)

C2D = "devices/{}/messages/devicebound/#"
PAUSE_RE = re.compile(r"device paused ([0-9.]+) ms")


class CountingObserver(Observer):
    def __init__(self) -> None:
        super().__init__()
        self.packets: collections.Counter[tuple[str, str]] = collections.Counter()

    def on_packet(self, direction, packet_type, nbytes):
        self.packets[(direction, packet_type)] += 1

    def on_upstream_open(self, connector):
        self.packets[("upstream", "open")] += 1

    def on_upstream_close(self, connector):
        self.packets[("upstream", "close")] += 1


@pytest.fixture
def keys() -> Keys:
    return Keys()


@pytest.fixture
def hub(keys: Keys):
    sim = HubSim(keys.hub_devices(), hub_host=HUB, amqp_port=None, token_skew=0)
    with sim:
        yield sim
    sim.close()


async def start_short_token_relay(nursery, hub, keys, tmp_path, **options):
    observer = CountingObserver()
    section = credentials_yaml(tmp_path, keys, hub, token_ttl="3s", renew_at=0.8)
    config = gateway_config(hub, section)
    store = CredentialStore.from_config(config.credentials)

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        await serve_mqtt_listener(
            config.listeners[0],
            config,
            task_status=task_status,
            observer=observer,
            credentials=store,
            **options,
        )

    bound = await nursery.start(serve)
    return bound[0][1], observer


class Stream:
    """Publishes QoS 1 telemetry from a worker thread for `seconds`, paced, and
    counts paho's completions per message id."""

    def __init__(self, device: PahoDevice, device_id: str) -> None:
        self.device = device
        self.topic = EVENTS.format(device_id)
        self.sent: list[bytes] = []
        self.completed: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()
        device.client.on_publish = self._on_publish

    def _on_publish(self, client, userdata, mid, reason, props):
        with self._lock:
            self.completed[mid] += 1

    def publish_one(self, n: int, body: bytes):
        return self.device.client.publish(self.topic, body, qos=1)

    def run(self, seconds: float, interval: float = 0.02) -> list:
        infos = []
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            body = f"m{n:05d}".encode()
            infos.append(self.publish_one(n, body))
            self.sent.append(body)
            n += 1
            time.sleep(interval)  # pacing the stream, not synchronising
        for info in infos:
            info.wait_for_publish(timeout=WAIT)
        return infos


async def send_c2d_during(hub: HubSim, device_id: str, seconds: float) -> list[str]:
    ids = []
    end = trio.current_time() + seconds
    while trio.current_time() < end:
        ids.append(await trio.to_thread.run_sync(hub.send_c2d, device_id, b"cmd"))
        await trio.sleep(0.5)  # pacing
    return ids


async def receive_c2d(device: PahoDevice, count_ids: set[str], expected: list[str]) -> None:
    """Until every expected message id arrived at least once."""
    with trio.fail_after(WAIT * 2):
        while not set(expected) <= count_ids:
            msg = await device.receive()
            mid = re.search(r"%24\.mid=([^&]+)", msg.topic)
            assert mid is not None
            count_ids.add(mid.group(1))


def pauses(caplog) -> list[float]:
    return [float(m.group(1)) for m in PAUSE_RE.finditer(caplog.text)]


async def stream_through_renewals(
    hub, device, device_id: str, seconds: float
) -> tuple[Stream, list[str], set[str]]:
    await device.subscribe(C2D.format(device_id), qos=1)
    stream = Stream(device, device_id)
    received: set[str] = set()
    async with trio.open_nursery() as nursery:
        c2d_ids: list[str] = []

        async def c2d():
            c2d_ids.extend(await send_c2d_during(hub, device_id, seconds))

        nursery.start_soon(c2d)
        await trio.to_thread.run_sync(stream.run, seconds)
    await receive_c2d(device, received, c2d_ids)
    return stream, c2d_ids, received


def check_stream(hub: HubSim, observer: CountingObserver, stream: Stream, device_id: str) -> None:
    # Every publish completed in paho exactly once, and the device got one PUBACK each.
    assert len(stream.completed) == len(stream.sent)
    assert set(stream.completed.values()) == {1}
    assert observer.packets[("out", "PUBACK")] == len(stream.sent)
    # The hub recorded every message (a retransmission may be recorded twice).
    bodies = {r.body for r in hub.recorder.d2c_for(device_id) if r.properties.get("iothub-MessageType") != "Will"}
    assert set(stream.sent) <= bodies


async def test_make_before_break_renewal_during_a_stream(nursery, hub, keys, tmp_path, caplog):
    """No Will: the new CONNECT takes over and the hub kicks the old connection."""
    caplog.set_level(logging.DEBUG)
    port, observer = await start_short_token_relay(nursery, hub, keys, tmp_path)
    device = PahoDevice("dev2", username=username("dev2"), clean_session=False)
    try:
        assert await device.connect(port) == 0
        stream, c2d_ids, received = await stream_through_renewals(hub, device, "dev2", 12.0)
        assert not device.disconnected.is_set(), device.disconnect_reason
    finally:
        await trio.to_thread.run_sync(device.close)
    check_stream(hub, observer, stream, "dev2")
    connects = [a for a in hub.recorder.auth if a.device_id == "dev2" and a.ok]
    assert len(connects) >= 5  # the first CONNECT and a renewal about every 2.4 s
    assert set(c2d_ids) <= received
    await wait_for(hub, lambda: len(hub.recorder.feedback) >= len(c2d_ids))
    measured = pauses(caplog)
    assert len(measured) == len(connects) - 1 and "make-before-break" in caplog.text
    print(f"make-before-break: {len(measured)} renewals, pauses ms {measured}")
    assert observer.renewal_failures == []
    await observer.wait_closed(CloseReason.DEVICE_CLOSED)
    # Every hub connection, renewals' included, reported opened and closed once.
    assert observer.packets[("upstream", "open")] == len(connects)
    assert observer.packets[("upstream", "close")] == len(connects)
    no_secrets_in(caplog.text, keys)


async def test_break_before_make_keeps_the_will_quiet(nursery, hub, keys, tmp_path, caplog):
    """A Will: DISCONNECT the old connection first, so the hub never publishes it; clean
    session 1, so the re-subscription is what keeps C2D coming."""
    caplog.set_level(logging.INFO)
    port, observer = await start_short_token_relay(nursery, hub, keys, tmp_path)
    device = PahoDevice("dev2", username=username("dev2"), clean_session=True)
    will = (EVENTS.format("dev2") + "state=lost", b"gone", 0)
    try:
        assert await device.connect(port, will=will) == 0
        stream, c2d_ids, received = await stream_through_renewals(hub, device, "dev2", 8.0)
        assert not device.disconnected.is_set(), device.disconnect_reason
    finally:
        await trio.to_thread.run_sync(device.close)
    check_stream(hub, observer, stream, "dev2")
    connects = [a for a in hub.recorder.auth if a.device_id == "dev2" and a.ok]
    assert len(connects) >= 3
    assert set(c2d_ids) <= received
    assert "break-before-make" in caplog.text
    print(f"break-before-make: {len(connects) - 1} renewals, pauses ms {pauses(caplog)}")
    # The Will fires only now, when the device vanishes without DISCONNECT.
    wills = await wait_for(
        hub,
        lambda: [r for r in hub.recorder.d2c if r.properties.get("iothub-MessageType") == "Will"],
    )
    assert len(wills) == 1


async def test_make_before_break_with_a_will_fires_it(nursery, hub, keys, tmp_path):
    """Why AUTO does not use make-before-break for a device with a Will: the hub
    publishes the Will of every connection it kicks."""
    port, _ = await start_short_token_relay(
        nursery, hub, keys, tmp_path, renewal_mode=RenewalMode.MAKE_BEFORE_BREAK
    )
    device = PahoDevice("dev2", username=username("dev2"))
    try:
        assert await device.connect(port, will=(EVENTS.format("dev2"), b"gone", 0)) == 0
        will = await wait_for(hub, lambda: hub.recorder.d2c and hub.recorder.d2c[0])
        assert will.properties.get("iothub-MessageType") == "Will"
        assert not device.disconnected.is_set()
    finally:
        await trio.to_thread.run_sync(device.close)


async def test_failed_renewals_keep_the_session_until_the_token_expires(keys, tmp_path, caplog):
    """The new hub connection cannot be opened: the old session runs on until its token
    expires, then the gateway closes the device and counts the failures."""
    sim = HubSim(keys.hub_devices(), hub_host=HUB, amqp_port=None, token_skew=300)
    with sim:
        config = gateway_config(sim, credentials_yaml(tmp_path, keys, sim, token_ttl="3s"))
        store = CredentialStore.from_config(config.credentials)
        observer = CountingObserver()
        opened = []
        context = ssl.create_default_context(cafile=sim.ca_file)

        async def open_upstream(connector, profile):
            if opened:
                raise UpstreamUnavailable("refused", "hub unreachable (test)")
            tcp = await trio.open_tcp_stream("127.0.0.1", sim.mqtt_port)
            stream = trio.SSLStream(tcp, context, server_hostname=HUB)
            opened.append(stream)
            return Opened(stream)

        async def handler(stream):
            await relay_mqtt_connection(
                stream,
                ("127.0.0.1", 0),
                config.listeners[0],
                config,
                observer,
                open_upstream=open_upstream,
                credentials=MqttCredentials(store),
            )

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                lambda task_status: trio.serve_tcp(
                    handler, 0, host="127.0.0.1", task_status=task_status
                )
            )
            port = listeners[0].socket.getsockname()[1]
            device = PahoDevice("dev2", username=username("dev2"))
            try:
                assert await device.connect(port) == 0
                assert await observer.wait_closed(CloseReason.TOKEN_EXPIRED, timeout=WAIT)
                assert await device.wait_disconnected()
            finally:
                await trio.to_thread.run_sync(device.close)
            nursery.cancel_scope.cancel()
    sim.close()
    assert len(opened) == 1
    assert observer.renewal_failures and set(observer.renewal_failures) == {"dev2"}
    assert "token renewal failed: new hub connection failed (refused)" in caplog.text


async def test_mqtt5_renewal_against_mosquitto(nursery, mosquitto, certs, tmp_path):
    """mosquitto takes the session over on the new CONNECT and sends the old connection
    an MQTT 5 DISCONNECT (0x8E, session taken over): the device must not see it. The
    device publishes by Topic Alias: a new connection that never learnt the alias would
    close on the first alias-only PUBLISH (protocol error), so surviving the renewals
    shows the topic went along."""
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text("dev1-key: QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\n")
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
  token_ttl: 2s
  devices:
    - {{id: v5dev, key: dev1-key, trust: network}}
""",
        "gateway.yaml",
    )
    observer = CountingObserver()
    store = CredentialStore.from_config(config.credentials)
    bound = await nursery.start(
        lambda task_status: serve_mqtt_listener(
            config.listeners[0], config, task_status=task_status, credentials=store,
            observer=observer,
        )
    )
    before = mosquitto.log().count("as v5dev")
    device = PahoDevice("v5dev", protocol=paho.MQTTv5, username=f"{HUB}/v5dev/?api-version=x")
    try:
        assert await device.connect(bound[0][1]) == 0
        await device.subscribe("v5/renew", qos=1)
        stream = AliasStream(device, "v5dev")
        await trio.to_thread.run_sync(stream.run, 5.0, 0.05)
        assert not device.disconnected.is_set(), device.disconnect_reason
        assert set(stream.completed.values()) == {1} and len(stream.completed) == len(stream.sent)
        assert observer.packets[("out", "PUBACK")] == len(stream.sent)
        # Still subscribed after the renewals: a last message comes back.
        while not device.messages.empty():
            device.messages.get_nowait()
        await device.publish("v5/renew", b"last", qos=1)
        with trio.fail_after(WAIT):
            while (await device.receive()).payload != b"last":
                pass
    finally:
        await trio.to_thread.run_sync(device.close)
    assert mosquitto.log().count("as v5dev") - before >= 3


class AliasStream(Stream):
    """MQTT 5: the first PUBLISH names the topic and sets Topic Alias 1; the rest send
    an empty topic and the alias only."""

    def __init__(self, device: PahoDevice, device_id: str) -> None:
        super().__init__(device, device_id)
        self.topic = "v5/renew"

    def publish_one(self, n: int, body: bytes):
        props = Properties(PacketTypes.PUBLISH)
        props.TopicAlias = 1
        topic = self.topic if n == 0 else ""
        return self.device.client.publish(topic, body, qos=1, properties=props)
