"""The order of a CBS reply and its request's outcome on a pooled connection (the
gateway serves `$cbs`): IoT Hub settles a put-token before replying, and
uamqp-c (the Azure IoT C SDK's AMQP layer) fails a put-token whose reply comes
first. A hub that replies first still gets its outcome to the device before
the reply; one that never settles gets the reply through after a bounded wait."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).parent))

from harness import Peer, router_harness  # noqa: E402

from gateway.amqp import (  # noqa: E402
    DispositionReceived,
    LinkState,
    RemoteAttach,
    RemoteDetach,
    TransferReceived,
)
from gateway.amqp.message import (  # noqa: E402
    AmqpValue,
    Message,
    Properties,
    decode_message,
    encode_message,
)
from gateway.amqp.performatives import Accepted, Source, Target  # noqa: E402
from gateway.amqp.types import Int  # noqa: E402
from gateway.router import cbs  # noqa: E402

HUB = "myhub.azure-devices.net"


async def serve_hub(hub: Peer, settle: bool) -> None:
    """Answers attaches and put-tokens, writing each reply BEFORE settling the
    request (or never settling it, with ``settle=False``)."""
    seen = 0
    reply_links: dict[str, Any] = {}
    while True:
        for ev in hub.events[seen:]:
            if isinstance(ev, RemoteAttach) and ev.link.state is LinkState.ATTACH_RCVD:
                a = ev.attach
                ev.link.answer_attach(a.source, a.target)
                if ev.link.is_receiver:
                    ev.link.flow(100)
                elif a.target is not None:
                    reply_links[str(a.target.address)] = ev.link
            elif isinstance(ev, TransferReceived):
                msg = decode_message(bytes(ev.payload))
                reply = Message(
                    properties=Properties(correlation_id=msg.properties.message_id),
                    application_properties={"status-code": Int(200), "status-description": "OK"},
                )
                reply_links[str(msg.properties.reply_to)].send_transfer(
                    b"r", encode_message(reply), settled=True
                )
                if settle and not ev.settled:
                    ev.delivery.settle(Accepted())  # written after the reply
            elif isinstance(ev, RemoteDetach) and ev.link.state is LinkState.DETACH_RCVD:
                ev.link.detach(None, ev.closed)
        seen = len(hub.events)
        hub.poke()
        await hub._changed.wait()


async def put_token(dev: Peer) -> tuple[Any, Any]:
    """The device's $cbs links and one unsettled put-token; returns (sender, receiver)."""
    session = dev.engine.begin()
    tx = session.attach("cbs-tx", "sender", Source(address="cbs-reply"), Target(address="$cbs"))
    rx = session.attach("cbs-rx", "receiver", Source(address="$cbs"), Target(address="cbs-reply"))
    dev.poke()
    await dev.next(RemoteAttach, lambda e: e.link is tx)
    await dev.next(RemoteAttach, lambda e: e.link is rx)
    rx.flow(10)
    request = Message(
        properties=Properties(message_id="put-1", to="$cbs", reply_to="cbs-reply"),
        application_properties={"operation": "put-token", "type": "servicebus.windows.net:sastoken",
                                "name": f"{HUB}/devices/dev1"},  # fmt: skip
        body=[AmqpValue("SharedAccessSignature sr=x&sig=y&se=1")],
    )
    await dev.wait_for(lambda: tx.credit > 0)
    tx.send_transfer(b"\x01", encode_message(request), settled=False)
    dev.poke()
    return tx, rx


async def test_reply_written_before_the_settlement_reaches_the_device_after_it(monkeypatch) -> None:
    async with router_harness(monkeypatch) as h:
        dev = await h.device()
        tx, rx = await put_token(dev)
        await h._hub_ready.wait()  # the put-token opened the hub connection
        h.nursery.start_soon(serve_hub, h.hub, True)
        reply = await dev.next(TransferReceived, lambda e: e.link is rx)
        outcome = await dev.next(DispositionReceived)
        # The request's outcome came first, then the reply (whose correlation-id is ours).
        assert dev.events.index(outcome) < dev.events.index(reply)
        assert isinstance(outcome.state, Accepted) and outcome.settled
        assert decode_message(bytes(reply.payload)).properties.correlation_id == "put-1"


async def test_reply_of_a_hub_that_never_settles_is_not_held_forever(monkeypatch, autojump_clock) -> None:
    async with router_harness(monkeypatch) as h:
        dev = await h.device()
        tx, rx = await put_token(dev)
        await h._hub_ready.wait()
        h.nursery.start_soon(serve_hub, h.hub, False)
        start = trio.current_time()
        reply = await dev.next(TransferReceived, lambda e: e.link is rx, timeout=30)
        assert trio.current_time() - start >= cbs.HOLD_REPLY_MAX
        assert decode_message(bytes(reply.payload)).properties.correlation_id == "put-1"
        assert not dev.of(DispositionReceived)
