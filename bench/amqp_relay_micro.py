"""Micro-benchmark of the AMQP relay's engine work per message, without I/O.

    python -m bench.amqp_relay_micro            # full run (a few seconds)
    python -m bench.amqp_relay_micro --quick    # smoke run

The gateway's two engines of one link pair (device side: server, upstream
side: client) relay batches of 1 KiB unsettled messages the way the router
does: each received transfer is sent on the upstream link, each disposition
from the hub is relayed to the device. The device and the hub are played by
python-qpid-proton's engine (``proton.Connection`` + ``proton.Transport``,
no sockets), so the bytes the gateway parses are proton's. Only the gateway
engines' calls are timed: the result is the engine's CPU per relayed
message, the part of scenario 1's hop CPU that is not trio, TLS or syscalls.
Loops are bounded in count.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from proton import Collector, Connection, Delivery, Event, Transport

from gateway.amqp import Connection as Engine
from gateway.amqp import DispositionReceived, RemoteAttach, RemoteBegin, TransferReceived
from gateway.amqp.performatives import Accepted

PAYLOAD = bytes(1024)


class ProtonPeer:
    """A proton engine driven through its transport by hand (with `sasl_anonymous`,
    a SASL layer offering or choosing ANONYMOUS in front of AMQP)."""

    def __init__(self, server: bool, *, sasl_anonymous: bool = False) -> None:
        self.conn = Connection()
        self.transport = Transport(Transport.SERVER if server else Transport.CLIENT)
        if sasl_anonymous:
            self.transport.sasl().allowed_mechs("ANONYMOUS")
        self.transport.bind(self.conn)
        self.collector = Collector()
        self.conn.collect(self.collector)

    def take(self) -> bytes:
        out = []
        while True:
            n = self.transport.pending()
            if n <= 0:
                break
            out.append(self.transport.peek(n))
            self.transport.pop(n)
        return b"".join(out)

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.transport.capacity()
            if n <= 0:
                raise RuntimeError("proton transport refused input")
            self.transport.push(bytes(view[:n]))
            view = view[n:]

    def events(self) -> list[Event]:
        evs = []
        while self.collector.peek():
            evs.append(self.collector.peek())
            self.collector.pop()
        return evs


class Relay:
    """Device (proton client) -> gateway device engine -> gateway upstream engine -> hub (proton)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.device = ProtonPeer(server=False)
        self.hub = ProtonPeer(server=True)
        self.gw_dev = Engine("server", "gw")
        self.gw_up = Engine("client", "gw", hostname="hub")
        self.gw_dev.open()
        self.gw_up.open()
        self.up_link: Any = None
        self.dev_link: Any = None
        self.gw_time = 0.0
        self.relayed = 0
        self.settled = 0
        dc = self.device.conn
        dc.container = "device"
        dc.open()
        ds = dc.session()
        ds.open()
        self.sender = ds.sender("events")
        self.sender.target.address = "devices/d1/messages/events"
        self.sender.open()
        self.hub.conn.container = "hub"
        self.tags = 0
        self._handshake()

    def _gw(self, fn: Any, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.gw_time += time.perf_counter() - started

    def _pump_once(self) -> bool:
        moved = False
        data = self.device.take()
        if data:
            moved = True
            self._on_dev_events(self._gw(self.gw_dev.receive_data, data))
        data = self._gw(self.gw_up.data_to_send)
        if data:
            moved = True
            self.hub.feed(data)
            self._hub_events()
        data = self.hub.take()
        if data:
            moved = True
            self._on_up_events(self._gw(self.gw_up.receive_data, data))
        data = self._gw(self.gw_dev.data_to_send)
        if data:
            moved = True
            self.device.feed(data)
            self._device_events()
        return moved

    def _handshake(self) -> None:
        for _ in range(50):
            self._pump_once()
            if self.up_link is not None and self.sender.credit > 0:
                return
        raise RuntimeError("link did not attach")

    def _on_dev_events(self, events: list[Any]) -> None:
        for ev in events:
            t = type(ev)
            if t is TransferReceived:
                self._gw(self._relay_transfer, ev)
            elif t is RemoteBegin:
                ev.session.answer_begin()
                self.up_session = self.gw_up.begin()
            elif t is RemoteAttach:
                self.dev_link = ev.link
                a = ev.attach
                self.up_link = self.up_session.attach("events", False, a.source, a.target)
            elif t is DispositionReceived:
                pass

    def _relay_transfer(self, ev: Any) -> None:
        d = self.up_link.send_transfer(ev.delivery_tag, ev.payload,
                                       message_format=ev.message_format, settled=ev.settled)  # fmt: skip
        d.context = ev.delivery
        self.relayed += 1

    def _on_up_events(self, events: list[Any]) -> None:
        for ev in events:
            t = type(ev)
            if t is DispositionReceived:
                self._gw(self._relay_disposition, ev)
            elif t is RemoteAttach and self.dev_link is not None:
                a = ev.attach
                self.dev_link.answer_attach(a.source, a.target)
                self.dev_link.flow(self.up_link.credit)
            elif t.__name__ == "RemoteFlow" and self.dev_link is not None:
                self._gw(self._sync_credit)

    def _sync_credit(self) -> None:
        want = max(0, self.up_link.credit - self.up_link.queued)
        if want != self.dev_link.credit:
            self.dev_link.flow(want)

    def _relay_disposition(self, ev: Any) -> None:
        others = [d.context for d in ev.deliveries]
        self.gw_dev.disposition(others, settled=ev.settled, state=ev.state)
        self._sync_credit()

    def _hub_events(self) -> None:
        for ev in self.hub.events():
            if ev.type == Event.CONNECTION_REMOTE_OPEN:
                ev.connection.open()
            elif ev.type == Event.SESSION_REMOTE_OPEN:
                ev.session.open()
            elif ev.type == Event.LINK_REMOTE_OPEN:
                link = ev.link
                link.target.copy(link.remote_target)
                link.source.copy(link.remote_source)
                link.open()
                link.flow(self.window)
            elif ev.type == Event.DELIVERY:
                link = ev.delivery.link
                if not link.is_receiver:
                    continue
                while True:
                    d = link.current
                    if d is None or not d.readable or d.partial:
                        break
                    link.recv(d.pending)
                    d.update(Delivery.ACCEPTED)
                    d.settle()
                    link.advance()
                    link.flow(1)

    def _device_events(self) -> None:
        for ev in self.device.events():
            if ev.type == Event.DELIVERY:
                d = ev.delivery
                if d.remote_state and d.settled is False:
                    self.settled += 1
                    d.settle()

    def send(self, n: int) -> None:
        for _ in range(n):
            if self.sender.credit <= 0:
                break
            self.tags += 1
            d = self.sender.delivery(str(self.tags).encode())
            self.sender.send(PAYLOAD)
            self.sender.advance()
            del d

    def run(self, messages: int, batch: int) -> float:
        target = self.relayed + messages
        while self.relayed < target:
            self.send(batch)
            for _ in range(20):
                if not self._pump_once():
                    break
        return self.gw_time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.amqp_relay_micro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 10, 50])
    args = parser.parse_args(argv)
    messages = 2000 if args.quick else 20000
    _ = Accepted  # the hub's outcome, as decoded by the gateway
    for batch in args.batch:
        relay = Relay(window=max(100, batch * 2))
        relay.run(messages // 10, batch)  # warm up
        before = relay.gw_time
        relayed = relay.relayed
        relay.run(messages, batch)
        n = relay.relayed - relayed
        us = (relay.gw_time - before) / n * 1e6
        print(
            f"batch {batch:4d}: {us:6.2f} us of gateway engine work per relayed message ({n} msgs)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
