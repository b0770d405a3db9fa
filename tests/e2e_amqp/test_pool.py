"""Many devices over a small pool; dedicated connections; SASL PLAIN devices."""

from __future__ import annotations

import threading
from functools import partial

import pytest
import trio
from gw_helpers import (
    CBS_TYPE,
    HUB_HOST,
    TIMEOUT,
    Device,
    data_message,
    device_uri,
    gateway_config,
    in_thread,
    new_key,
    running_gateway,
    sas_token,
)
from proton import Message
from proton.handlers import MessagingHandler
from proton.reactor import Container

from gateway.hubsim import HubSim

EVENTS = f"amqps://{HUB_HOST}/devices/%s/messages/events"


class Fleet(MessagingHandler):
    """N proton devices in one container: each puts its token over `$cbs`
    (all with reply-to "cbs", as the Java and Node SDKs do), checks that the one
    reply it gets is its own, then sends one telemetry message."""

    def __init__(self, url: str, keys: dict[str, str]) -> None:
        super().__init__(auto_accept=True)
        self.url = url
        self.keys = keys
        self.replies: dict[str, list[tuple[object, int]]] = {d: [] for d in keys}
        self.accepted: set[str] = set()
        self.errors: list[str] = []
        self._by_conn: dict[object, str] = {}
        self._sent: set[str] = set()
        self._done = 0

    def on_start(self, event) -> None:
        self.timer = event.container.schedule(TIMEOUT * 3, self)
        for device_id in self.keys:
            conn = event.container.connect(self.url, allowed_mechs="ANONYMOUS",
                                           virtual_host=HUB_HOST)  # fmt: skip
            self._by_conn[conn] = device_id
            rx = event.container.create_receiver(conn, "$cbs", name="$cbs-receiver")
            rx.target.address = "cbs"
            event.container.create_sender(conn, "$cbs", name="$cbs-sender")

    def on_timer_task(self, event) -> None:
        self.errors.append("timed out")
        event.container.stop()

    def on_sendable(self, event) -> None:
        device_id = self._by_conn[event.connection]
        link = event.sender
        if link.target.address == "$cbs" and device_id not in self._sent:
            self._sent.add(device_id)
            audience = device_uri(device_id)
            link.send(Message(
                id=f"req-{device_id}", reply_to="cbs",
                properties={"operation": "put-token", "type": CBS_TYPE, "name": audience},
                body=sas_token(audience, self.keys[device_id]),
            ))  # fmt: skip

    def on_message(self, event) -> None:
        device_id = self._by_conn[event.connection]
        msg = event.message
        self.replies[device_id].append((msg.correlation_id, msg.properties["status-code"]))
        if len(self.replies[device_id]) == 1:
            sender = event.container.create_sender(event.connection, EVENTS % device_id)
            sender.send(data_message(device_id.encode()))

    def on_accepted(self, event) -> None:
        if event.link.target.address.endswith("/messages/events"):
            device_id = self._by_conn[event.connection]
            self.accepted.add(device_id)
            event.connection.close()

    def on_rejected(self, event) -> None:
        self.errors.append(f"rejected on {event.link.name}")
        event.connection.close()

    def on_connection_closed(self, event) -> None:
        self._done += 1
        if self._done == len(self.keys):
            self.timer.cancel()

    def on_link_error(self, event) -> None:
        self.errors.append(f"link error {event.link.remote_condition}")


@pytest.fixture
def fleet_keys() -> dict[str, str]:
    return {f"dev{i:03d}": new_key() for i in range(200)}


@pytest.fixture
def fleet_hub(fleet_keys):
    sim = HubSim(fleet_keys, hub_host=HUB_HOST, mqtt_port=None)
    with sim:
        yield sim
    sim.close()


async def test_200_devices_over_two_upstream_connections(fleet_hub, fleet_keys, tmp_path) -> None:
    hub = fleet_hub
    config = gateway_config(hub, tmp_path, max_connections=2, max_devices=100)
    async with running_gateway(config) as gw:
        fleet = Fleet(gw.url, fleet_keys)
        await in_thread(Container(fleet).run)
    assert fleet.errors == []
    for device_id, replies in fleet.replies.items():
        assert replies == [(f"req-{device_id}", 200)], device_id
    assert fleet.accepted == set(fleet_keys)
    assert sorted(r.device_id for r in hub.recorder.d2c) == sorted(fleet_keys)
    assert all(r.body == r.device_id.encode() for r in hub.recorder.d2c)
    assert hub.recorder.connections["amqp"].opened == 2
    assert len(hub.recorder.cbs) == 200 and all(c.status == 200 for c in hub.recorder.cbs)


async def test_dedicated_connections_route_cbs_verbatim(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path, max_connections=4, max_devices=1)
    async with running_gateway(config) as gw:

        def run(device_id):
            with Device(gw.url) as dev:
                dev.cbs(reply_to="cbs-reply-1")
                reply = dev.authenticate(device_id, keys[device_id])
                dev.conn.create_sender(EVENTS % device_id).send(data_message(b"hi"))
                return reply

        r1 = await in_thread(run, "dev1")
        r2 = await in_thread(run, "dev2")
    assert r1.correlation_id == 0 and r2.correlation_id == 0
    # Verbatim: the hub saw the devices' own CBS message-ids and reply-to.
    assert [(c.message_id, c.reply_to) for c in hub.recorder.cbs] == [(0, "cbs-reply-1")] * 2
    assert {link.name for link in hub.recorder.links if link.address == "$cbs"} != set()
    assert hub.recorder.connections["amqp"].opened == 2


async def test_sasl_plain_device_token_put_for_it(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path)
    async with running_gateway(config) as gw:

        def run():
            token = sas_token(device_uri("dev2"), keys["dev2"])
            dev = Device(gw.url, mechs="PLAIN", user="dev2@sas.myhub", password=token)
            try:
                dev.conn.create_sender(EVENTS % "dev2").send(data_message(b"plain"))
                dev.conn.create_receiver("/devices/dev2/messages/devicebound")
            finally:
                dev.close()

        await in_thread(run)
    assert [(r.device_id, r.body) for r in hub.recorder.d2c] == [("dev2", b"plain")]
    assert [(c.audience, c.status) for c in hub.recorder.cbs] == [(device_uri("dev2"), 200)]


async def test_sasl_plain_with_a_bad_token_is_refused(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path)
    async with running_gateway(config) as gw:

        def run():
            token = sas_token(device_uri("dev2"), new_key())
            dev = Device(gw.url, mechs="PLAIN", user="dev2@sas.myhub", password=token)
            try:
                dev.conn.create_sender(EVENTS % "dev2")
            except Exception as exc:
                return str(exc)
            finally:
                dev.close()

        text = await in_thread(run)
    assert "unauthorized-access" in text
    assert [c.status for c in hub.recorder.cbs] == [401]


# ---- hub outages and idle connections ---------------------------------------


class RetryingDevice:
    """A proton device in a thread: sends telemetry every 20 ms; whenever anything
    fails (the gateway refusing its attach or CBS request while the hub is down, a
    detach when the hub goes) it counts it, starts over on a new connection."""

    def __init__(self, url: str, device_id: str, key: str) -> None:
        self.url, self.device_id, self.key = url, device_id, key
        self.stop = threading.Event()
        self.failures = 0
        self.sent = 0

    def run(self) -> None:
        while not self.stop.is_set():
            dev = None
            try:
                dev = Device(self.url)
                reply = dev.authenticate(self.device_id, self.key)
                if reply.properties["status-code"] != 200:
                    raise RuntimeError(f"put-token: {reply.properties['status-code']}")
                sender = dev.conn.create_sender(EVENTS % self.device_id)
                while not self.stop.is_set():
                    sender.send(data_message(b"reading"), timeout=TIMEOUT)
                    self.sent += 1
                    self.stop.wait(0.02)  # its sending rate, not a synchronisation
            except Exception:  # noqa: BLE001 - a device starts over whatever failed
                self.failures += 1
                self.stop.wait(0.05)
            finally:
                if dev is not None:
                    try:
                        dev.close()
                    except Exception:  # noqa: BLE001
                        pass


async def wait_until(predicate, what: str, timeout: float = 60) -> None:
    with trio.fail_after(timeout):  # fail-safe only: progress ends every wait
        while not predicate():
            await trio.sleep(0.02)


async def test_hub_restarts_leave_one_connection_then_none(hub, keys, tmp_path) -> None:
    """The hub restarts 5 times under one device that starts over on every failure:
    the connector never has more than one connection (none is opened while one backs
    off), and once the device has gone its connection is closed after idle_close."""
    config = gateway_config(hub, tmp_path, max_connections=4, max_devices=100,
                            connector_extra="    idle_close: 1s\n")  # fmt: skip
    device = RetryingDevice(f"amqp://127.0.0.1:{0}", "dev1", keys["dev1"])
    most = 0
    try:
        async with running_gateway(config) as gw, trio.open_nursery() as n:
            pool = gw.router.pools["iothub"]
            device.url = gw.url

            async def watch() -> None:
                nonlocal most
                while True:
                    most = max(most, len(pool.slots), len(gw.router.upstreams))
                    await trio.sleep(0.01)

            n.start_soon(watch)
            n.start_soon(partial(trio.to_thread.run_sync, device.run, abandon_on_cancel=True))
            for _ in range(5):
                sent = device.sent
                await wait_until(lambda s=sent: device.sent > s + 2, "telemetry")
                await in_thread(hub.stop)
                failures = device.failures
                # The device asks again and again while the hub is down.
                await wait_until(lambda f=failures: device.failures >= f + 3, "refusals")
                await in_thread(hub.start)
            sent = device.sent
            await wait_until(lambda: device.sent > sent + 2, "telemetry after the restarts")
            assert most == 1
            assert len(gw.router.upstreams) == 1 and len(pool.slots) == 1
            device.stop.set()
            await wait_until(lambda: not gw.router.upstreams and not pool.slots, "idle close")
            n.cancel_scope.cancel()
    finally:
        device.stop.set()
    await in_thread(hub.recorder.wait_for, lambda: hub.recorder.connections["amqp"].open == 0, 30)


async def test_devices_leaving_leave_no_connection_behind(hub, keys, tmp_path) -> None:
    """Connections opened for many devices are all closed once they have gone."""
    config = gateway_config(hub, tmp_path, max_connections=4, max_devices=2,
                            connector_extra="    idle_close: 0.5s\n")  # fmt: skip
    async with running_gateway(config) as gw:

        def run() -> None:
            devices = [Device(gw.url) for _ in range(6)]
            try:
                for i, dev in enumerate(devices):
                    dev.authenticate(f"dev{i % 2 + 1}", keys[f"dev{i % 2 + 1}"])
            finally:
                for dev in devices:
                    dev.close()

        await in_thread(run)
        assert hub.recorder.connections["amqp"].opened == 3
        pool = gw.router.pools["iothub"]
        await wait_until(lambda: not gw.router.upstreams and not pool.slots, "idle close")
    await in_thread(hub.recorder.wait_for, lambda: hub.recorder.connections["amqp"].open == 0, 30)
