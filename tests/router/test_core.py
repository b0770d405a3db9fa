"""The router core between scripted peers: attach mirroring, credit, drain,
dispositions, detach errors, upstream and device loss."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import router_harness  # noqa: E402

from gateway.amqp import (  # noqa: E402
    DispositionReceived,
    LinkState,
    RemoteAttach,
    RemoteClose,
    RemoteDetach,
    TransferReceived,
)
from gateway.amqp.performatives import (  # noqa: E402
    Accepted,
    Error,
    Rejected,
    Released,
    Source,
    Target,
)
from gateway.amqp.types import Symbol, UInt, ULong  # noqa: E402
from gateway.router.observe import NullObserver  # noqa: E402

ADDR = "queues/q1"


async def open_sender(dev, name="sender-link", address=ADDR, **kw):
    session = dev.engine.begin()
    link = session.attach(name, "sender", Source(address="src"), Target(address=address), **kw)
    dev.poke()
    return link


async def hub_accepts(hub, **kw):
    ev = await hub.next(RemoteAttach)
    a = ev.attach
    ev.link.answer_attach(a.source, a.target, **kw)
    hub.poke()
    return ev


async def test_attach_mirrored_both_ways(monkeypatch) -> None:
    async with router_harness(monkeypatch) as h:
        dev = await h.device()
        props = {Symbol("com.microsoft:client-version"): "test/1.0"}
        await open_sender(dev, snd_settle_mode=1, rcv_settle_mode=0, initial_delivery_count=7,
                          max_message_size=12345, properties=props,
                          desired_capabilities=Symbol("cap"))  # fmt: skip
        await h._hub_ready.wait()
        ev = await h.hub.next(RemoteAttach)
        a = ev.attach
        assert a.name == "sender-link@1"
        assert (a.snd_settle_mode, a.rcv_settle_mode) == (1, 0)
        assert a.initial_delivery_count == 7 and a.max_message_size == 12345
        assert a.properties == props and a.desired_capabilities == Symbol("cap")
        assert a.source.address == "src" and a.target.address == ADDR
        # The device hears nothing until the hub answers.
        assert not dev.of(RemoteAttach)
        hub_props = {Symbol("com.microsoft:hub"): UInt(1)}
        ev.link.answer_attach(a.source, Target(address="hub-target"), max_message_size=ULong(999),
                              properties=hub_props, offered_capabilities=Symbol("hubcap"))  # fmt: skip
        h.hub.poke()
        got = (await dev.next(RemoteAttach)).attach
        assert got.name == "sender-link"
        assert got.target.address == "hub-target" and got.max_message_size == 999
        assert got.properties == hub_props and got.offered_capabilities == Symbol("hubcap")


async def test_device_sender_credit_follows_the_hub(monkeypatch) -> None:
    async with router_harness(monkeypatch) as h:
        dev = await h.device()
        link = await open_sender(dev)
        await h._hub_ready.wait()
        up = (await hub_accepts(h.hub)).link
        await dev.next(RemoteAttach)
        assert link.credit == 0
        up.flow(3)
        h.hub.poke()
        await dev.wait_for(lambda: link.credit == 3)
        for i in range(3):
            link.send_transfer(b"t%d" % i, b"payload %d" % i)
        dev.poke()
        await h.hub.wait_for(lambda: len(h.hub.of(TransferReceived)) == 3)
        assert link.credit == 0
        # More messages wait on the device: no credit appeared from nowhere.
        link.send_transfer(b"t3", b"payload 3")
        dev.poke()
        # A marker behind it, on the same connection: a second link's attach crosses the
        # router to the hub and its answer comes back. Credit the router made up, or t3 let
        # through, would have reached the device or the hub before the marker did.
        await open_sender(dev, name="marker-link", address="queues/marker")
        await hub_accepts(h.hub)
        await dev.next(RemoteAttach, where=lambda e: e.attach.name == "marker-link")
        assert len(h.hub.of(TransferReceived)) == 3 and link.queued == 1 and link.credit == 0
        up.flow(1)
        h.hub.poke()
        await h.hub.wait_for(lambda: len(h.hub.of(TransferReceived)) == 4)
        got = h.hub.of(TransferReceived)
        assert [bytes(t.payload) for t in got] == [b"payload %d" % i for i in range(4)]
        assert [t.delivery_tag for t in got] == [b"t0", b"t1", b"t2", b"t3"]


async def test_drain_from_the_hub_reaches_the_device_and_back(monkeypatch) -> None:
    async with router_harness(monkeypatch) as h:
        dev = await h.device()
        link = await open_sender(dev)
        await h._hub_ready.wait()
        up = (await hub_accepts(h.hub)).link
        await dev.next(RemoteAttach)
        up.flow(5, drain=True)
        h.hub.poke()
        await dev.wait_for(lambda: link.credit == 5 and link.drain)
        # The device has nothing to send: it answers the drain.
        link.drained()
        dev.poke()
        await h.hub.wait_for(lambda: up.credit == 0 and up.delivery_count == 5)


async def test_dispositions_ranges_and_outcomes(monkeypatch) -> None:
    async with router_harness(monkeypatch) as h:
        dev = await h.device()
        link = await open_sender(dev)
        await h._hub_ready.wait()
        up = (await hub_accepts(h.hub)).link
        await dev.next(RemoteAttach)
        up.flow(10)
        h.hub.poke()
        await dev.wait_for(lambda: link.credit == 10)
        sent = [link.send_transfer(b"%d" % i, b"m%d" % i) for i in range(6)]
        dev.poke()
        await h.hub.wait_for(lambda: len(h.hub.of(TransferReceived)) == 6)
        hub_d = [t.delivery for t in h.hub.of(TransferReceived)]
        h.hub.engine.disposition(hub_d[:4], settled=True, state=Accepted())
        err = Error(Symbol("amqp:link:message-size-exceeded"), "too big", {Symbol("k"): "v"})
        h.hub.engine.disposition(hub_d[4:5], settled=True, state=Rejected(err))
        h.hub.engine.disposition(hub_d[5:], settled=False, state=Released())
        h.hub.poke()
        await dev.wait_for(lambda: sent[5].remote_state is not None and sent[4].remote_settled)
        assert all(type(d.remote_state) is Accepted and d.remote_settled for d in sent[:4])
        assert sent[4].remote_state == Rejected(err)
        assert type(sent[5].remote_state) is Released and not sent[5].remote_settled
        # The hub's four accepts went to the device as one ranged disposition.
        ranges = [(e.first, e.last) for e in dev.of(DispositionReceived)]
        assert ranges[0] == (0, 3)
        # The device settles the released one: the hub hears it.
        sent[5].settle()
        dev.poke()
        await h.hub.wait_for(lambda: hub_d[5].remote_settled)


async def test_detach_errors_relayed_both_ways(monkeypatch) -> None:
    async with router_harness(monkeypatch) as h:
        dev = await h.device()
        a = await open_sender(dev, name="a")
        await h._hub_ready.wait()
        up_a = (await hub_accepts(h.hub)).link
        await dev.next(RemoteAttach)
        b = await open_sender(dev, name="b")
        up_b = (await hub_accepts(h.hub)).link
        await dev.next(RemoteAttach, lambda e: e.link is b)
        # hub -> device
        err = Error(Symbol("com.microsoft:device-container-throttled"), "slow down",
                    {Symbol("com.microsoft:tracking-id"): "abc"})  # fmt: skip
        up_a.detach(err, closed=True)
        h.hub.poke()
        ev = await dev.next(RemoteDetach, lambda e: e.link is a)
        assert ev.error == err and ev.closed
        assert a.state is LinkState.DETACH_RCVD
        await h.hub.next(RemoteDetach, lambda e: e.link is up_a)  # answered
        # device -> hub
        derr = Error(Symbol("amqp:internal-error"), "device says bye")
        b.detach(derr, closed=False)
        dev.poke()
        ev = await h.hub.next(RemoteDetach, lambda e: e.link is up_b)
        assert ev.error == derr and ev.closed is False
        await dev.next(RemoteDetach, lambda e: e.link is b)  # answered


async def test_hub_refusal_mirrored(monkeypatch) -> None:
    async with router_harness(monkeypatch) as h:
        dev = await h.device()
        link = await open_sender(dev)
        await h._hub_ready.wait()
        ev = await h.hub.next(RemoteAttach)
        ev.link.answer_attach(ev.attach.source, None)
        err = Error(Symbol("amqp:unauthorized-access"), "no token")
        ev.link.detach(err)
        h.hub.poke()
        got = await dev.next(RemoteAttach)
        assert got.attach.target is None
        det = await dev.next(RemoteDetach)
        assert det.error == err and det.link is link


async def test_unrouted_attach_refused_not_found(monkeypatch) -> None:
    async with router_harness(monkeypatch) as h:
        dev = await h.device()
        await open_sender(dev, address="amqps://h:5671/nowhere/x")
        got = await dev.next(RemoteAttach)
        assert got.attach.target is None
        det = await dev.next(RemoteDetach)
        assert det.error.condition == "amqp:not-found"
        assert "nowhere/x" in det.error.description
        assert not h.hubs  # no upstream was opened for it


async def test_device_receiver_credit_passed_up_and_c2d_relayed(monkeypatch) -> None:
    async with router_harness(monkeypatch, device_frame=512, hub_frame=65536) as h:
        dev = await h.device(max_frame_size=512)
        session = dev.engine.begin()
        link = session.attach("c2d", "receiver", Source(address="queues/c2d"), Target(address="me"),
                              rcv_settle_mode=1)  # fmt: skip
        dev.poke()
        await h._hub_ready.wait()
        ev = await h.hub.next(RemoteAttach)
        assert ev.attach.rcv_settle_mode == 1
        up = ev.link
        up.answer_attach(ev.attach.source, ev.attach.target, initial_delivery_count=100)
        h.hub.poke()
        await dev.next(RemoteAttach)
        link.flow(2)
        dev.poke()
        await h.hub.wait_for(lambda: up.credit == 2)
        big = bytes(range(256)) * 800  # 200 KB: many 512-byte frames towards the device
        tag = bytes(16)
        d = up.send_transfer(tag, big, message_format=0x80013700)
        up.send_transfer(b"2", b"small")
        h.hub.poke()
        await dev.wait_for(lambda: len(dev.of(TransferReceived)) == 2)
        first = dev.of(TransferReceived)[0]
        assert bytes(first.payload) == big and first.delivery_tag == tag
        assert first.message_format == 0x80013700
        assert link.delivery_count == 102  # the hub's initial delivery count was mirrored
        first.delivery.update(Accepted())
        dev.poke()
        await h.hub.wait_for(lambda: type(d.remote_state) is Accepted)
        assert up.credit == 0  # nothing more granted than the device granted
        # Device drains: the hub is asked to drain, answers, the device gets the answer.
        link.flow(4, drain=True)
        dev.poke()
        await h.hub.wait_for(lambda: up.drain and up.credit == 4)
        up.drained()
        h.hub.poke()
        await dev.wait_for(lambda: link.credit == 0 and link.delivery_count == 106)


async def test_upstream_loss_detaches_device_links_forced(monkeypatch) -> None:
    async with router_harness(monkeypatch) as h:
        dev = await h.device()
        link = await open_sender(dev)
        await h._hub_ready.wait()
        up = (await hub_accepts(h.hub)).link
        await dev.next(RemoteAttach)
        up.flow(5)
        h.hub.poke()
        await dev.wait_for(lambda: link.credit == 5)
        d = link.send_transfer(b"x", b"never acknowledged")
        dev.poke()
        await h.hub.wait_for(lambda: h.hub.of(TransferReceived))
        await h.hub.close_abruptly()
        ev = await dev.next(RemoteDetach)
        assert ev.error.condition == "amqp:connection:forced"
        assert d.remote_state is None and not d.remote_settled


async def test_hub_close_error_relayed(monkeypatch) -> None:
    async with router_harness(monkeypatch) as h:
        dev = await h.device()
        await open_sender(dev)
        await h._hub_ready.wait()
        await hub_accepts(h.hub)
        await dev.next(RemoteAttach)
        err = Error(Symbol("com.microsoft:iot-hub-suspended"), "hub suspended")
        h.hub.engine.close(err)
        h.hub.poke()
        ev = await dev.next(RemoteDetach)
        assert ev.error == err


async def test_device_loss_detaches_upstream_links_and_ends_sessions(monkeypatch) -> None:
    async with router_harness(monkeypatch) as h:
        dev = await h.device()
        await open_sender(dev, name="a")
        await h._hub_ready.wait()
        up = (await hub_accepts(h.hub)).link
        await dev.next(RemoteAttach)
        await dev.close_abruptly()
        ev = await h.hub.next(RemoteDetach, lambda e: e.link is up)
        assert ev.closed and ev.error is None
        from gateway.amqp import RemoteEnd

        await h.hub.next(RemoteEnd)
        await h.hub.wait_for(lambda: not h.router.devices)


class ProtocolErrors(NullObserver):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def on_protocol_error(self, side: str, condition: str) -> None:
        self.seen.append((side, condition))


# A frame whose body is not a described performative.
MALFORMED = b"\x00\x00\x00\x0d\x02\x00\x00\x00\xa1\x03abc"


async def test_protocol_errors_reported_per_side_once(monkeypatch) -> None:
    async with router_harness(monkeypatch) as h:
        seen = ProtocolErrors()
        h.router.observer = seen
        dev = await h.device()
        await open_sender(dev)
        await h._hub_ready.wait()
        await hub_accepts(h.hub)
        await dev.next(RemoteAttach)
        # The hub breaks the protocol: counted once, on the upstream side.
        await h.hub.stream.send_all(MALFORMED)
        await dev.next(RemoteDetach)
        assert seen.seen == [("upstream", "amqp:decode-error")]
        # A device breaks it: counted on the device side.
        await dev.stream.send_all(MALFORMED)
        await dev.next(RemoteClose)  # sent after the router handled the error
        assert seen.seen == [("upstream", "amqp:decode-error"), ("device", "amqp:decode-error")]
