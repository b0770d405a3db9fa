"""AMQP device listeners: accept device connections and hand them to the router.

Binding, `allowed_networks`, `max_connections` and device-side TLS come from
`gateway.net.listeners`. Per connection: the AMQP header, SASL (if any) and
open must complete within the listener's ``handshake_timeout``; after that
the engine's idle timeouts apply both ways. Until the device's open has
arrived its bytes are read in small pieces held in the daemon's handshake
budget (`gateway.net.handshake`), and the engine reads SASL frames of at most
`SASL_FRAME_LIMIT` and frames of at most `PRE_OPEN_FRAME_LIMIT` bytes (its
open included), refusing larger ones from their header. After the open,
frames are bounded by the listener's `max_frame_size`; a device's attaches
before it has put a token over CBS are such frames, one at a time.

The router is handed in by the daemon (`AmqpDeviceRouter`, which
`gateway.router.core.Router` implements): this module imports no relay. Per
connection the router makes a `DeviceSide` (its engine and event handler);
this loop owns the socket and feeds the engine's events to it.

When the router holds device credentials, a device's SASL PLAIN login may be
a local password that must be checked with scrypt. That is too slow for the
event loop, and the engine judges the sasl-init synchronously, so
`SaslPlainGate` holds the sasl-init back until the router's check has run in
a worker thread; the engine then finds the answer ready. A provisioning login
(`{idScope}/registrations/{regId}`) is held back the same way while the router
relays it to the service over a connection of the device's own
(`gateway.router.dps`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from gateway.amqp import AMQPError, Connection, SaslServer
from gateway.amqp.events import Event
from gateway.amqp.framing import SASL_FRAME_LIMIT, SASL_HEADER, FrameReader
from gateway.amqp.performatives import SaslInit
from gateway.logsafe import source

from .amqp_connector import EngineDriver, EventHandler
from .handshake import HandshakeBudget, HandshakeStream
from .listeners import ListenerSettings, serve_listener

log = logging.getLogger("gateway.net.amqp")

# A sasl-init larger than this is passed on unchecked (the engine refuses it).
MAX_SASL_INIT = SASL_FRAME_LIMIT

# check(username, password, the sasl-init frame as received)
PlainCheck = Callable[[str, str, bytes], Awaitable[None]]


class DeviceSide(Protocol):
    """The router's side of one device connection (`gateway.router.device.DeviceConn`)."""

    driver: Any  # set to the connection's EngineDriver

    @property
    def id(self) -> str: ...
    @property
    def listener(self) -> str: ...
    @property
    def engine(self) -> Connection: ...
    @property
    def opened(self) -> trio.Event: ...  # set when the device's open arrived
    def handle(self, events: list[Event]) -> None: ...
    def shutdown(self, description: str) -> None: ...
    def lost(self, reason: str) -> None: ...


class AmqpDeviceRouter(Protocol):
    """What the AMQP listener needs of the router (`gateway.router.core.Router`)."""

    @property
    def stopping(self) -> bool: ...
    @property
    def tracer(self) -> Any: ...  # frame tracer (gateway.ops.trace.FrameTracer), or None
    def new_device(self, listener: Any, peer: tuple[str, int]) -> DeviceSide: ...
    def sasl_precheck(self, device: Any) -> PlainCheck | None: ...
    def device_handler(self, device: Any) -> EventHandler:
        """The handler the device's engine events go to (the relay latency timed)."""


class SaslPlainGate(trio.abc.Stream):
    """A device stream that holds the device's sasl-init back until
    ``check(username, password, frame)`` has run for a PLAIN login.

    The bytes pass on unchanged: the protocol header at once (the engine must
    offer its mechanisms before the device sends its sasl-init), then the
    sasl-init frame once complete and checked, then everything as it comes.
    """

    def __init__(self, stream: trio.abc.Stream, check: PlainCheck) -> None:
        self._stream = stream
        self._check = check
        # Writes pass straight through, the non-blocking one too (see EngineDriver).
        send_nowait = getattr(stream, "send_nowait", None)
        if send_nowait is not None:
            self.send_nowait = send_nowait
        self._held = bytearray()
        self._header_seen = False
        self._done = False

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def passing(self) -> bool:
        """Everything from now on passes straight through (the sasl-init went)."""
        return self._done and not self._held

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            out = await self._release()
            if out:
                return out
            if self._done:
                return await self._stream.receive_some(max_bytes)
            data = await self._stream.receive_some(max_bytes)
            if not data:
                self._done = True
                out = bytes(self._held)
                self._held.clear()
                return out
            self._held += data

    def _pass_all(self) -> bytes:
        self._done = True
        out = bytes(self._held)
        self._held.clear()
        return out

    async def _release(self) -> bytes:
        """Bytes the engine may have now (b"" while waiting for more)."""
        held = self._held
        if self._done:
            return self._pass_all()
        if not held:
            return b""
        if not self._header_seen:
            if held[:8] != SASL_HEADER[: len(held[:8])]:
                return self._pass_all()  # no SASL layer (or not AMQP: the engine says so)
            if len(held) < 8:
                return b""
            self._header_seen = True
            out = bytes(held[:8])
            del held[:8]
            return out
        if len(held) < 8:
            return b""
        size = int.from_bytes(held[:4], "big")
        if size < 8 or size > MAX_SASL_INIT:
            return self._pass_all()
        if len(held) < size:
            return b""
        reader = FrameReader(MAX_SASL_INIT)
        reader.feed(bytes(held[:size]))
        try:
            frame = reader.next_frame()
        except AMQPError:
            return self._pass_all()
        perf = frame.performative if frame is not None else None
        if type(perf) is SaslInit and str(perf.mechanism) == "PLAIN":
            login = _plain_login(perf.initial_response)
            if login is not None:
                await self._check(*login, bytes(held[:size]))
        return self._pass_all()


def _plain_login(response: bytes | None) -> tuple[str, str] | None:
    """(authcid, password) of a PLAIN initial response (RFC 4616), None if malformed."""
    if response is None:
        return None
    parts = bytes(response).split(b"\x00")
    if len(parts) != 3 or not parts[1]:
        return None
    try:
        return parts[1].decode("utf-8"), parts[2].decode("utf-8")
    except UnicodeDecodeError:
        return None


async def handle_device(stream: trio.abc.Stream, peer: tuple[str, int], listener: Any,
                        router: AmqpDeviceRouter, observer: Any = None,
                        handshake: HandshakeBudget | None = None) -> None:  # fmt: skip
    """Run one device connection until it ends; `observer` (the listener's, optional)
    counts a failed SASL negotiation as a refusal with reason ``sasl``. `handshake`:
    the budget of bytes held before the device's open (None: a budget of its own)."""
    device = router.new_device(listener, peer)
    engine = device.engine
    gate: SaslPlainGate | None = None
    budget = handshake if handshake is not None else HandshakeBudget()
    raw = stream
    guarded = HandshakeStream(
        stream, budget.hold(), lambda: engine.buffered + (gate.held if gate is not None else 0)
    )
    stream = guarded
    check = router.sasl_precheck(device)
    if check is not None and device.engine.sasl is not None:
        stream = gate = SaslPlainGate(stream, check)
    handler = router.device_handler(device)
    driver = EngineDriver(stream, device.engine, handler, name=device.id,
                          tracer=router.tracer)  # fmt: skip
    device.driver = driver
    if router.stopping:
        device.shutdown("the gateway is shutting down")
    timeout = float(getattr(listener, "handshake_timeout", 10.0))
    try:
        async with trio.open_nursery() as nursery:

            async def handshake_deadline() -> None:
                with trio.move_on_after(timeout):
                    await device.opened.wait()
                    guarded.done()
                    if gate is None or gate.passing:
                        # Both wrappers only pass bytes through now: the reads go to
                        # the socket's stream directly (one coroutine less per read).
                        driver.stream = raw
                    return
                log.warning("listener %s: %s:%d did not complete the AMQP handshake in %.0fs",
                            device.listener, peer[0], peer[1], timeout,
                            extra=source(peer[0]))  # fmt: skip
                driver.abort()

            nursery.start_soon(handshake_deadline)
            await driver.run()
            nursery.cancel_scope.cancel()
    finally:
        guarded.done()
        device.lost(driver.transport_error or "connection ended")
        _report_sasl_failure(device.engine.sasl, device.listener, peer, observer)


def _report_sasl_failure(sasl: Any, listener: str, peer: tuple[str, int], observer: Any) -> None:
    """One line (and one count) for a device whose SASL negotiation failed, naming
    the mechanisms on both sides: the usual cause is a client that wants one we do
    not offer, and without this line the gateway would show nothing at all."""
    summary = sasl.failure_summary() if isinstance(sasl, SaslServer) else None
    if summary is None:
        return
    log.warning("listener %s: %s:%d SASL negotiation failed: %s", listener, peer[0], peer[1],
                summary, extra=source(peer[0]))  # fmt: skip
    refused = getattr(observer, "on_device_refused", None)
    if refused is not None:
        refused(listener, "sasl")


async def serve_amqp_listener(
    listener: Any,
    config: Any,
    router: AmqpDeviceRouter,
    *,
    observer: Any = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    settings: ListenerSettings | None = None,
    handshake: HandshakeBudget | None = None,
) -> None:
    """Serve one `protocol: amqp` listener until cancelled; started() gets the bound addresses.

    `observer` gets the admissions (`gateway.ops.metrics.Metrics` fits).
    `settings`: the daemon passes its own live settings so a reload can change
    the limits and a drain can stop admissions; by default they are built from
    `listener`. `handshake`: the budget of bytes held before authentication,
    shared by the daemon's listeners (by default this listener's own).
    """
    settings = settings or ListenerSettings.from_config(listener, config)
    budget = handshake if handshake is not None else HandshakeBudget()

    async def handler(stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        await handle_device(stream, peer, listener, router, observer, budget)

    await serve_listener(settings, handler, observer=observer, task_status=task_status)
