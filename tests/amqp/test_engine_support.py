"""Shared helpers for the engine tests (no tests here).

- ``ProtonPeer``: a python-qpid-proton endpoint driven sans-I/O (Transport push/peek/pop
  plus its event Collector), the independent peer our engine is tested against.
- ``exchange``: moves bytes between our Connection and a ProtonPeer until both are quiet.
- ``pipe``: the same for two of our own Connections.
- ``EngineApp``: a small application on top of our Connection that answers begins and
  attaches, grants credit, records transfers and settles them with a chosen outcome.
- ``serve_engine``: a trio loop running a Connection over a socket stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import proton
import trio
from proton import Collector, Transport
from proton import Event as PEvent

from gateway.amqp import (
    Connection,
    ConnectionError,
    DispositionReceived,
    Event,
    LinkError,
    RemoteAttach,
    RemoteBegin,
    RemoteClose,
    RemoteDetach,
    RemoteEnd,
    RemoteFlow,
    SaslAuthenticated,
    SessionState,
    TransferReceived,
)
from gateway.amqp.link import LinkState
from gateway.amqp.performatives import Accepted, Error, Modified, Rejected, Released


def payload_for(i: int, size: int | None = None) -> bytes:
    """Deterministic message bytes for delivery ``i`` (not a valid AMQP message: the
    engine never parses message bytes, and neither does proton's link layer)."""
    head = b"msg-%08d|" % i
    if size is None:
        size = len(head) + (i * 37) % 200
    reps = size // len(head) + 1
    return (head * reps)[:size]


def outcome_for(i: int) -> Any:
    """The outcome a receiver gives unsettled delivery ``i`` (all four kinds)."""
    k = (i >> 1) % 4
    if k == 0:
        return Accepted()
    if k == 1:
        return Rejected(Error("amqp:internal-error", f"rejected {i}"))
    if k == 2:
        return Released()
    return Modified(delivery_failed=True, undeliverable_here=False)


PROTON_OUTCOMES = {
    "Accepted": proton.Delivery.ACCEPTED,
    "Rejected": proton.Delivery.REJECTED,
    "Released": proton.Delivery.RELEASED,
    "Modified": proton.Delivery.MODIFIED,
}


class ProtonPeer:
    """A proton Connection bound to a Transport we feed by hand."""

    def __init__(
        self,
        server: bool,
        *,
        mechs: str | None = None,
        user: str | None = None,
        password: str | None = None,
        max_frame: int | None = None,
        idle_timeout: float | None = None,
        container: str = "proton-peer",
        hostname: str | None = None,
    ) -> None:
        self.transport = Transport(Transport.SERVER if server else Transport.CLIENT)
        if max_frame:
            self.transport.max_frame_size = max_frame
        if idle_timeout:
            self.transport.idle_timeout = idle_timeout
        self.conn = proton.Connection()
        self.conn.container = container
        if hostname:
            self.conn.hostname = hostname
        if user is not None:
            self.conn.user = user
            self.conn.password = password
        self.collector = Collector()
        self.conn.collect(self.collector)
        if mechs is not None:
            sasl = self.transport.sasl()
            sasl.allowed_mechs(mechs)
            sasl.allow_insecure_mechs = True
        self.transport.bind(self.conn)
        self.wire_in = 0

    def output(self) -> bytes:
        n = self.transport.pending()
        if n <= 0:
            return b""
        data = self.transport.peek(n)
        self.transport.pop(n)
        return bytes(data)

    def input(self, data: bytes) -> None:
        view = memoryview(data)
        self.wire_in += len(data)
        while view.nbytes:
            cap = self.transport.capacity()
            if cap <= 0:
                return  # proton closed its input (after an error or close)
            self.transport.push(bytes(view[:cap]))
            view = view[cap:]

    def events(self) -> list[PEvent]:
        out = []
        while True:
            ev = self.collector.peek()
            if ev is None:
                return out
            out.append(_Snapshot(ev))
            self.collector.pop()


class _Snapshot:
    """The parts of a proton event we use (proton reuses event objects)."""

    __slots__ = ("type", "link", "delivery", "session", "connection")

    def __init__(self, ev: PEvent) -> None:
        self.type = ev.type
        self.link = ev.link
        self.delivery = ev.delivery
        self.session = ev.session
        self.connection = ev.connection


def exchange(
    ours: Connection,
    peer: ProtonPeer,
    on_ours: Callable[[list[Event]], None] | None = None,
    on_peer: Callable[[Any], None] | None = None,
    *,
    drop_ours: bool = False,
    drop_peer: bool = False,
    tap: Callable[[bytes], None] | None = None,
    max_rounds: int = 200_000,
) -> None:
    """Move bytes both ways until neither side has anything more to say. ``tap`` sees
    every chunk we write; ``drop_*`` loses one side's output (a silent peer)."""
    for _ in range(max_rounds):
        moved = False
        data = peer.output()
        if data:
            moved = True
            if not drop_peer:
                events = ours.receive_data(data)
                if on_ours is not None:
                    on_ours(events)
        for ev in peer.events():
            moved = True
            if on_peer is not None:
                on_peer(ev)
        data = ours.data_to_send()
        if data:
            moved = True
            if tap is not None:
                tap(data)
            if not drop_ours:
                peer.input(data)
        if not moved:
            return
    raise AssertionError("the two endpoints never went quiet")


def pipe(
    a: Connection,
    b: Connection,
    on_a: Callable[[list[Event]], None] | None = None,
    on_b: Callable[[list[Event]], None] | None = None,
    max_rounds: int = 100_000,
) -> None:
    """Move bytes between two of our engines until both are quiet."""
    for _ in range(max_rounds):
        da = a.data_to_send()
        db = b.data_to_send()
        if not da and not db:
            return
        if da:
            ev = b.receive_data(da)
            if on_b is not None:
                on_b(ev)
        if db:
            ev = a.receive_data(db)
            if on_a is not None:
                on_a(ev)
    raise AssertionError("the two engines never went quiet")


class EngineApp:
    """Drives one of our Connections like a simple broker or client would."""

    def __init__(
        self,
        conn: Connection,
        *,
        credit: int = 200,
        outcome: Callable[[int, TransferReceived], Any] | None = None,
        settle_in_batches: bool = False,
        incoming_window: int | None = None,
        reply_close: bool = True,
    ) -> None:
        self.conn = conn
        self.credit = credit
        self.outcome = outcome
        self.settle_in_batches = settle_in_batches
        self.incoming_window = incoming_window
        self.reply_close = reply_close
        self.events: list[Event] = []
        self.received: list[TransferReceived] = []
        self.dispositions: list[DispositionReceived] = []
        self.auth: SaslAuthenticated | None = None
        self.errors: list[ConnectionError] = []
        self.link_errors: list[LinkError] = []
        self.to_settle: list[tuple[Any, Any]] = []
        self.links: list[Any] = []
        self.refill = True  # top credit up as messages arrive

    def __call__(self, events: list[Event]) -> None:
        for e in events:
            self.events.append(e)
            if isinstance(e, SaslAuthenticated):
                self.auth = e
            elif isinstance(e, RemoteBegin):
                if e.session.state is SessionState.BEGIN_RCVD:
                    e.session.answer_begin(incoming_window=self.incoming_window)
            elif isinstance(e, RemoteAttach):
                link = e.link
                if link.state is LinkState.ATTACH_RCVD:
                    link.answer_attach(e.attach.source, e.attach.target)
                    self.links.append(link)
                if link.is_receiver and self.credit and link.is_open:
                    link.flow(self.credit)
            elif isinstance(e, TransferReceived):
                self.received.append(e)
                link = e.link
                if self.refill and link.credit < self.credit // 2 and link.is_open:
                    link.flow(self.credit)
                if not e.settled and self.outcome is not None:
                    state = self.outcome(len(self.received) - 1, e)
                    if self.settle_in_batches:
                        self.to_settle.append((e.delivery, state))
                    else:
                        e.delivery.update(state, settled=True)
            elif isinstance(e, DispositionReceived):
                self.dispositions.append(e)
            elif isinstance(e, RemoteFlow):
                pass
            elif isinstance(e, RemoteDetach):
                e.link.detach()
            elif isinstance(e, RemoteEnd):
                e.session.end()
            elif isinstance(e, RemoteClose):
                if self.reply_close:
                    self.conn.close()
            elif isinstance(e, ConnectionError):
                self.errors.append(e)
            elif isinstance(e, LinkError):
                self.link_errors.append(e)
        if self.to_settle and self.settle_in_batches:
            self.flush_settlements()

    def flush_settlements(self) -> None:
        # One disposition call per outcome kind: the engine coalesces id ranges.
        by_kind: dict[str, list[Any]] = {}
        states: dict[str, Any] = {}
        for d, state in self.to_settle:
            key = repr(state)
            by_kind.setdefault(key, []).append(d)
            states[key] = state
        self.to_settle.clear()
        for key, ds in by_kind.items():
            self.conn.disposition(ds, settled=True, state=states[key])


async def serve_engine(
    stream: trio.abc.Stream,
    conn: Connection,
    app: Callable[[list[Event]], None],
    *,
    step: Callable[[], None] | None = None,
) -> None:
    """Run ``conn`` over ``stream`` until it is closed; ``step`` runs after each batch
    of events (the place to send more)."""
    while True:
        data = conn.data_to_send()
        if data:
            await stream.send_all(data)
        if conn.closed:
            return
        now = trio.current_time()
        deadline = conn.next_deadline(now)
        chunk = None
        with trio.move_on_at(deadline if deadline is not None else float("inf")):
            chunk = await stream.receive_some(65536)
        if chunk is None:
            app(conn.tick(trio.current_time()))
        else:
            app(conn.receive_data(chunk))
            app(conn.tick(trio.current_time()))
            if not chunk:
                data = conn.data_to_send()
                if data:
                    try:
                        await stream.send_all(data)
                    except trio.BrokenResourceError:
                        pass
                return
        if step is not None:
            step()
