"""AMQP connections on trio streams: the engine pump, and connecting to a hub.

`EngineDriver` runs one sans-I/O `gateway.amqp.Connection` over one trio
stream: it feeds received bytes to the engine, hands the events to a handler,
writes whatever the engine (or anyone acting on it) queued, and keeps the
idle-timeout clock. It is the same on both sides of the gateway.

`connect_upstream` opens one connection to a connector's hub: TCP, TLS
(`gateway.net.tls`), SASL ANONYMOUS/EXTERNAL/PLAIN and open with
``hostname`` = the connector's hostname (default: the TLS server name, else
the host). It is what a `ConnectorPool` calls for each of its connections.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from gateway.amqp import Connection, ConnectionError, RemoteClose, RemoteOpen, SaslClient
from gateway.amqp.events import Event

from . import dial
from .ack_batching import AckBatching
from .hooks import report_connect_failure
from .tls import ClientContextCache, TLSConnectError, server_name_for

log = logging.getLogger("gateway.net.amqp")

EventHandler = Callable[[list[Event]], None]

# TLS streams (gateway.net.tls_stream) return every record already received up
# to this many bytes, so one read hands the engine a hub's whole batch of
# dispositions and flows.
_READ_SIZE = 65536

_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _WakeBatch:
    """Wakes asked for while an event handler runs are checked once it returns.

    Handlers call ``wake()`` liberally (after every relayed frame, on both
    connections of a link pair); waking a writer that finds nothing to send
    costs a task switch. So inside a dispatch the drivers are only noted, and
    when the outermost dispatch returns (every frame the handler queued is in
    place) the writers with something to write, or a connection to finish, are
    rescheduled. A wake from anywhere else takes effect at once.
    """

    __slots__ = ("depth", "woken")

    def __init__(self) -> None:
        self.depth = 0
        self.woken: list[EngineDriver] = []

    def flush(self) -> None:
        woken = self.woken
        self.woken = []
        for driver in woken:
            driver._wake_noted = False
            engine = driver.engine
            if driver._done or engine.closed:
                driver._wake_writer()
            elif engine.wants_write:
                driver._want_write()


_batch = _WakeBatch()


class _TurnFlush(trio.abc.Instrument):
    """Writes what the engines queued during an event-loop turn, once per turn.

    A connection whose writer task is idle does not get the task woken for
    each relayed frame: it is noted here, and just before trio waits for I/O
    again (every task woken by the last wait has run: all the ready
    connections were read) each noted connection's bytes go to its socket in
    one non-blocking write (`send_nowait`), one TLS record per connection per
    turn, with no task switch. What the kernel does not take at once is left
    to the connection's writer task, woken for it.
    """

    def __init__(self) -> None:
        self.noted: list[EngineDriver] = []
        self._token = trio.lowlevel.current_trio_token()

    def note(self, driver: EngineDriver) -> None:
        driver._flush_noted = True
        self.noted.append(driver)

    def before_io_wait(self, timeout: float) -> None:
        noted = self.noted
        if not noted:
            return
        self.noted = []
        for driver in noted:
            driver._flush_noted = False
            try:
                if driver._flush_now():
                    continue
            except Exception:  # never lose the instrument: the writer task reports it
                log.debug("flush of %s failed", driver.name, exc_info=True)
            driver._flush_backlog = True
            # Not reschedule(): the timeout of the wait about to start is computed
            # already; this wakes the loop at once.
            self._token.run_sync_soon(driver._wake_writer)


_FLUSH: trio.lowlevel.RunVar[_TurnFlush] = trio.lowlevel.RunVar("gateway_amqp_turn_flush")


def _turn_flush() -> _TurnFlush:
    try:
        return _FLUSH.get()
    except LookupError:
        flush = _TurnFlush()
        trio.lowlevel.add_instrument(flush)
        _FLUSH.set(flush)
        return flush


class _IdleTimers:
    """Idle-timeout and heartbeat deadlines of every engine, one task per trio run.

    A driver arms one entry at its engine's ``next_deadline``; traffic only
    moves a deadline later, so an entry firing early just ticks the engine
    (which does nothing yet) and is re-armed. An entry is ``[at, seq, driver]``;
    a finished driver clears its slot so the heap does not keep it alive.
    """

    def __init__(self) -> None:
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()
        self._sleeping_until = math.inf
        self._changed = trio.Event()

    def arm(self, driver: EngineDriver, at: float) -> list[Any]:
        entry = [at, next(self._seq), driver]
        heapq.heappush(self._heap, entry)
        if at < self._sleeping_until:
            self._changed.set()
        return entry

    async def run(self) -> None:
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                entry = heapq.heappop(heap)
                driver = entry[2]
                if driver is not None and driver._timer is entry:
                    driver._timer = None
                    driver._on_deadline(now)
            self._sleeping_until = heap[0][0] if heap else math.inf
            self._changed = trio.Event()
            with trio.move_on_at(self._sleeping_until):
                await self._changed.wait()


_TIMERS: trio.lowlevel.RunVar[_IdleTimers] = trio.lowlevel.RunVar("gateway_amqp_idle_timers")


def _idle_timers() -> _IdleTimers:
    try:
        return _TIMERS.get()
    except LookupError:
        timers = _IdleTimers()
        _TIMERS.set(timers)
        trio.lowlevel.spawn_system_task(timers.run, name="amqp idle timers")
        return timers


class EngineDriver:
    """Pumps bytes between a stream and an engine until the connection ends.

    ``handler(events)`` is called synchronously for each batch of events; it
    may act on this engine and others (then it calls their ``wake()``).
    ``run()`` returns once the engine is closed and its last bytes are written,
    or the stream failed; ``error`` then says why (an AMQP error, or a
    transport description).

    Two tasks per connection, started by ``run()``: the reader and a
    writer that sleeps until woken with something to write; one write carries
    everything queued by then. Idle timeouts and heartbeats are kept by one
    timer task for all connections (`_IdleTimers`).
    """

    __slots__ = (
        "stream", "engine", "handler", "name", "error", "transport_error", "_done",
        "_cancel", "_wanted", "_wake_noted", "_parked", "_timer", "_timer_final",
        "_failure", "ack_batching", "_flush", "_flush_noted", "_flush_backlog",
    )  # fmt: skip

    def __init__(self, stream: trio.abc.Stream, engine: Connection, handler: EventHandler, *,
                 name: str = "", tracer: Any = None) -> None:  # fmt: skip
        self.stream = stream
        self.engine = engine
        self.handler = handler
        self.name = name
        self.error: Any = None
        self.transport_error: str | None = None
        self._done = False
        self._cancel: trio.CancelScope | None = None
        self._wanted = True  # the writer looks at the engine before it first sleeps
        self._wake_noted = False
        self._parked: Any = None  # the writer task while it sleeps
        self._timer: list[Any] | None = None
        self._timer_final = False  # armed once both opens are exchanged
        self._failure: BaseException | None = None
        # Writes at the end of the event-loop turn (`_TurnFlush`), for streams that
        # can write without waiting; set when run() starts.
        self._flush: _TurnFlush | None = None
        self._flush_noted = False
        self._flush_backlog = False  # the stream kept bytes a turn's flush could not send
        # Hub connections: when to let the hub's dispositions gather before a read.
        self.ack_batching: AckBatching | None = None
        if tracer is not None and tracer.amqp_enabled:
            # The engine reports every frame it reads and writes; nothing is
            # decoded twice. Tracing switched on by a reload applies to new
            # connections.
            engine.trace = functools.partial(tracer.amqp, name)

    def wake(self) -> None:
        """Something was queued on the engine: write it soon."""
        if _batch.depth:
            if not self._wake_noted:
                self._wake_noted = True
                _batch.woken.append(self)
            return
        self._wake_writer()

    def _wake_writer(self) -> None:
        self._wanted = True
        task = self._parked
        if task is not None:
            self._parked = None
            trio.lowlevel.reschedule(task)

    def _want_write(self) -> None:
        """The engine has bytes to send: at the end of this turn if the writer is idle."""
        flush = self._flush
        if flush is None or self._parked is None:
            self._wake_writer()
        elif not self._flush_noted:
            flush.note(self)

    def _flush_now(self) -> bool:
        """At the end of a turn: send what the engine queued; False if the writer
        task must take over (bytes left, or the connection is ending)."""
        if self._parked is None:
            return True  # the writer is awake: it looks at the engine before it sleeps
        if self._done or self.engine.closed:
            return False
        data = self.engine.data_to_send()
        return not data or self.stream.send_nowait(data)  # type: ignore[attr-defined]

    def abort(self) -> None:
        """Stop now, without flushing (the stream is closed by the caller)."""
        if self._cancel is not None:
            self._cancel.cancel()

    async def run(self) -> None:
        if hasattr(self.stream, "send_nowait"):
            self._flush = _turn_flush()
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                nursery.start_soon(self._writer, nursery.cancel_scope)
                # The reader is a task of its own, not the caller's: resuming a task
                # resumes every coroutine frame it awaits through, and the caller's
                # (listener, pool, connect) would otherwise be re-entered on every read.
                nursery.start_soon(self._reader)
        finally:
            self._done = True
            if self._timer is not None:
                self._timer[2] = None
                self._timer = None
        if self._failure is not None:
            raise self._failure

    def _dispatch(self, events: list[Event]) -> None:
        for ev in events:
            t = type(ev)
            if t is ConnectionError:
                self.error = ev.error
            elif t is RemoteClose and ev.error is not None and self.error is None:
                self.error = ev.error
        batch = _batch
        batch.depth += 1
        try:
            self.handler(events)
        finally:
            # This engine is looked at with the others the handler woke (its
            # handler usually woke it already), not a second time here.
            if not self._wake_noted:
                self._wake_noted = True
                batch.woken.append(self)
            batch.depth -= 1
            if not batch.depth:
                batch.flush()

    async def _reader(self) -> None:
        engine = self.engine
        batching = self.ack_batching
        settled = 0
        # The clock itself, not trio.current_time(): three calls fewer per read.
        clock = trio.lowlevel.current_clock()
        now = clock.current_time()
        try:
            while not engine.closed:
                # `now` is when the last read was handled: nothing was awaited since.
                if batching is not None and batching.may_wait(now):
                    # Counting what is in flight walks the sessions: only under load.
                    wait = batching.wait_for(engine.outgoing_unsettled)
                    if wait:
                        await trio.sleep(wait)  # one wake-up for several dispositions
                try:
                    # self.stream, not a local: a device stream's handshake wrappers
                    # hand over the raw stream once they only pass bytes through.
                    data = await self.stream.receive_some(_READ_SIZE)
                except _TRANSPORT_ERRORS as exc:
                    self.transport_error = f"transport failed: {exc or type(exc).__name__}"
                    data = b""
                settled = engine.settled_by_peer
                events = engine.receive_data(data)
                now = clock.current_time()
                late = engine.tick(now)
                if late:
                    events = events + late
                if events:
                    self._dispatch(events)
                elif engine.wants_write:
                    self._want_write()  # e.g. our header and open answering the peer's
                if batching is not None:
                    batching.answered(now, engine.settled_by_peer - settled)
                if not self._timer_final:
                    self._arm_timer(now)
                if not data:
                    break
        finally:
            self._done = True
            self._wake_writer()

    async def _park(self) -> None:
        self._parked = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def _writer(self, scope: trio.CancelScope) -> None:
        engine = self.engine
        stream = self.stream
        try:
            while True:
                self._wanted = False
                data = engine.data_to_send()
                if data or self._flush_backlog:
                    self._flush_backlog = False
                    await stream.send_all(data)  # after what a turn's flush left
                    late = engine.tick(trio.current_time())
                    if late:
                        self._dispatch(late)
                    continue
                if self._done or engine.closed:
                    break
                if not self._wanted:
                    await self._park()
        except _TRANSPORT_ERRORS as exc:
            if self.transport_error is None:
                self.transport_error = f"transport failed: {exc or type(exc).__name__}"
            if not self._done:
                # Tell the engine (and through it the router) the peer is gone.
                self._dispatch(engine.receive_data(b""))
        scope.cancel()

    # ------------------------------------------------------------ idle timeouts

    def _arm_timer(self, now: float) -> None:
        """(Re)arm the idle timer at the engine's next deadline if that is sooner."""
        engine = self.engine
        if self._done or engine.closed:
            return
        deadline = engine.next_deadline(now)
        if engine.is_open:
            self._timer_final = True  # from now on deadlines only move later
        if deadline is None:
            return
        # Never at or before now: an engine that finds nothing due yet (float
        # rounding at the deadline) must not be fired again in the same pass.
        deadline = max(deadline, now + 0.001)
        current = self._timer
        if current is not None:
            if current[0] <= deadline:
                return
            current[2] = None
        self._timer = _idle_timers().arm(self, deadline)

    def _on_deadline(self, now: float) -> None:
        """Called by the timer task: heartbeat or idle-timeout due (perhaps)."""
        if self._done:
            return
        try:
            events = self.engine.tick(now)
            if events:
                self._dispatch(events)
            elif self.engine.wants_write:
                self._want_write()  # a heartbeat
            self._arm_timer(now)
        except Exception as exc:  # a handler bug ends this connection, not the timer task
            self._failure = exc
            self.abort()


def sasl_client_for(connector: Any) -> SaslClient:
    mech = str(getattr(connector, "sasl", "anonymous") or "anonymous").upper()
    if mech == "PLAIN":
        password = connector.sasl_password
        secret = password.get_secret_value() if hasattr(password, "get_secret_value") else password
        return SaslClient.plain(connector.sasl_username, secret)
    if mech == "EXTERNAL":
        return SaslClient.external()
    return SaslClient.anonymous()


def open_hostname_for(connector: Any, profile: Any) -> str:
    """AMQP open hostname: the connector's, else the TLS server name, else the host."""
    explicit = getattr(connector, "hostname", None)
    if explicit:
        return str(explicit)
    return server_name_for(connector, profile)


_contexts = ClientContextCache()


async def open_connector_stream(
    connector: Any, profile: Any
) -> tuple[trio.abc.Stream, dial.DialReport]:
    """TCP (+ TLS unless the connector is an allowed plaintext one) to the hub,
    over the connector's endpoints in order (`gateway.net.dial`); the stream and
    which endpoint it reached."""
    try:
        return await dial.dial_connector(connector, profile, contexts=_contexts)
    except TLSConnectError as exc:
        report_connect_failure(connector.name, exc.reason)  # ops: TLS failures by reason
        raise


def client_engine_for(connector: Any, profile: Any, container_id: str) -> Connection:
    idle = float(getattr(connector, "idle_timeout", 0) or 0)
    return Connection(
        "client",
        container_id,
        sasl=sasl_client_for(connector),
        hostname=open_hostname_for(connector, profile),
        max_frame_size=int(getattr(connector, "max_frame_size", 65536)),
        channel_max=65535,
        idle_timeout=idle or None,
    )


def relay_engine_for(connector: Any, profile: Any, container_id: str) -> Connection:
    """A client engine for a connection whose SASL exchange was already relayed (a
    device's own login, `gateway.net.sasl_relay`): it starts at the AMQP header."""
    idle = float(getattr(connector, "idle_timeout", 0) or 0)
    return Connection(
        "client",
        container_id,
        sasl=None,
        hostname=open_hostname_for(connector, profile),
        max_frame_size=int(getattr(connector, "max_frame_size", 65536)),
        channel_max=65535,
        idle_timeout=idle or None,
    )


async def run_upstream(
    stream: trio.abc.Stream,
    engine: Connection,
    handler: EventHandler,
    on_open: Callable[[EngineDriver], None],
    *,
    name: str,
    bind_driver: Callable[[EngineDriver], None] | None = None,
    tracer: Any = None,
    ack_batching: float = 0.0,
) -> EngineDriver:
    """Open `engine` (client) over `stream` and run it until it ends.

    ``on_open(driver)`` is called when the hub's open arrived (the connection
    is usable). Returns the driver, whose ``error`` says how it ended. Raises
    `UpstreamOpenError` when it ended before the open (SASL refused, closed...).
    """
    opened = False

    def handle(events: list[Event]) -> None:
        nonlocal opened
        for ev in events:
            if type(ev) is RemoteOpen and not opened:
                opened = True
                on_open(driver)
                # Once open, the driver calls the handler itself: no look at every
                # event for an open that cannot come again.
                driver.handler = handler
        handler(events)

    driver = EngineDriver(stream, engine, handle, name=name, tracer=tracer)
    if ack_batching > 0.0:
        driver.ack_batching = AckBatching(ack_batching)
    if bind_driver is not None:
        bind_driver(driver)
    engine.open()
    try:
        await driver.run()
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
    if not opened:
        raise UpstreamOpenError(describe_end(driver))
    return driver


class UpstreamOpenError(Exception):
    """The hub connection ended before its open arrived (SASL refused, closed...)."""


def describe_end(driver: EngineDriver) -> str:
    err = driver.error
    if err is not None:
        cond = getattr(err, "condition", None)
        desc = getattr(err, "description", None)
        return f"{cond}: {desc}" if desc else str(cond)
    return driver.transport_error or "connection closed"
