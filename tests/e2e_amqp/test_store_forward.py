"""Store-and-forward on the AMQP path, end to end: python-qpid-proton devices with no
key of their own -> gateway (plaintext, the gateway holds their keys and they opted
in) -> hubsim (TLS), which is stopped to make the hub unreachable and started again.

What arrived is asserted at hubsim: message bytes, application properties,
message-id and order per device. Waits are on progress (hubsim's recorder, the
store's backlog, proton's link state), never on time.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from gw_helpers import HUB_HOST, TIMEOUT, Device, data_message, in_thread, new_key
from proton import Delivery, Message
from proton.utils import LinkDetached, SendException

from gateway.auth.credentials import CredentialStore
from gateway.config import GatewayConfig, parse_config_text
from gateway.hubsim import HubSim
from gateway.net.amqp_listener import serve_amqp_listener
from gateway.net.upstream_io import AmqpConnectorIO
from gateway.router.core import Router
from gateway.router.forwarder import HUB_UNREACHABLE
from gateway.router.local_link import HUB_REACHABLE
from gateway.store import MessageStore, StoreUnavailable

EVENTS = "amqps://" + HUB_HOST + "/devices/%s/messages/events"
DEVICEBOUND = "/devices/%s/messages/devicebound"
KEYS = {d: new_key() for d in ("dev1", "dev2", "dev3", "plain1")}


def loopback() -> str:
    """A random 127.x.y.z: tests running at once do not meet on ports."""
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(2, 254)}"


@pytest.fixture
def hub() -> Iterator[HubSim]:
    sim = HubSim(KEYS, hub_host=HUB_HOST, mqtt_port=None, host=loopback())
    with sim:
        yield sim
    sim.close()


def sf_config(hub: HubSim, tmp_path: Path, *, max_bytes: str = "64MiB",
              replay_rate: float = 1000, upstream: tuple[str, int] | None = None,
              connect_timeout: str = "5s", max_devices: int = 100) -> GatewayConfig:  # fmt: skip
    secrets = tmp_path / "secrets.yaml"
    fd = os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{d}-key: {k}\n" for d, k in KEYS.items()))
    text = f"""
gateway: {{id: gw-test}}
admin: {{enabled: false}}
tls_profiles:
  hub: {{ca_file: "{hub.ca_file}", server_name: {HUB_HOST}}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "{loopback()}:0"}}
connectors:
  - name: iothub
    protocol: amqp
    host: {upstream[0] if upstream else hub.host}
    port: {upstream[1] if upstream else hub.amqp_port}
    tls_profile: hub
    connect_timeout: {connect_timeout}
    idle_close: 1h
    reconnect: {{initial: 0.1s, max: 0.5s}}
    pool: {{max_connections: 2, max_devices_per_connection: {max_devices}}}
link_routes:
  - {{prefix: "$cbs", connector: iothub}}
  - {{prefix: "devices/", connector: iothub}}
store_and_forward:
  path: {tmp_path / "store.db"}
  max_bytes: {max_bytes}
  device_share: 0.5
  replay_rate: {replay_rate}
credentials:
  secrets_file: {secrets}
  devices:
    - {{id: dev1, key: dev1-key, trust: network, store_and_forward: true}}
    - {{id: dev2, key: dev2-key, trust: network, store_and_forward: true}}
    - {{id: dev3, key: dev3-key, trust: network, store_and_forward: true}}
    - {{id: plain1, key: plain1-key, trust: network}}
"""
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return parse_config_text(text, str(path))


@dataclass
class Gateway:
    router: Router
    store: Any
    url: str

    @property
    def counts(self) -> dict[str, int]:
        assert self.router.sf is not None
        return self.router.sf.counts


class GatedStore:
    """The real store, with replay held until the test opens the gate (so a backlog
    can be made to last while the hub is up)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.gate = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def replay_limiter(self, connector: str) -> Any:
        inner = self._store.replay_limiter(connector)
        gate = self.gate

        class Gated:
            async def acquire(self) -> None:
                await gate.wait()
                await inner.acquire()

        return Gated()


@asynccontextmanager
async def gateway(config: GatewayConfig, *, gated: bool = False) -> AsyncIterator[Gateway]:
    creds = CredentialStore.from_config(config.credentials)
    store: Any = await MessageStore.open(config.store_and_forward)
    if gated:
        store = GatedStore(store)
    try:
        async with trio.open_nursery() as nursery:
            router = Router(config, connector_io=AmqpConnectorIO(), credentials=creds, store=store)
            await nursery.start(router.run)
            bound = await nursery.start(serve_amqp_listener, config.listeners[0], config, router)
            host, port = bound[0][0], bound[0][1]
            try:
                yield Gateway(router, store, f"amqp://{host}:{port}")
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def wait_until(predicate: Any, what: str) -> None:
    """Until `predicate()` holds: polled (progress, not a time budget), bounded by a
    generous fail-safe."""
    with trio.fail_after(TIMEOUT * 4):
        while not predicate():
            await trio.sleep(0.02)


def telemetry(device: str, i: int, size: int = 32) -> Message:
    body = (f"{device}-{i}:".encode() + os.urandom(size))[:size] if size > 8 else f"{i}".encode()
    return data_message(body, id=f"{device}-{i}", properties={"seq": i, "device": device})


def bodies(hub: HubSim, device: str) -> list[bytes]:
    return [r.body for r in hub.recorder.d2c_for(device)]


def stop_hub(hub: HubSim) -> None:
    hub.stop()


async def start_hub(hub: HubSim) -> None:
    await in_thread(hub.start)


# ----------------------------------------------------------------------------- tests


async def test_hub_down_store_then_replay_in_order_and_reattach(hub: HubSim, tmp_path: Path) -> None:
    config = sf_config(hub, tmp_path)
    stop_hub(hub)
    async with gateway(config) as gw:
        msgs = [telemetry("dev1", i) for i in range(20)]

        def offline() -> tuple[Device, Any]:
            dev = Device(gw.url)
            sender = dev.conn.create_sender(EVENTS % "dev1")
            assert sender.link.remote_max_message_size == 256 * 1024
            for m in msgs:
                d = sender.send(m)  # blocks until settled; raises unless accepted
                assert d.remote_state == Delivery.ACCEPTED
            return dev, sender

        dev, sender = await in_thread(offline)
        assert gw.store.backlog("dev1") == 20
        assert gw.counts["local_attaches"] == 1
        assert hub.recorder.d2c_for("dev1") == []

        await start_hub(hub)
        await in_thread(hub.recorder.wait_for, lambda: len(hub.recorder.d2c_for("dev1")) >= 20, TIMEOUT * 2)

        def detached() -> str | None:
            try:
                dev.conn.wait(lambda: False, timeout=TIMEOUT * 2, msg="waiting for the detach")
            except LinkDetached as exc:
                return str(exc.condition)
            return None

        assert await in_thread(detached) == "amqp:link:detach-forced"
        assert sender.link.remote_condition.description == HUB_REACHABLE
        records = hub.recorder.d2c_for("dev1")
        assert [r.body for r in records] == [m.body for m in msgs]
        assert [r.properties["message-id"] for r in records] == [m.id for m in msgs]
        assert [r.app_properties for r in records] == [m.properties for m in msgs]
        assert all(r.raw == m.encode() for r, m in zip(records, msgs, strict=True))
        assert gw.store.backlog("dev1") == 0

        # The device attaches again: through to the hub now.
        def online() -> None:
            sender2 = dev.conn.create_sender(EVENTS % "dev1")
            sender2.send(telemetry("dev1", 99))
            dev.close()

        await in_thread(online)
        assert [r.properties["message-id"] for r in hub.recorder.d2c_for("dev1")][-1] == "dev1-99"
        assert gw.counts["local_attaches"] == 1
        assert gw.store.backlog("dev1") == 0


async def test_backlog_while_hub_up_keeps_device_local_and_in_order(hub: HubSim, tmp_path: Path) -> None:
    config = sf_config(hub, tmp_path)
    stop_hub(hub)
    async with gateway(config, gated=True) as gw:
        first = [telemetry("dev2", i) for i in range(5)]
        later = [telemetry("dev2", i) for i in range(5, 10)]

        def send(msgs: list[Message]) -> None:
            with Device(gw.url) as dev:
                sender = dev.conn.create_sender(EVENTS % "dev2")
                for m in msgs:
                    sender.send(m)

        await in_thread(send, first)
        await start_hub(hub)
        # The hub is up, replay is held: the backlog keeps the device local.
        await wait_until(lambda: gw.router.sf is not None
                         and gw.router.sf.pool_states.get("iothub") == "up", "hub up")
        await in_thread(send, later)
        assert gw.counts["local_attaches"] == 2
        assert gw.store.backlog("dev2") == 10
        gw.store.gate.set()
        await in_thread(hub.recorder.wait_for, lambda: len(hub.recorder.d2c_for("dev2")) >= 10, TIMEOUT * 2)
        assert bodies(hub, "dev2") == [m.body for m in first + later]


async def test_multi_frame_message_bit_identical(hub: HubSim, tmp_path: Path) -> None:
    config = sf_config(hub, tmp_path)
    stop_hub(hub)
    async with gateway(config) as gw:
        big = data_message(os.urandom(200 * 1024), id="big-1", properties={"k": "v"})

        def offline() -> None:
            with Device(gw.url, max_frame_size=4096) as dev:
                dev.conn.create_sender(EVENTS % "dev1").send(big)

        await in_thread(offline)
        await start_hub(hub)
        await in_thread(hub.recorder.wait_for, lambda: hub.recorder.d2c_for("dev1"), TIMEOUT * 2)
        (record,) = hub.recorder.d2c_for("dev1")
        assert record.raw == big.encode()
        assert record.body == big.body


async def test_full_store_releases_other_devices_unaffected(hub: HubSim, tmp_path: Path) -> None:
    config = sf_config(hub, tmp_path, max_bytes="256KiB")  # each device: half of it
    stop_hub(hub)
    async with gateway(config) as gw:

        def flood() -> tuple[int, int]:
            with Device(gw.url) as dev:
                sender = dev.conn.create_sender(EVENTS % "dev1")
                accepted = 0
                for i in range(100):
                    try:
                        sender.send(telemetry("dev1", i, size=8 * 1024))
                    except SendException as exc:
                        assert exc.state == Delivery.RELEASED
                        return accepted, i
                    accepted += 1
            raise AssertionError("the store never filled")

        accepted, _ = await in_thread(flood)
        assert 0 < accepted < 100
        assert gw.counts["refused_full"] >= 1

        def other() -> None:
            with Device(gw.url) as dev:
                sender = dev.conn.create_sender(EVENTS % "dev2")
                for i in range(3):
                    assert sender.send(telemetry("dev2", i)).remote_state == Delivery.ACCEPTED

        await in_thread(other)
        await start_hub(hub)
        await in_thread(hub.recorder.wait_for,
                        lambda: len(hub.recorder.d2c_for("dev1")) >= accepted
                        and len(hub.recorder.d2c_for("dev2")) >= 3, TIMEOUT * 4)  # fmt: skip
        assert len(hub.recorder.d2c_for("dev1")) == accepted
        assert [r.properties["message-id"] for r in hub.recorder.d2c_for("dev1")] == [
            f"dev1-{i}" for i in range(accepted)
        ]


async def test_hub_rejects_a_replayed_message(tmp_path: Path) -> None:
    # A hub that takes less than the 256 KiB the gateway accepts locally: it rejects
    # the larger stored message on replay (amqp:link:message-size-exceeded).
    with HubSim(KEYS, hub_host=HUB_HOST, mqtt_port=None, host=loopback(),
                amqp_max_message_size=64 * 1024) as hub:  # fmt: skip
        config = sf_config(hub, tmp_path)
        stop_hub(hub)
        async with gateway(config) as gw:
            msgs = [telemetry("dev3", 0), telemetry("dev3", 1, size=100 * 1024), telemetry("dev3", 2)]

            def offline() -> None:
                with Device(gw.url) as dev:
                    sender = dev.conn.create_sender(EVENTS % "dev3")
                    for m in msgs:
                        sender.send(m)

            await in_thread(offline)
            assert gw.store.backlog("dev3") == 3
            rejected_before = _rejected(gw.store)
            await start_hub(hub)
            await in_thread(hub.recorder.wait_for, lambda: len(hub.recorder.d2c_for("dev3")) >= 2,
                            TIMEOUT * 2)  # fmt: skip
            await wait_until(lambda: gw.store.backlog("dev3") == 0, "backlog empty")
            got = [r.properties["message-id"] for r in hub.recorder.d2c_for("dev3")]
            assert got == ["dev3-0", "dev3-2"]
            assert _rejected(gw.store) == rejected_before + 1
        hub.close()


def _rejected(store: Any) -> int:
    return int(store.stats().rejected.get("iothub", 0))


async def test_not_opted_in_device_unchanged_and_c2d_refused_offline(hub: HubSim, tmp_path: Path) -> None:
    config = sf_config(hub, tmp_path)
    stop_hub(hub)
    async with gateway(config) as gw:

        def plain() -> str | None:
            with Device(gw.url) as dev:
                try:
                    dev.conn.create_sender(EVENTS % "plain1").send(telemetry("plain1", 0))
                except LinkDetached as exc:
                    return str(exc.condition)
            return None

        assert await in_thread(plain) == "amqp:connection:forced"

        def c2d() -> tuple[str | None, str | None]:
            with Device(gw.url) as dev:
                dev.conn.create_sender(EVENTS % "dev1").send(telemetry("dev1", 0))
                try:
                    dev.conn.create_receiver(DEVICEBOUND % "dev1")
                except LinkDetached as exc:
                    return str(exc.condition), exc.link.remote_condition.description
            return None, None

        assert await in_thread(c2d) == ("amqp:internal-error", HUB_UNREACHABLE)
        assert gw.store.backlog("plain1") == 0
        assert gw.counts["refused_attaches"] == 1


async def test_silent_hub_first_attach_waits_for_the_dial_later_ones_do_not(
        hub: HubSim, tmp_path: Path) -> None:  # fmt: skip
    """A hub that takes the TCP connection and never answers: the first attach waits
    for the dial to fail, later ones are served locally at once (the connector knows)."""
    held: list[trio.SocketStream] = []

    async def silent(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host=loopback()))
        addr = listeners[0].socket.getsockname()
        config = sf_config(hub, tmp_path, upstream=(addr[0], addr[1]), connect_timeout="1s")
        async with gateway(config) as gw:

            def send(device: str) -> None:
                with Device(gw.url) as dev:
                    sender = dev.conn.create_sender(EVENTS % device)
                    assert sender.send(telemetry(device, 0)).remote_state == Delivery.ACCEPTED

            await in_thread(send, "dev1")
            assert gw.counts["local_attaches"] == 1
            assert gw.counts["local_at_once"] == 0  # it waited for the dial to fail
            assert gw.router.sf is not None and gw.router.sf.hub_down("iothub")
            await in_thread(send, "dev2")
            await in_thread(send, "dev3")
            assert gw.counts["local_at_once"] == 2
            assert gw.store.backlog("dev2") == gw.store.backlog("dev3") == 1
        nursery.cancel_scope.cancel()


async def test_routed_cbs_replay_connection_closed_after_replay(hub: HubSim, tmp_path: Path) -> None:
    """With one device per connection `$cbs` is link-routed: the connection the replay
    put dev1's token on is closed after the replay (idle_close is an hour), so it cannot
    serve another device with that token."""
    config = sf_config(hub, tmp_path, max_devices=1)
    stop_hub(hub)
    async with gateway(config) as gw:

        def offline() -> None:
            with Device(gw.url) as dev:
                sender = dev.conn.create_sender(EVENTS % "dev1")
                for i in range(3):
                    sender.send(telemetry("dev1", i))

        await in_thread(offline)
        await start_hub(hub)
        await in_thread(hub.recorder.wait_for, lambda: len(hub.recorder.d2c_for("dev1")) >= 3,
                        TIMEOUT * 2)  # fmt: skip
        await wait_until(lambda: gw.store.backlog("dev1") == 0, "backlog empty")
        await wait_until(lambda: hub.open_connections("amqp") == 0, "replay connection closed")
        assert [r.properties["message-id"] for r in hub.recorder.d2c_for("dev1")] == [
            f"dev1-{i}" for i in range(3)
        ]


async def test_opted_in_device_with_its_own_token_is_relayed_transparently(
        hub: HubSim, tmp_path: Path) -> None:  # fmt: skip
    """dev2 opted in, but it does CBS with its own SAS token: not the gateway's to
    acknowledge. While the hub is down its CBS request fails and its attach is refused
    as without the store."""
    config = sf_config(hub, tmp_path)
    stop_hub(hub)
    async with gateway(config) as gw:

        def own_token() -> tuple[bool, str | None]:
            with Device(gw.url) as dev:
                try:
                    dev.authenticate("dev2", KEYS["dev2"])
                    put = True
                except SendException:  # no hub to take it: the gateway refuses the request
                    put = False
                try:
                    dev.conn.create_sender(EVENTS % "dev2").send(telemetry("dev2", 0))
                except LinkDetached as exc:
                    return put, str(exc.condition)
            return put, None

        put, condition = await in_thread(own_token)
        assert not put
        assert condition == "amqp:connection:forced"
        assert gw.store.backlog("dev2") == 0
        assert gw.counts["local_attaches"] == 0


async def test_store_unavailable_releases_with_a_log_line(
        hub: HubSim, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """A store that cannot write (here: the disk is full) releases the message, logs
    it and counts it; once it can write again, messages are accepted."""
    config = sf_config(hub, tmp_path)
    stop_hub(hub)
    async with gateway(config) as gw:
        real_append = gw.store.append

        async def disk_full(**kwargs: Any) -> int:
            raise StoreUnavailable("store test.db: the disk is full", kind="disk_full")

        gw.store.append = disk_full

        def send() -> Any:
            with Device(gw.url) as dev:
                sender = dev.conn.create_sender(EVENTS % "dev1")
                return sender.send(telemetry("dev1", 0), error_states=[]).remote_state

        assert await in_thread(send) == Delivery.RELEASED
        assert gw.counts["refused_unavailable"] == 1
        assert gw.store.backlog("dev1") == 0
        assert "the store is unavailable: store test.db: the disk is full" in caplog.text
        gw.store.append = real_append
        assert await in_thread(send) == Delivery.ACCEPTED
        assert gw.store.backlog("dev1") == 1
