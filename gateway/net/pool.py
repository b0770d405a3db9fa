"""A pool of upstream connections for one connector.

Device connections lease a place on an upstream connection; the pool keeps at
most ``max_connections`` upstream connections with at most
``max_devices_per_connection`` leases each, opens them on demand, and
reconnects a lost or failed one with exponential backoff and jitter.

Each connection runs one loop (a slot) for as long as it is wanted: it has
devices, or devices asked for it while it was backing off, or it is the one an
``on_demand: false`` connector keeps. While one is backing off no other is
opened (the hub is failing; more connections would only multiply the
attempts). A connection with no device for ``idle_close`` seconds is closed,
and a failed or lost one that no device asked for during its backoff is not
retried: without devices an on-demand connector makes no connection at all.

The pool knows nothing about AMQP: it is given ``connect(slot_id, on_up)``, an
async function that runs one upstream connection for its whole life. It calls
``on_up(conn)`` once the connection is usable (TLS, SASL and open done) and
returns (or raises) when the connection has ended. Connecting is bounded by
``connect_timeout``: the deadline is lifted when ``on_up`` is called.

Randomness and time are injectable (``rng``; trio's clock, e.g. MockClock),
so backoff is testable without sleeping.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import trio

from .hooks import report_connect_failure

log = logging.getLogger("gateway.net.pool")

C = TypeVar("C")

ConnectFn = Callable[[int, Callable[[Any], None]], Awaitable[None]]


class PoolUnavailable(Exception):
    """No upstream connection can take a device right now.

    ``condition`` is the AMQP error condition to refuse the device's attach
    with, ``description`` a readable reason.
    """

    def __init__(self, description: str, condition: str = "amqp:connection:forced") -> None:
        super().__init__(description)
        self.description = description
        self.condition = condition


class PoolObserver(Protocol):
    def on_connector_state(self, connector: str, state: str, detail: str) -> None: ...

    def on_reconnect(self, connector: str) -> None: ...


class _NullObserver:
    def on_connector_state(self, connector: str, state: str, detail: str) -> None:
        pass

    def on_reconnect(self, connector: str) -> None:
        pass


@dataclass
class Backoff:
    """Exponential backoff with "equal jitter": the n-th delay is drawn from
    [d/2, d] where d = min(maximum, initial * factor**n)."""

    initial: float = 1.0
    maximum: float = 30.0
    factor: float = 2.0
    rng: Callable[[], float] = random.random
    attempts: int = 0

    def next_delay(self) -> float:
        exp = min(self.attempts, 64)
        base = min(self.maximum, self.initial * (self.factor**exp))
        self.attempts += 1
        return base / 2 + self.rng() * base / 2

    def reset(self) -> None:
        self.attempts = 0


class SlotState:
    IDLE = "idle"
    CONNECTING = "connecting"
    UP = "up"
    BACKOFF = "backoff"
    CLOSED = "closed"


@dataclass(eq=False)
class Slot(Generic[C]):
    id: int
    state: str = SlotState.IDLE
    conn: C | None = None
    leases: set[Lease[C]] = field(default_factory=set)
    waiting: int = 0  # acquirers waiting for this slot to come up
    retiring: bool = False  # leave the pool when the connection ends
    changed: trio.Event = field(default_factory=trio.Event)
    last_error: str = ""
    retry_at: float = 0.0
    generation: int = 0  # bumped on every (re)connect
    scope: trio.CancelScope | None = None  # the running connect, while there is one

    def load(self) -> int:
        return len(self.leases) + self.waiting

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@dataclass(eq=False)
class Lease(Generic[C]):
    """A device connection's place on one upstream connection."""

    pool: ConnectorPool[C]
    slot: Slot[C]
    conn: C
    generation: int
    owner: Any = None
    lost: trio.Event = field(default_factory=trio.Event)
    released: bool = False

    @property
    def valid(self) -> bool:
        return not self.released and not self.lost.is_set()

    def release(self) -> None:
        self.pool.release(self)

    def retire(self) -> None:
        """Release, and take the connection out of the pool: it will not be
        leased again, and when it ends it is not reconnected (the caller closes
        it, e.g. a dedicated connection whose device left)."""
        self.pool.retire(self)


class ConnectorPool(Generic[C]):
    def __init__(
        self,
        name: str,
        connect: ConnectFn,
        *,
        max_connections: int = 4,
        max_devices_per_connection: int = 200,
        connect_timeout: float = 10.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        on_demand: bool = True,
        rng: Callable[[], float] = random.random,
        observer: PoolObserver | None = None,
        stable_after: float | None = None,
        idle_close: float = 60.0,
        close: Callable[[C], None] | None = None,
    ) -> None:
        if max_connections < 1 or max_devices_per_connection < 1:
            raise ValueError("pool limits must be >= 1")
        self.name = name
        self._connect = connect
        self.max_connections = max_connections
        self.max_devices_per_connection = max_devices_per_connection
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.on_demand = on_demand
        self._rng = rng
        self._observer: PoolObserver = observer or _NullObserver()
        # A connection that stayed up this long resets its backoff.
        self.stable_after = stable_after if stable_after is not None else backoff_max
        # A connection with no device this long is closed (0: never), by ``close(conn)``
        # (a clean close by its owner) or else by cancelling its connect.
        self.idle_close = idle_close
        self._close_conn = close
        self._asked_at = -math.inf  # the last acquire: devices still want a connection
        self.slots: list[Slot[C]] = []
        self._ids = itertools.count()
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._closing = trio.Event()

    # ---- lifecycle -------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[ConnectorPool[C]] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the slots' tasks; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if not self.on_demand:
                self._new_slot()
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                self._closed = True
                for slot in self.slots:
                    self._set_state(slot, SlotState.CLOSED, "pool closed")
                    self._drop_leases(slot)
                nursery.cancel_scope.cancel()

    def close(self) -> None:
        """Stop connecting: no new connections, no reconnects (the owner closes
        the open ones)."""
        self._closed = True
        self._closing.set()

    # ---- reachability (cheap: a look at at most max_connections slots) ----

    @property
    def usable(self) -> bool:
        """A connection is up and may be leased (it may be full)."""
        return any(s.state == SlotState.UP and not s.retiring for s in self.slots)

    @property
    def backing_off(self) -> bool:
        """No usable connection, and the last attempt failed: the hub is unreachable
        until a retry succeeds (False when nothing was tried: an idle on-demand pool)."""
        return not self.usable and any(s.state == SlotState.BACKOFF for s in self.slots)

    # ---- leasing ---------------------------------------------------------

    async def acquire(self, owner: Any = None) -> Lease[C]:
        """A lease on an up connection with room, opening one if needed.

        Waits at most ``connect_timeout`` for a connection being opened.
        Raises PoolUnavailable when every connection is full, failing, or
        backing off after a failure.
        """
        if self._closed or self._nursery is None:
            raise PoolUnavailable(f"connector {self.name!r} is not running")
        self._asked_at = trio.current_time()
        cap = self.max_devices_per_connection
        up = [s for s in self.slots
              if s.state == SlotState.UP and s.load() < cap and not s.retiring]
        if up:
            return self._lease(min(up, key=Slot.load), owner)
        pending = [s for s in self.slots if s.state in (SlotState.CONNECTING, SlotState.IDLE)
                   and s.load() < cap and not s.retiring]  # fmt: skip
        backing = [s for s in self.slots if s.state == SlotState.BACKOFF]
        if pending:
            slot = min(pending, key=Slot.load)
        elif backing:
            # Not another connection while one is backing off: the hub is failing.
            s = min(backing, key=lambda s: s.retry_at)
            wait = max(0.0, s.retry_at - trio.current_time())
            raise PoolUnavailable(
                f"connector {self.name!r} unavailable ({s.last_error or 'connection lost'}); "
                f"retrying in {wait:.1f}s"
            )
        elif len(self.slots) < self.max_connections:
            slot = self._new_slot()
        else:
            raise PoolUnavailable(
                f"connector {self.name!r} is full: {self.max_connections} connections x "
                f"{cap} devices",
                condition="amqp:resource-limit-exceeded",
            )
        return await self._wait_up(slot, owner)

    async def _wait_up(self, slot: Slot[C], owner: Any) -> Lease[C]:
        slot.waiting += 1
        try:
            with trio.move_on_after(self.connect_timeout + 1.0):
                while slot.state in (SlotState.CONNECTING, SlotState.IDLE):
                    await slot.changed.wait()
        finally:
            slot.waiting -= 1
        if slot.state == SlotState.UP:
            return self._lease(slot, owner)
        raise PoolUnavailable(
            f"connector {self.name!r} unavailable: {slot.last_error or slot.state}"
        )

    def _lease(self, slot: Slot[C], owner: Any) -> Lease[C]:
        assert slot.conn is not None
        lease = Lease(self, slot, slot.conn, slot.generation, owner)
        slot.leases.add(lease)
        if len(slot.leases) == 1:
            slot._notify()  # no longer idle
        return lease

    def release(self, lease: Lease[C]) -> None:
        if lease.released:
            return
        lease.released = True
        slot = lease.slot
        slot.leases.discard(lease)
        if not slot.leases:
            slot._notify()  # idle from now: see _watch_idle

    def retire(self, lease: Lease[C]) -> None:
        self.release(lease)
        slot = lease.slot
        if slot.generation == lease.generation:
            slot.retiring = True

    def leases_of(self, conn: C) -> list[Lease[C]]:
        for slot in self.slots:
            if slot.conn is conn:
                return list(slot.leases)
        return []

    # ---- slots -----------------------------------------------------------

    def _new_slot(self) -> Slot[C]:
        assert self._nursery is not None
        slot: Slot[C] = Slot(next(self._ids))
        slot.state = SlotState.CONNECTING
        self.slots.append(slot)
        self._nursery.start_soon(self._slot_loop, slot)
        return slot

    def _set_state(self, slot: Slot[C], state: str, detail: str = "") -> None:
        slot.state = state
        slot._notify()
        up = sum(1 for s in self.slots if s.state == SlotState.UP)
        summary = f"{up}/{len(self.slots)} up"
        self._observer.on_connector_state(self.name, self._pool_state(), summary)

    def _pool_state(self) -> str:
        states = {s.state for s in self.slots}
        if SlotState.UP in states:
            return "up"
        if SlotState.CONNECTING in states:
            return "connecting"
        if SlotState.BACKOFF in states:
            return "backoff"
        return "idle"

    def _drop_leases(self, slot: Slot[C]) -> int:
        """The connection is gone: its leases are lost. How many there were."""
        count = len(slot.leases)
        for lease in list(slot.leases):
            lease.lost.set()
        slot.leases.clear()
        return count

    def _keeps(self, slot: Slot[C]) -> bool:
        """The connection an ``on_demand: false`` connector always keeps (its first)."""
        if self.on_demand:
            return False
        return next((s for s in self.slots if not s.retiring), None) is slot

    def _wanted(self, slot: Slot[C], since: float) -> bool:
        """Someone still wants this slot's connection: devices waiting on it, a device
        asking the pool since `since`, or it is the one the connector keeps."""
        return slot.waiting > 0 or self._asked_at >= since or self._keeps(slot)

    def _leave(self, slot: Slot[C], detail: str) -> None:
        """The slot's loop ends; a new device gets a new slot."""
        if slot in self.slots:
            self.slots.remove(slot)
        self._set_state(slot, SlotState.CLOSED, detail)

    async def _watch_idle(self, slot: Slot[C], generation: int) -> None:
        """Close the connection once it has had no device for ``idle_close`` seconds."""
        if not self.idle_close > 0 or math.isinf(self.idle_close):
            return
        while slot.generation == generation and slot.state == SlotState.UP and not slot.retiring:
            changed = slot.changed
            if slot.load() or self._keeps(slot):
                await changed.wait()
                continue
            with trio.move_on_after(self.idle_close):
                await changed.wait()  # a device came (or the connection went): look again
                continue
            slot.retiring = True  # not leased again; leaves the pool when it ends
            log.info("connector %s: closing connection %d, no device for %gs", self.name,
                     slot.id, self.idle_close)  # fmt: skip
            if self._close_conn is not None and slot.conn is not None:
                self._close_conn(slot.conn)
            elif slot.scope is not None:
                slot.scope.cancel()
            return

    async def _slot_loop(self, slot: Slot[C]) -> None:
        backoff = Backoff(self.backoff_initial, self.backoff_max, rng=self._rng)
        first = True
        while not self._closed:
            if not first:
                self._observer.on_reconnect(self.name)
            first = False
            self._set_state(slot, SlotState.CONNECTING)
            up_since: float | None = None
            scope = trio.CancelScope(deadline=trio.current_time() + self.connect_timeout)
            slot.scope = scope

            def on_up(conn: Any, scope: trio.CancelScope = scope) -> None:
                nonlocal up_since
                scope.deadline = math.inf
                up_since = trio.current_time()
                slot.conn = conn
                slot.generation += 1
                slot.last_error = ""
                self._set_state(slot, SlotState.UP)
                log.info("connector %s: connection %d up", self.name, slot.id)
                if self._nursery is not None:
                    self._nursery.start_soon(self._watch_idle, slot, slot.generation)

            error = "connection closed"
            try:
                with scope:
                    await self._connect(slot.id, on_up)
                if scope.cancelled_caught and up_since is None:
                    error = "connect timeout"
                    # Stalled past the dial's own timeouts (in SASL or open, say): count
                    # it by the same metric as the dial's, so a silent hub shows up.
                    report_connect_failure(self.name, "timeout")
            except Exception as exc:  # one upstream failure never takes the pool down
                error = _describe(exc)
            slot.scope = None
            was_up = up_since is not None
            slot.conn = None
            slot.last_error = error
            lost = self._drop_leases(slot)
            if self._closed:
                log.info("connector %s: connection %d closed", self.name, slot.id)
                break
            if slot.retiring and was_up:
                self._leave(slot, "retired")
                return
            if was_up:
                log.warning("connector %s: connection %d lost: %s", self.name, slot.id, error)
                if not lost and not slot.waiting and not self._keeps(slot):
                    self._leave(slot, f"{error}; no device on it")
                    return
                if trio.current_time() - up_since >= self.stable_after:  # type: ignore[operator]
                    backoff.reset()
            else:
                log.warning("connector %s: connect failed: %s", self.name, error)
            delay = backoff.next_delay()
            backoff_at = trio.current_time()
            slot.retry_at = backoff_at + delay
            self._set_state(slot, SlotState.BACKOFF, error)
            with trio.move_on_after(delay):
                await self._closing.wait()
            if not self._closed and not self._wanted(slot, backoff_at):
                # Its devices (if any) did not come back for it: no retry until one asks.
                log.info("connector %s: connection %d not retried: no device asked for it",
                         self.name, slot.id)  # fmt: skip
                self._leave(slot, f"{error}; not retried, no device waiting")
                return


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if str(exc) else text
