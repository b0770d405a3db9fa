"""A routed link: the device's link and its upstream twin, and the relay between them.

Direction: below the connections; imports only `routes` and the observer
interface. What a pair needs of its device and upstream connections is
declared here (`PairDevice`, `PairUpstream`).

The device's attach is held until the hub answers the upstream attach; the
device then gets the hub's answer (termini, settle modes, properties,
capabilities, max-message-size, initial-delivery-count) unchanged.
Transfers are relayed with their delivery tag, message format, settlement and
payload bytes untouched (the engines re-fragment to each hop's frame size);
dispositions both ways with the peer's outcome; detaches both ways with the
peer's error.

Credit (design item 5): a device sender never holds more credit than the hub
granted the upstream link, less what is still queued upstream; a device
receiver's credit is passed up less what is queued towards the device. Drain
is relayed edge-triggered: a drain request is forwarded once, and answered
on the requesting side when the other side has answered it.

Operations: a pair reported open to the observer carries its live registry
record in ``info`` (deliveries relayed, written in place; the record reads
the device link's credit and unsettled count itself when shown); `timed_handler` measures the relay
latency per received chunk. Messages are counted per pair as they are
relayed and reported to the observer once per handled chunk
(`flush_relay_counts`, called by the connections' event handlers before they
return), so metrics and registry see every message, in one call per batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from gateway.amqp import Delivery, Link, LinkState, LocalProtocolError, Session
from gateway.amqp.performatives import Attach, Error, Flow
from gateway.amqp.types import Symbol

from .observe import RouterObserver
from .routes import Direction, RouteMatch

log = logging.getLogger("gateway.router")


class _HasObserver(Protocol):
    @property
    def observer(self) -> RouterObserver: ...


class PairDevice(Protocol):
    """The device connection a pair belongs to (`device.DeviceConn`)."""

    @property
    def id(self) -> str: ...
    @property
    def router(self) -> _HasObserver: ...
    @property
    def pairs(self) -> set[LinkPair]: ...
    def wake(self) -> None: ...


class PairUpstream(Protocol):
    """The upstream connection a pair is tunnelled over (`upstream.UpstreamConn`)."""

    @property
    def id(self) -> str: ...
    @property
    def pairs(self) -> set[LinkPair]: ...
    def session_for(self, device: PairDevice, device_session: Session) -> Session: ...
    def unique_link_name(self, name: str) -> str: ...
    def wake(self) -> None: ...

NOT_FOUND = "amqp:not-found"
UNAUTHORIZED = "amqp:unauthorized-access"
FORCED = "amqp:connection:forced"
RESOURCE_LIMIT = "amqp:resource-limit-exceeded"

_GONE = (LinkState.DETACH_SENT, LinkState.DETACHED)


def amqp_error(condition: str, description: str | None = None, info: Any = None) -> Error:
    return Error(Symbol(condition), description, info)


def refuse_attach(link: Link, error: Error) -> None:
    """Answer a peer's attach with a null terminus on our side, then detach with error."""
    if link.state is LinkState.ATTACH_RCVD:
        remote = link.remote_attach
        assert remote is not None
        if link.is_sender:  # the peer receives: our source is the refused node
            link.answer_attach(source=None, target=remote.target)
        else:
            link.answer_attach(source=remote.source, target=None)
    if link.state not in _GONE:
        link.detach(error, closed=True)


class PairState:
    PENDING = "pending"  # waiting for an upstream connection
    ATTACHING = "attaching"  # upstream attach sent, device attach held
    ATTACHED = "attached"
    REFUSED = "refused"  # the hub answered with a null terminus; its detach follows
    DONE = "done"


class LinkPair:
    """One device link tunnelled to one upstream link."""

    def __init__(self, device: PairDevice, link: Link, attach: Attach, route: RouteMatch,
                 direction: Direction, connector: str) -> None:  # fmt: skip
        self.device = device
        self.dev_link = link
        self.attach = attach
        self.route = route
        self.direction = direction  # "in": device sends; "out": device receives
        self.connector = connector
        self.upstream: PairUpstream | None = None
        self.up_link: Link | None = None
        self.state = PairState.PENDING
        # drain bookkeeping, see the module docstring
        self._dev_draining = False  # "in": we asked the device to drain for the hub
        self._up_drain_owed = False  # "in": the hub's drain waits for our queue to empty
        self._up_draining = False  # "out": we asked the hub to drain for the device
        self._dev_drain_owed = False  # "out": the device's drain waits for its queue
        self._last_available: int | None = None
        self.observed = False  # reported open to the observer
        self.info: Any = None  # the registry's LinkInfo while observed
        # Relayed since the last flush_relay_counts(): messages and payload bytes.
        self._count = 0
        self._bytes = 0
        link.context = self

    def __repr__(self) -> str:
        return f"<LinkPair {self.attach.name!r} {self.direction} {self.state}>"

    @property
    def address(self) -> str:
        return self.route.address

    # ------------------------------------------------------------------ attach

    def open_upstream(self, upstream: PairUpstream) -> None:
        """Send the mirrored attach on `upstream` (device attach stays held)."""
        if self.state is not PairState.PENDING:
            return
        a = self.attach
        session = upstream.session_for(self.device, self.dev_link.session)
        name = upstream.unique_link_name(str(a.name))
        try:
            up_link = session.attach(
                name,
                bool(a.role),
                a.source,
                a.target,
                snd_settle_mode=a.snd_settle_mode,
                rcv_settle_mode=a.rcv_settle_mode,
                unsettled=a.unsettled,
                incomplete_unsettled=a.incomplete_unsettled,
                initial_delivery_count=a.initial_delivery_count,
                max_message_size=a.max_message_size,
                offered_capabilities=a.offered_capabilities,
                desired_capabilities=a.desired_capabilities,
                properties=a.properties,
            )
        except LocalProtocolError as exc:
            self.refuse(RESOURCE_LIMIT, f"upstream connection cannot take the link: {exc}")
            return
        up_link.context = self
        self.upstream = upstream
        self.up_link = up_link
        upstream.pairs.add(self)
        self.state = PairState.ATTACHING
        upstream.wake()

    def refuse(self, condition: str, description: str, info: Any = None) -> None:
        """Refuse the device's (still held) attach."""
        if self.state is PairState.DONE:
            return
        refuse_attach(self.dev_link, amqp_error(condition, description, info))
        self._finish()
        self.device.wake()

    def on_up_attach(self, attach: Attach) -> None:
        """The hub answered: mirror its attach to the device."""
        if self.state is not PairState.ATTACHING:
            return
        dev = self.dev_link
        if dev.state is not LinkState.ATTACH_RCVD:
            return
        dev.answer_attach(
            source=attach.source,
            target=attach.target,
            snd_settle_mode=attach.snd_settle_mode,
            rcv_settle_mode=attach.rcv_settle_mode,
            unsettled=attach.unsettled,
            incomplete_unsettled=attach.incomplete_unsettled,
            initial_delivery_count=attach.initial_delivery_count,
            max_message_size=attach.max_message_size,
            offered_capabilities=attach.offered_capabilities,
            desired_capabilities=attach.desired_capabilities,
            properties=attach.properties,
        )
        refused = attach.target is None if self.direction == "in" else attach.source is None
        self.state = PairState.REFUSED if refused else PairState.ATTACHED
        if not refused:
            self._sync_credit()
        self.device.wake()

    # ----------------------------------------------------------------- detach

    def on_dev_detach(self, closed: bool, error: Error | None) -> None:
        """The device detached: answer it and detach upstream with its error."""
        dev = self.dev_link
        if dev.state is LinkState.DETACH_RCVD:
            dev.detach(None, closed)
        up = self.up_link
        if up is not None and up.state not in _GONE:
            up.detach(error, closed)
            assert self.upstream is not None
            self.upstream.wake()
        self._finish()
        self.device.wake()

    def on_up_detach(self, closed: bool, error: Error | None) -> None:
        """The hub detached: answer it and detach the device with the hub's error."""
        up = self.up_link
        if up is not None and up.state is LinkState.DETACH_RCVD:
            up.detach(None, closed)
            assert self.upstream is not None
            self.upstream.wake()
        dev = self.dev_link
        if dev.state is LinkState.ATTACH_RCVD:
            refuse_attach(dev, error or amqp_error(NOT_FOUND, "the hub detached the link"))
        elif dev.state not in _GONE:
            dev.detach(error, closed)
        self._finish()
        self.device.wake()

    def upstream_lost(self, error: Error) -> None:
        """The upstream connection is gone: the device link goes with `error`.

        Unsettled deliveries stay unsettled on the device side (never settled
        on the hub's behalf), so the device resends them.
        """
        dev = self.dev_link
        if dev.state is LinkState.ATTACH_RCVD:
            refuse_attach(dev, error)
        elif dev.state not in _GONE:
            dev.detach(error, True)
        self.up_link = None
        self._finish()
        self.device.wake()

    def device_lost(self) -> None:
        """The device connection is gone: detach upstream (no error: a clean close)."""
        up = self.up_link
        if up is not None and up.state not in _GONE:
            up.detach(None, True)
            assert self.upstream is not None
            self.upstream.wake()
        self._finish()

    def shutdown(self, error: Error) -> None:
        """The gateway is stopping: detach both sides, the device's with `error`."""
        self.device_lost()
        dev = self.dev_link
        if dev.state is LinkState.ATTACH_RCVD:
            refuse_attach(dev, error)
        elif dev.state not in _GONE:
            dev.detach(error, True)
        self.device.wake()

    def _finish(self) -> None:
        if self.state is PairState.DONE:
            return
        if self._count:
            self._flush_counts()  # before the observer hears the link closed
        self.state = PairState.DONE
        self.device.pairs.discard(self)
        if self.upstream is not None:
            self.upstream.pairs.discard(self)
        self.device.router.observer.on_link_closed(self)

    # -------------------------------------------------------------- transfers

    def on_dev_transfer(self, ev: Any) -> None:
        """A complete message from the device (direction in)."""
        if ev.aborted or self.state is not PairState.ATTACHED:
            return
        up = self.up_link
        if up is None or up.state is not LinkState.ATTACHED:
            return  # the link is going away; the device hears of it by detach
        self._relay_transfer(ev, up)
        assert self.upstream is not None
        self.upstream.wake()

    def on_up_transfer(self, ev: Any) -> None:
        """A complete message from the hub (direction out)."""
        if ev.aborted or self.state is not PairState.ATTACHED:
            return
        dev = self.dev_link
        if dev.state is not LinkState.ATTACHED:
            return
        self._relay_transfer(ev, dev)
        self._sync_credit()
        self.device.wake()

    def _relay_transfer(self, ev: Any, to: Link) -> None:
        """Send `ev`'s message on `to` unchanged (tag, format, settlement, state);
        an unsettled delivery is tied to its twin so outcomes flow back."""
        d = to.send_transfer(
            ev.delivery_tag,
            ev.payload,
            message_format=ev.message_format,
            settled=ev.settled,
            state=ev.state,
            batchable=ev.batchable,
        )
        if not ev.settled:
            d.context = ev.delivery
            ev.delivery.context = d
        relayed = _relayed
        relayed.count += 1
        n = self._count
        if not n:
            relayed.dirty.append(self)
        self._count = n + 1
        self._bytes += len(ev.payload)

    def _flush_counts(self) -> None:
        """Report the messages relayed since the last flush (metrics, registry)."""
        n = self._count
        if not n:
            return
        nbytes = self._bytes
        self._count = self._bytes = 0
        info = self.info
        if info is not None:
            info.deliveries += n
        self.device.router.observer.on_message(self, nbytes, n)

    # ------------------------------------------------------------------ credit

    def on_dev_flow(self, flow: Flow) -> None:
        if self.state is not PairState.ATTACHED:
            return  # credit is passed on once the hub answered the attach
        if self.direction == "out":
            # The device (receiver) granted credit or asked to drain.
            up = self.up_link
            assert up is not None
            if up.state is not LinkState.ATTACHED:
                return
            want = self._out_credit()
            if flow.drain and want > 0 and not self._up_draining:
                up.flow(want, drain=True)
                self._up_draining = True
            elif not self._up_draining and want != up.credit:
                up.flow(want)
            if flow.drain and want == 0 and not self._up_draining:
                self._dev_drain_owed = True  # nothing outstanding upstream
            self._answer_dev_drain()
            assert self.upstream is not None
            self.upstream.wake()
        else:
            # The device (sender) reported its state, e.g. answering our drain.
            dev = self.dev_link
            if self._dev_draining and dev.credit == 0:
                self._dev_draining = False
                self._up_drain_owed = True
            self._answer_up_drain()

    def on_up_flow(self, flow: Flow) -> None:
        if self.state is not PairState.ATTACHED:
            return
        up = self.up_link
        assert up is not None
        if self.direction == "in":
            # The hub (receiver) granted credit or asked to drain.
            dev = self.dev_link
            want = self._in_credit()
            if flow.drain:
                if want == 0 and not up.queued:
                    up.drained()  # nothing to drain from the device
                    assert self.upstream is not None
                    self.upstream.wake()
                else:
                    dev.flow(want, drain=True)
                    self._dev_draining = True
            elif want != dev.credit:
                dev.flow(want)
            self._answer_up_drain()
            self.device.wake()
        else:
            # The hub (sender) answered our drain or reported availability.
            if self._up_draining and up.credit == 0:
                self._up_draining = False
                self._dev_drain_owed = True
            if flow.available is not None and flow.available != self._last_available:
                self._last_available = flow.available
                if self.dev_link.state is LinkState.ATTACHED:
                    self.dev_link.flow(available=int(flow.available))
            self._answer_dev_drain()
            self.device.wake()

    def _in_credit(self) -> int:
        up = self.up_link
        assert up is not None
        return max(0, up.credit - up.queued)

    def _out_credit(self) -> int:
        dev = self.dev_link
        return max(0, dev.credit - dev.queued)

    def _sync_credit(self) -> None:
        """Bring the downstream credit in line after an attach or a transfer."""
        if self.state is not PairState.ATTACHED:
            return
        up = self.up_link
        dev = self.dev_link
        assert up is not None
        if self.direction == "in":
            if self._dev_draining or dev.state is not LinkState.ATTACHED:
                return
            want = self._in_credit()
            if up.drain and want > 0:
                dev.flow(want, drain=True)
                self._dev_draining = True
            elif want != dev.credit:
                dev.flow(want)
            self.device.wake()
        else:
            if self._up_draining or self._dev_drain_owed or up.state is not LinkState.ATTACHED:
                return
            want = self._out_credit()
            if dev.drain and want > 0:
                up.flow(want, drain=True)
                self._up_draining = True
            elif want != up.credit:
                up.flow(want)
            assert self.upstream is not None
            self.upstream.wake()

    def _answer_up_drain(self) -> None:
        up = self.up_link
        if self._up_drain_owed and up is not None and not up.queued:
            self._up_drain_owed = False
            if up.state is LinkState.ATTACHED:
                up.drained()
                assert self.upstream is not None
                self.upstream.wake()

    def _answer_dev_drain(self) -> None:
        dev = self.dev_link
        if self._dev_drain_owed and not dev.queued:
            self._dev_drain_owed = False
            if dev.state is LinkState.ATTACHED:
                dev.drained()
                self.device.wake()

    def on_queue_progress(self) -> None:
        """Called after session flows: queued deliveries may have left."""
        if self.state is PairState.ATTACHED:
            self._answer_up_drain()
            self._answer_dev_drain()


def relay_disposition(ev: Any) -> set[Any]:
    """Relay a disposition to the paired deliveries; returns the connections touched.

    One disposition event has one state and settlement for all its deliveries:
    they are relayed as one call per connection (the engine sends ranges), and
    outcomes are counted once per run of deliveries on the same link."""
    settled = ev.settled
    state = ev.state
    by_conn: dict[Any, list[Delivery]] = {}
    out: list[Delivery] = []
    out_link: Any = None  # the link of the deliveries `out` collects
    count_link: Any = None  # our link whose deliveries `counted` counts
    counted = 0
    for d in ev.deliveries:
        other = d.context
        if type(other) is not Delivery:
            continue  # not relayed (None once settled)
        if settled:
            d.context = None
            other.context = None
        link = other.link
        if link is not out_link:
            out_link = link
            conn = link.session.connection
            got = by_conn.get(conn)
            if got is None:
                got = by_conn[conn] = []
            out = got
        out.append(other)
        ours = d.link
        if ours is not count_link:
            if counted:
                dispositions_relayed(count_link, state, settled, counted)
            count_link = ours
            counted = 0
        counted += 1
    if counted:
        dispositions_relayed(count_link, state, settled, counted)  # ops: outcomes
    touched: set[Any] = set()
    for conn, deliveries in by_conn.items():
        conn.disposition(deliveries, settled=settled, state=state)
        touched.add(conn)
    return touched


# ---- outcomes, for the observer ---------------------------------------------------------

_OUTCOMES = {"Accepted": "accepted", "Rejected": "rejected", "Released": "released",
             "Modified": "modified", "Received": "received"}  # fmt: skip


def outcome_name(state: Any, settled: bool) -> str:
    """A fixed label for a delivery state: accepted, rejected, ..., or settled (no state)."""
    if state is None:
        return "settled" if settled else "none"
    return _OUTCOMES.get(type(state).__name__, "other")


def dispositions_relayed(link: Any, state: Any, settled: bool, count: int) -> None:
    """`count` deliveries on `link` (ours, the link that received the disposition)
    had their peer's disposition relayed to the other hop. Counted when the peer
    is the receiver, i.e. our link is the sender, and the link belongs to a
    routed pair (not a CBS link: put-token replies are not message outcomes)."""
    if not link.is_sender:
        return
    pair = link.context
    if type(pair) is not LinkPair:
        return
    pair.device.router.observer.on_disposition(pair, outcome_name(state, settled), count)


# ---- relay latency ---------------------------------------------------------------------


class _RelayCount:
    """Transfers relayed so far (any pair), which `timed_handler` reads the
    difference of, and the pairs with relayed messages not yet reported."""

    __slots__ = ("count", "dirty")

    def __init__(self) -> None:
        self.count = 0
        self.dirty: list[LinkPair] = []


_relayed = _RelayCount()


def flush_relay_counts() -> None:
    """Report every pair's messages relayed since the last call to the observer.
    Event handlers call it before returning, so nothing reads stale counts."""
    relayed = _relayed
    dirty = relayed.dirty
    if dirty:
        relayed.dirty = []
        for pair in dirty:
            pair._flush_counts()


EventHandler = Callable[[list[Any]], None]
LatencyReport = Callable[[float, int], None]


def timed_handler(handler: EventHandler, report: LatencyReport) -> EventHandler:
    """`handler` (a connection's event handler, called once per received chunk)
    with the relay latency measured: one clock read when the chunk's events are
    handed over, one more if transfers were relayed while handling them; then
    ``report(seconds, transfers)``. The relayed frames are queued on the other
    connection by then and leave in its next write."""
    clock = time.perf_counter
    relayed = _relayed

    def handle(events: list[Any]) -> None:
        before = relayed.count
        started = clock()
        handler(events)
        n = relayed.count - before
        if n:
            report(clock() - started, n)

    return handle
