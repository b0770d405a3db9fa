"""Store-and-forward, MQTT side, end to end: paho devices -> relay (+ forwarder) -> hubsim.

hubsim is the hub: stopping it makes the hub unreachable, starting it again
(same ports) brings it back. What the hub received is asserted at hubsim:
topic, the property bag in the topic, payload bytes, order per device. Waits
are on progress (hubsim's recorder, the relay's close reasons), never sleeps.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import trio

from gateway.auth.credentials import CredentialStore
from gateway.config import parse_config_text
from gateway.daemon import MqttUpstreams, serve_mqtt_listener
from gateway.hubsim import HubSim
from gateway.mqtt import encode
from gateway.mqtt_relay import CloseReason
from gateway.mqtt_relay.forwarder import MqttForwarder
from gateway.mqtt_relay.local_session import (
    HUB_REACHABLE,
    HUB_REQUIRED,
    STORE_FULL,
    LocalSession,
    StoreForward,
)
from gateway.store import FakeStore, MessageStore, StoreUnavailable

from .paho_device import PahoDevice

HUB = "myhub.azure-devices.net"
WAIT = 20.0


def events(device: str, bag: str = "") -> str:
    return f"devices/{device}/messages/events/{bag}"


def loopback() -> str:
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


class Observer:
    """The relay's hooks, recorded; waits on them by progress."""

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.local: list[tuple[str, str]] = []
        self.dropped: list[tuple[str, str]] = []
        self.changed = trio.Event()

    def on_packet(self, direction, packet_type, nbytes):
        pass

    def on_close(self, reason):
        self.closed.append(reason)
        self._wake()

    def on_local_session(self, identity, why):
        self.local.append((identity, why))
        self._wake()

    def on_store_dropped(self, identity, why):
        self.dropped.append((identity, why))

    def _wake(self):
        self.changed.set()
        self.changed = trio.Event()

    async def wait_closed(self, reason: str, count: int = 1, timeout: float = WAIT) -> None:
        with trio.fail_after(timeout):
            while self.closed.count(reason) < count:
                await self.changed.wait()


class Gateway:
    """The MQTT listener and (optionally) the forwarder, in this test's trio run."""

    def __init__(self, hub: HubSim, tmp_path: Path, *, max_bytes: str = "64MiB",
                 device_share: float = 1.0, replay_rate: int = 1000) -> None:  # fmt: skip
        self.host = loopback()
        keys = hub.devices_keys
        secrets = tmp_path / "secrets.yaml"
        secrets.write_text("".join(f"{d}-key: {k}\n" for d, k in keys.items()))
        secrets.chmod(0o600)
        self.config = parse_config_text(
            f"""
admin: {{enabled: false}}
tls_profiles:
  hubsim: {{ca_file: {hub.ca_file}, server_name: {HUB}}}
listeners:
  - {{name: mqtt, protocol: mqtt, bind: "{self.host}:0"}}
connectors:
  - {{name: iothub-mqtt, protocol: mqtt, host: {hub.host}, port: {hub.mqtt_port},
     tls_profile: hubsim, connect_timeout: 5s}}
mqtt_routes:
  - {{hub: {HUB}, connector: iothub-mqtt}}
store_and_forward:
  path: {tmp_path / "store.db"}
  max_bytes: {max_bytes}
  device_share: {device_share}
  replay_rate: {replay_rate}
credentials:
  secrets_file: {secrets}
  devices:
    - {{id: dev1, key: dev1-key, trust: network, store_and_forward: true}}
    - {{id: dev2, key: dev2-key, trust: network, store_and_forward: true}}
    - {{id: dev3, key: dev3-key, trust: network}}
""",
            "gateway.yaml",
        )
        self.credentials = CredentialStore.from_config(self.config.credentials)
        self.observer = Observer()
        self.port = 0
        self.store = None
        self.forward: StoreForward | None = None
        self.forwarder: MqttForwarder | None = None
        self._forwarder_scope: trio.CancelScope | None = None

    async def start(self, nursery: trio.Nursery, *, forwarder: bool = True,
                    store: Any = None) -> Gateway:  # fmt: skip
        self.store = store or await MessageStore.open(self.config.store_and_forward)
        self.forward = StoreForward(self.store)

        async def serve(task_status=trio.TASK_STATUS_IGNORED):
            await serve_mqtt_listener(
                self.config.listeners[0],
                self.config,
                task_status=task_status,
                observer=self.observer,
                credentials=self.credentials,
                store_forward=self.forward,
            )

        bound = await nursery.start(serve)
        self.port = bound[0][1]
        if forwarder:
            await self.start_forwarder(nursery)
        return self

    async def start_forwarder(self, nursery: trio.Nursery) -> None:
        assert self.forward is not None
        self.forwarder = MqttForwarder(
            self.forward, self.config, self.credentials, MqttUpstreams(),
            scan_interval=0.2, backoff=(0.05, 0.5), observer=self.observer,
        )  # fmt: skip
        await nursery.start(self.forwarder.run)

    async def aclose(self) -> None:
        if self.store is not None:
            await self.store.aclose()


@pytest.fixture
def hub():
    keys = {d: base64.b64encode(os.urandom(32)).decode() for d in ("dev1", "dev2", "dev3")}
    sim = HubSim(keys, hub_host=HUB, amqp_port=None, host=loopback())
    sim.devices_keys = keys
    with sim:
        yield sim
    sim.close()


@pytest.fixture
async def gateway(nursery, hub, tmp_path):
    made: list[Gateway] = []

    async def make(*, forwarder: bool = True, store: Any = None, **options) -> Gateway:
        gw = await Gateway(hub, tmp_path, **options).start(nursery, forwarder=forwarder,
                                                           store=store)  # fmt: skip
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.aclose()


@pytest.fixture
async def devices():
    made: list[PahoDevice] = []

    def make(device_id: str, **kwargs) -> PahoDevice:
        device = PahoDevice(device_id, username=f"{HUB}/{device_id}/?api-version=2021-04-12",
                            **kwargs)  # fmt: skip
        made.append(device)
        return device

    yield make
    for device in made:
        await trio.to_thread.run_sync(device.close)


async def hub_wait(hub: HubSim, predicate, timeout: float = WAIT):
    return await trio.to_thread.run_sync(hub.recorder.wait_for, predicate, timeout)


def d2c(hub: HubSim, device: str) -> list:
    return [r for r in hub.recorder.d2c if r.device_id == device]


async def acknowledged(device: PahoDevice, info: paho.MQTTMessageInfo) -> bool:
    """Whether the PUBLISH was acknowledged before the connection closed."""

    def wait() -> bool:
        deadline = time.monotonic() + WAIT  # fail-safe only
        while time.monotonic() < deadline:
            if info.is_published():
                return True
            if device.disconnected.is_set():
                return info.is_published()
            info.wait_for_publish(0.05)  # woken by the PUBACK; polls for the close
        raise TimeoutError("neither PUBACK nor close")

    return await trio.to_thread.run_sync(wait)


async def until(predicate, timeout: float = WAIT) -> None:
    """Poll a condition of this trio run (the store's counters) until it holds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def stop_hub(hub: HubSim) -> None:
    await trio.to_thread.run_sync(hub.stop)


async def start_hub(hub: HubSim) -> None:
    await trio.to_thread.run_sync(hub.start)


# -- the whole cycle --------------------------------------------------------------------


async def test_hub_down_stored_then_replayed_in_order_then_transparent(
    hub, gateway, devices, caplog
):
    caplog.set_level(logging.INFO)
    await stop_hub(hub)
    gw = await gateway()
    device = devices("dev1")
    assert await device.connect(gw.port, host=gw.host) == 0  # answered by the gateway
    sent = []
    for i in range(30):
        topic = events("dev1", f"seq={i}&%24.ct=application%2Fjson&%24.ce=utf-8")
        body = bytes([i]) * (i + 1) + b"\x00\xff"
        await device.publish(topic, body, qos=1)  # returns once PUBACKed
        sent.append((topic, body))
    assert gw.store.backlog("dev1") == 30
    assert gw.observer.local == [("dev1", gw.observer.local[0][1])]
    assert "hub unreachable" in gw.observer.local[0][1]

    await start_hub(hub)
    await hub_wait(hub, lambda: len(d2c(hub, "dev1")) >= 30)
    records = d2c(hub, "dev1")
    assert [(r.topic, r.body) for r in records] == sent  # order, topic and bytes
    assert records[5].properties == {"seq": "5", "$.ct": "application/json", "$.ce": "utf-8"}
    assert all(r.qos == 1 for r in records)
    # The local session is closed once, so the device comes back to the hub itself.
    await gw.observer.wait_closed(HUB_REACHABLE)
    assert await device.wait_disconnected()
    await until(lambda: gw.store.backlog("dev1") == 0)

    again = devices("dev1")
    assert await again.connect(gw.port, host=gw.host) == 0
    await again.publish(events("dev1", "live=1"), b"live", qos=1)
    await hub_wait(hub, lambda: len(d2c(hub, "dev1")) == 31)
    assert d2c(hub, "dev1")[-1].body == b"live"
    assert len(gw.observer.local) == 1  # that session was relayed, not answered locally
    assert gw.observer.closed.count(HUB_REACHABLE) == 1  # one disconnect
    assert gw.store.backlog("dev1") == 0
    assert "backlog delivered (30 message(s)" in caplog.text


async def test_backlog_while_hub_up_makes_the_session_local(hub, gateway, devices, nursery):
    await stop_hub(hub)
    gw = await gateway(forwarder=False)
    first = devices("dev1")
    assert await first.connect(gw.port, host=gw.host) == 0
    for i in range(3):
        await first.publish(events("dev1", f"n={i}"), b"old%d" % i, qos=1)
    await first.disconnect()
    await start_hub(hub)

    second = devices("dev1")
    assert await second.connect(gw.port, host=gw.host) == 0
    assert len(gw.observer.local) == 2
    assert "still stored" in gw.observer.local[1][1]
    await second.publish(events("dev1", "n=3"), b"new3", qos=1)
    assert gw.store.backlog("dev1") == 4
    assert hub.recorder.auth == []  # the hub never saw dev1

    await gw.start_forwarder(nursery)
    await hub_wait(hub, lambda: len(d2c(hub, "dev1")) >= 4)
    assert [r.body for r in d2c(hub, "dev1")] == [b"old0", b"old1", b"old2", b"new3"]
    assert await second.wait_disconnected()


async def test_qos0_dropped_and_subscribe_refused_and_twin_closes(hub, gateway, devices):
    await stop_hub(hub)
    gw = await gateway()
    device = devices("dev1")
    assert await device.connect(gw.port, host=gw.host) == 0
    await device.publish(events("dev1"), b"qos0", qos=0)
    await device.publish(events("dev1"), b"qos1", qos=1)
    codes = await device.subscribe("devices/dev1/messages/devicebound/#", qos=1)
    assert [int(c.value) for c in codes] == [0x80]
    assert gw.observer.dropped == [("dev1", "qos0")]
    assert gw.store.backlog("dev1") == 1
    # A twin request needs the hub: MQTT 3.1.1 can only close the connection.
    device.client.publish("$iothub/twin/GET/?$rid=1", b"", qos=0)
    await gw.observer.wait_closed(HUB_REQUIRED)
    assert await device.wait_disconnected()

    await start_hub(hub)
    await hub_wait(hub, lambda: d2c(hub, "dev1"))
    await until(lambda: gw.store.backlog("dev1") == 0)
    assert [r.body for r in d2c(hub, "dev1")] == [b"qos1"]


async def test_full_store_withholds_puback_and_other_devices_carry_on(
    hub, gateway, devices, monkeypatch
):
    monkeypatch.setattr(LocalSession, "full_wait", 0.5)
    monkeypatch.setattr(LocalSession, "full_retry", 0.1)
    await stop_hub(hub)
    gw = await gateway(forwarder=False, max_bytes="64KiB", device_share=0.5)
    flooder = devices("dev1")
    other = devices("dev2")
    assert await flooder.connect(gw.port, host=gw.host) == 0
    assert await other.connect(gw.port, host=gw.host) == 0
    acked = 0
    info = None
    for _ in range(100):  # 100 KiB into a 32 KiB share
        info = flooder.client.publish(events("dev1"), bytes(1024), qos=1)
        if not await acknowledged(flooder, info):
            break
        acked += 1
    assert info is not None and not info.is_published()
    assert 10 < acked < 40
    await gw.observer.wait_closed(STORE_FULL)
    assert not info.is_published()  # never acknowledged
    # The other device still stores in its own share.
    await other.publish(events("dev2"), b"still here", qos=1)
    assert gw.store.backlog("dev2") == 1
    assert gw.store.backlog("dev1") == acked


async def test_device_not_opted_in_is_refused_as_before(hub, gateway, devices):
    await stop_hub(hub)
    gw = await gateway()
    device = devices("dev3")
    assert await device.connect(gw.port, host=gw.host) == "Server unavailable"
    await gw.observer.wait_closed(CloseReason.UPSTREAM_UNAVAILABLE)
    assert gw.observer.local == []


async def test_opted_in_device_with_hub_up_is_relayed_transparently(hub, gateway, devices):
    gw = await gateway()
    device = devices("dev1")
    assert await device.connect(gw.port, host=gw.host) == 0
    await device.publish(events("dev1", "a=1"), b"direct", qos=1)
    await hub_wait(hub, lambda: d2c(hub, "dev1"))
    assert gw.observer.local == [] and gw.store.backlog("dev1") == 0
    codes = await device.subscribe("devices/dev1/messages/devicebound/#", qos=1)
    assert [int(c.value) for c in codes] == [1]


async def test_message_the_hub_closes_on_is_rejected_after_bounded_attempts(
    tmp_path, nursery, devices, caplog
):
    caplog.set_level(logging.INFO)
    keys = {d: base64.b64encode(os.urandom(32)).decode() for d in ("dev1", "dev2", "dev3")}
    hub = HubSim(keys, hub_host=HUB, amqp_port=None, host=loopback(), mqtt_max_message_size=2000)
    hub.devices_keys = keys
    with hub:
        await stop_hub(hub)
        gw = await Gateway(hub, tmp_path).start(nursery)
        device = devices("dev1")
        assert await device.connect(gw.port, host=gw.host) == 0
        await device.publish(events("dev1", "n=1"), b"first", qos=1)
        await device.publish(events("dev1", "n=2"), bytes(3000), qos=1)  # over the hub's limit
        await device.publish(events("dev1", "n=3"), b"third", qos=1)
        await start_hub(hub)
        await hub_wait(hub, lambda: len(d2c(hub, "dev1")) >= 2)
        await gw.observer.wait_closed(HUB_REACHABLE)
        assert [r.body for r in d2c(hub, "dev1")] == [b"first", b"third"]
        assert gw.forwarder is not None and gw.forwarder.rejected == 1
        assert "rejected: the hub closed the connection 3 times" in caplog.text
        await gw.aclose()


async def test_unusable_store_withholds_puback_and_closes_with_a_log_line(
    hub, gateway, devices, caplog
):
    await stop_hub(hub)
    store = FakeStore()
    gw = await gateway(forwarder=False, store=store)
    device = devices("dev1")
    assert await device.connect(gw.port, host=gw.host) == 0
    store.fail_appends = StoreUnavailable("store /x/store.db: disk full", kind="disk_full")
    info = device.client.publish(events("dev1"), b"lost?", qos=1)
    assert not await acknowledged(device, info)
    await gw.observer.wait_closed(CloseReason.STORE_UNAVAILABLE)
    assert "store unavailable storing PUBLISH 1: store /x/store.db: disk full" in caplog.text
    assert store.stats().refused == {"unavailable": 1}
    assert store.stats().errors == {"disk_full": 1}


async def test_local_session_enforces_the_keep_alive(hub, gateway):
    """A raw client (no automatic PINGREQ): answered, then silent past 1.5 x 1 s."""
    await stop_hub(hub)
    gw = await gateway(forwarder=False)
    stream = await trio.open_tcp_stream(gw.host, gw.port)
    connect = encode.connect("dev1", keep_alive=1, username=f"{HUB}/dev1/?api-version=2021-04-12")
    await stream.send_all(connect + encode.pingreq())
    got = b""
    with trio.fail_after(WAIT):
        while len(got) < 6:
            got += await stream.receive_some(64)
        assert got[:6] == encode.connack(0) + encode.pingresp()
        started = trio.current_time()
        assert await stream.receive_some(64) == b""  # closed by the gateway
    assert trio.current_time() - started >= 1.4
    await gw.observer.wait_closed(CloseReason.KEEPALIVE_TIMEOUT)
    await stream.aclose()
