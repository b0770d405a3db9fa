"""Device -> gateway -> hubsim: telemetry, C2D, pooling, identities, sizes, errors."""

from __future__ import annotations

import socket

import pytest
import trio
from gw_helpers import (
    CBS_TYPE,
    HUB_HOST,
    TIMEOUT,
    Device,
    authenticated_device,
    data_message,
    device_uri,
    gateway_config,
    hub_open_links,
    in_thread,
    running_gateway,
    sas_token,
    send_all,
)
from proton import Delivery, Message
from proton.handlers import MessagingHandler
from proton.reactor import Container
from proton.utils import LinkDetached

from tests.net.forced_waits import ForcedWaits

EVENTS = f"amqps://{HUB_HOST}/devices/%s/messages/events"


async def send_through_gateway(hub, keys, tmp_path, msgs: list[Message]) -> tuple[list, list]:
    """dev1 sends `msgs` through a gateway, all in flight at once; returns their
    encodings and the outcomes the device got. The hub keeps what it received."""
    config = gateway_config(hub, tmp_path)
    hub.recorder.keep_d2c = True
    async with running_gateway(config) as gw:

        def run():
            with authenticated_device(gw.url, "dev1", keys["dev1"]) as dev:
                sender = dev.conn.create_sender(EVENTS % "dev1")
                states = send_all(sender, dev.conn, msgs)
                return [m.encode() for m in msgs], states

        return await in_thread(run)


@pytest.mark.timeout(1800)  # send_all fails on a stall; this only stops a runaway
async def test_10000_messages_bit_identical_in_order(hub, keys, tmp_path) -> None:
    msgs = [
        data_message(i.to_bytes(4, "big") * (1 + i % 50), id=i, properties={"n": i})
        for i in range(10_000)
    ]
    sent, states = await send_through_gateway(hub, keys, tmp_path, msgs)
    assert all(s == Delivery.ACCEPTED for s in states)
    got = [r.raw for r in hub.recorder.d2c]
    assert len(got) == 10_000
    assert got == sent


async def test_held_dispositions_all_reach_the_device(hub, keys, tmp_path, monkeypatch) -> None:
    """With the hub's dispositions held before every read (ack_batching's wait,
    forced), every message still arrives in order and every outcome comes back;
    each settled disposition counted as the hub's answer."""
    forced = ForcedWaits(monkeypatch)
    msgs = [data_message(b"m%04d" % i, id=i) for i in range(500)]
    sent, states = await send_through_gateway(hub, keys, tmp_path, msgs)
    assert all(s == Delivery.ACCEPTED for s in states)
    assert [r.raw for r in hub.recorder.d2c] == sent
    assert forced.waits > 0
    # The 500 messages, and the CBS put-token the gateway sent for the device.
    assert forced.answers >= 500
    assert 0 < forced.max_in_flight <= forced.answers


async def test_c2d_accept_reject_release(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path)
    async with running_gateway(config) as gw:

        def run():
            with authenticated_device(gw.url, "dev1", keys["dev1"]) as dev:
                rx = dev.conn.create_receiver("/devices/dev1/messages/devicebound", credit=1)
                accepted = hub.send_c2d("dev1", b"one", {"content_type": "text/plain"}, {"k": "v"})
                msg = rx.receive(timeout=TIMEOUT)
                assert (bytes(msg.body), msg.id, msg.properties) == (b"one", accepted, {"k": "v"})
                rx.accept()
                rejected = hub.send_c2d("dev1", b"two")
                assert rx.receive(timeout=TIMEOUT).id == rejected
                rx.reject()
                released = hub.send_c2d("dev1", b"three")
                assert rx.receive(timeout=TIMEOUT).delivery_count == 0
                rx.release(delivered=False)
                again = rx.receive(timeout=TIMEOUT)
                assert (again.id, again.delivery_count) == (released, 1)
                rx.accept()
                dev.sync()
                hub.recorder.wait_for(lambda: len(hub.recorder.dispositions) == 4)
                return accepted, rejected, released

        accepted, rejected, released = await in_thread(run)
    outcomes = [(d.message_id, d.outcome) for d in hub.recorder.dispositions]
    assert outcomes == [
        (accepted, "accepted"),
        (rejected, "rejected"),
        (released, "released"),
        (released, "accepted"),
    ]
    # The lock token (the hub's delivery tag) crossed the gateway unchanged.
    assert all(len(d.lock_token) == 16 for d in hub.recorder.dispositions)


async def test_same_link_names_reply_to_and_message_ids(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path, max_connections=1)
    async with running_gateway(config) as gw:

        def run(device_id):
            dev = Device(gw.url, container="same-container")
            try:
                dev.cbs(reply_to="cbs", names=("$cbs-receiver", "$cbs-sender"))
                reply = dev.put_token(
                    device_uri(device_id), sas_token(device_uri(device_id), keys[device_id]),
                    message_id=0,
                )
                sender = dev.conn.create_sender(EVENTS % device_id, name="sender-link")
                sender.send(data_message(device_id.encode(), id=0))
                return reply
            finally:
                dev.close()

        async with trio.open_nursery() as n:
            replies = {}

            async def one(d):
                replies[d] = await in_thread(run, d)

            n.start_soon(one, "dev1")
            n.start_soon(one, "dev2")
    for d in ("dev1", "dev2"):
        assert replies[d].correlation_id == 0
        assert replies[d].properties["status-code"] == 200
    assert sorted(r.body for r in hub.recorder.d2c) == [b"dev1", b"dev2"]
    assert {r.device_id for r in hub.recorder.d2c} == {"dev1", "dev2"}
    # Both devices shared one upstream connection.
    assert hub.recorder.connections["amqp"].opened == 1


async def test_no_piggybacking_on_another_devices_token(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path, max_connections=1)
    async with running_gateway(config) as gw:

        def run():
            good = Device(gw.url)
            bad = Device(gw.url)
            try:
                good.authenticate("dev1", keys["dev1"])
                good.conn.create_sender(EVENTS % "dev1").send(data_message(b"ok"))
                bad.cbs()
                with pytest.raises(LinkDetached) as e:
                    bad.conn.create_sender(EVENTS % "dev1")
                return str(e.value)
            finally:
                good.close()
                bad.close()

        text = await in_thread(run)
    assert "unauthorized-access" in text
    assert hub.recorder.connections["amqp"].opened == 1


async def test_unrouted_address_refused_not_found(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path)
    async with running_gateway(config) as gw:

        def run():
            with Device(gw.url) as dev:
                with pytest.raises(LinkDetached) as e:
                    dev.conn.create_sender("queues/elsewhere")
                dev.authenticate("dev1", keys["dev1"])  # the connection still works
                return str(e.value)

        text = await in_thread(run)
    assert "amqp:not-found" in text


async def test_large_messages_small_device_frames(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path, listener_extra=", max_frame_size: 512")
    async with running_gateway(config) as gw:

        def run():
            dev = Device(gw.url, max_frame_size=512)
            try:
                dev.authenticate("dev1", keys["dev1"])
                sender = dev.conn.create_sender(EVENTS % "dev1")
                msgs = [data_message(bytes([i]) * 200_000, id=i) for i in range(3)]
                states = send_all(sender, dev.conn, msgs)
                return [m.encode() for m in msgs], states
            finally:
                dev.close()

        sent, states = await in_thread(run)
    assert states == [Delivery.ACCEPTED] * 3
    assert [r.raw for r in hub.recorder.d2c] == sent


async def test_device_credit_never_exceeds_hub_credit(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path)
    async with running_gateway(config) as gw:

        def run():
            with authenticated_device(gw.url, "dev1", keys["dev1"]) as dev:
                sender = dev.conn.create_sender(EVENTS % "dev1")
                dev.conn.wait(lambda: sender.link.credit > 0, timeout=TIMEOUT)
                seen = [sender.link.credit]
                for i in range(300):
                    sender.send(data_message(b"x", id=i))
                    seen.append(sender.link.credit)
                return seen

        seen = await in_thread(run)
    # hubsim grants its receivers a window of 100 and tops it up; the device
    # never sees more than the hub granted.
    assert max(seen) <= 100
    assert seen[0] > 0


async def test_garbage_after_header_closes_only_that_device(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path)
    async with running_gateway(config) as gw:

        def garbage():
            with socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT) as s:
                s.sendall(b"AMQP\x00\x01\x00\x00" + b"\x00\x00\x00\x10\x02\x00\x00\x00" + b"\xff" * 8)
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        return data
                    data += chunk

        def good():
            with authenticated_device(gw.url, "dev1", keys["dev1"]) as dev:
                dev.conn.create_sender(EVENTS % "dev1").send(data_message(b"fine"))

        reply = await in_thread(garbage)
        await in_thread(good)
    assert reply.startswith(b"AMQP\x00\x01\x00\x00")
    assert b"amqp:decode-error" in reply
    assert [r.body for r in hub.recorder.d2c] == [b"fine"]


class Churn(MessagingHandler):
    """Device connections one after another (`lanes` at a time): each puts its
    token, attaches a telemetry sender and a C2D receiver, and closes."""

    def __init__(self, url: str, keys: dict[str, str], total: int, lanes: int) -> None:
        super().__init__()
        self.url, self.keys, self.total, self.lanes = url, keys, total, lanes
        self.started = self.done = 0
        self.errors: list[str] = []
        self._device: dict[object, str] = {}
        self._attached: dict[object, int] = {}
        self._ids = list(keys)

    def on_start(self, event) -> None:
        self.timer = event.container.schedule(120, self)
        for _ in range(self.lanes):
            self._open(event.container)

    def _open(self, container) -> None:
        if self.started == self.total:
            return
        device_id = self._ids[self.started % len(self._ids)]
        self.started += 1
        conn = container.connect(self.url, allowed_mechs="ANONYMOUS", virtual_host=HUB_HOST)
        self._device[conn] = device_id
        self._attached[conn] = 0
        container.create_receiver(conn, "$cbs")
        sender = container.create_sender(conn, "$cbs")
        audience = device_uri(device_id)
        sender.send(Message(
            id=0, properties={"operation": "put-token", "type": CBS_TYPE, "name": audience},
            body=sas_token(audience, self.keys[device_id]),
        ))  # fmt: skip

    def on_message(self, event) -> None:
        device_id = self._device[event.connection]
        if event.message.properties.get("status-code") != 200:
            self.errors.append(f"{device_id}: {event.message.properties}")
        event.container.create_sender(event.connection, EVENTS % device_id)
        event.container.create_receiver(event.connection, f"/devices/{device_id}/messages/devicebound")

    def on_link_opened(self, event) -> None:
        link = event.link
        address = link.remote_target.address if link.is_sender else link.remote_source.address
        if address and "/devices/" in address:
            self._attached[event.connection] += 1
            if self._attached[event.connection] == 2:
                event.connection.close()

    def on_link_error(self, event) -> None:
        self.errors.append(f"link error {event.link.remote_condition}")

    def on_connection_closed(self, event) -> None:
        self.done += 1
        if self.done == self.total:
            self.timer.cancel()
        else:
            self._open(event.container)

    def on_timer_task(self, event) -> None:
        self.errors.append(f"timed out after {self.done} connections")
        event.container.stop()


async def test_no_upstream_link_leaks_after_1000_device_connections(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path, max_connections=1)
    async with running_gateway(config) as gw:
        churn = Churn(gw.url, keys, 1000, 20)
        await in_thread(Container(churn).run)
        with trio.fail_after(TIMEOUT):
            while hub_open_links(hub) > 2 or gw.router.devices:
                await trio.sleep(0.05)
        upstream = next(iter(gw.router.upstreams))
        sessions = len(upstream.engine.sessions)
        # Only the gateway's own CBS link pair (in its control session) stays attached.
        assert hub_open_links(hub) == 2
    assert churn.errors == [] and churn.done == 1000
    assert sessions == 1
    assert hub.recorder.connections["amqp"].opened == 1
    assert len(hub.recorder.cbs) == 1000


async def test_twin_and_methods_with_link_properties(hub, keys, tmp_path) -> None:
    import json
    import threading

    from proton import symbol
    from proton.reactor import LinkOption

    class Props(LinkOption):
        def __init__(self, props):
            self.props = props

        def apply(self, link):
            link.properties = self.props

    config = gateway_config(hub, tmp_path)
    twin_props = {symbol("com.microsoft:channel-correlation-id"): "twin:1234",
                  symbol("com.microsoft:api-version"): "2020-09-30"}  # fmt: skip
    async with running_gateway(config) as gw:

        def run():
            with authenticated_device(gw.url, "dev1", keys["dev1"]) as dev:
                opts = [Props(twin_props)]
                twin_rx = dev.conn.create_receiver("/devices/dev1/twin", name="twin", options=opts)
                twin_tx = dev.conn.create_sender("/devices/dev1/twin", name="twin", options=opts)
                msg = Message(correlation_id="c1", annotations={symbol("operation"): "GET"})
                twin_tx.send(msg)
                got = twin_rx.receive(timeout=TIMEOUT)
                assert got.correlation_id == "c1" and got.annotations["status"] == 200
                methods_rx = dev.conn.create_receiver("/devices/dev1/methods/devicebound")
                methods_tx = dev.conn.create_sender("/devices/dev1/methods/devicebound")
                result = []
                caller = threading.Thread(target=lambda: result.append(
                    hub.invoke_method("dev1", "reboot", {"delay": 1}, timeout=TIMEOUT)))  # fmt: skip
                caller.start()
                request = methods_rx.receive(timeout=TIMEOUT)
                assert request.properties["IoThub-methodname"] == "reboot"
                assert json.loads(bytes(request.body)) == {"delay": 1}
                response = Message(correlation_id=request.correlation_id,
                                   properties={"IoThub-status": 200}, body=b'"ok"')  # fmt: skip
                response.inferred = True
                methods_tx.send(response)
                caller.join(TIMEOUT)
                return result

        result = await in_thread(run)
    assert result == [(200, b'"ok"')]
    twin_links = [link for link in hub.recorder.links if link.address == "/devices/dev1/twin"]
    assert len(twin_links) == 2
    for link in twin_links:
        # Link properties crossed unchanged; the link name got a per-connection suffix.
        assert link.properties == twin_props
        assert link.name.startswith("twin@")
