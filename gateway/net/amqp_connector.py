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
import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from gateway.amqp import Connection, ConnectionError, RemoteClose, RemoteOpen, SaslClient
from gateway.amqp.events import Event
from gateway.ops.hooks import report_connect_failure

from .tls import ClientContextCache, TLSConnectError, open_upstream_stream, server_name_for

log = logging.getLogger("gateway.net.amqp")

EventHandler = Callable[[list[Event]], None]

_READ_SIZE = 65536


class EngineDriver:
    """Pumps bytes between a stream and an engine until the connection ends.

    ``handler(events)`` is called synchronously for each batch of events; it
    may act on this engine and others (then it calls their ``wake()``).
    ``run()`` returns once the engine is closed and its last bytes are written,
    or the stream failed; ``error`` then says why (an AMQP error, or a
    transport description).
    """

    def __init__(self, stream: trio.abc.Stream, engine: Connection, handler: EventHandler, *,
                 name: str = "", tracer: Any = None) -> None:  # fmt: skip
        self.stream = stream
        self.engine = engine
        self.handler = handler
        self.name = name
        self.error: Any = None
        self.transport_error: str | None = None
        self._wake = trio.Event()
        self._activity = trio.Event()
        self._done = False
        self._cancel: trio.CancelScope | None = None
        if tracer is not None and tracer.amqp_enabled:
            # The engine reports every frame it reads and writes; nothing is
            # decoded twice. Tracing switched on by a reload applies to new
            # connections.
            engine.trace = functools.partial(tracer.amqp, name)

    def wake(self) -> None:
        """Something was queued on the engine: write it soon."""
        self._wake.set()

    def abort(self) -> None:
        """Stop now, without flushing (the stream is closed by the caller)."""
        if self._cancel is not None:
            self._cancel.cancel()

    async def run(self) -> None:
        with trio.CancelScope() as scope:
            self._cancel = scope
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, nursery.cancel_scope)
                nursery.start_soon(self._writer, nursery.cancel_scope)
                nursery.start_soon(self._ticker)
                self.wake()

    def _dispatch(self, events: list[Event]) -> None:
        for ev in events:
            if type(ev) is ConnectionError:
                self.error = ev.error
            elif type(ev) is RemoteClose and ev.error is not None and self.error is None:
                self.error = ev.error
        if events:
            self.handler(events)
        self.wake()

    async def _reader(self, scope: trio.CancelScope) -> None:
        engine = self.engine
        stream = self.stream
        try:
            while not engine.closed:
                try:
                    data = await stream.receive_some(_READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self.transport_error = f"transport failed: {exc or type(exc).__name__}"
                    data = b""
                events = engine.receive_data(data)
                engine.tick(trio.current_time())
                self._activity.set()
                self._dispatch(events)
                if not data:
                    break
        finally:
            self._done = True
            self.wake()

    async def _writer(self, scope: trio.CancelScope) -> None:
        engine = self.engine
        stream = self.stream
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                data = engine.data_to_send()
                if data:
                    await stream.send_all(data)
                    engine.tick(trio.current_time())
                    self._activity.set()
                    continue
                if self._done or engine.closed:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if self.transport_error is None:
                self.transport_error = f"transport failed: {exc or type(exc).__name__}"
            if not self._done:
                # Tell the engine (and through it the router) the peer is gone.
                self._dispatch(engine.receive_data(b""))
        scope.cancel()

    async def _ticker(self) -> None:
        engine = self.engine
        while True:
            now = trio.current_time()
            self._dispatch(engine.tick(now))  # may queue a heartbeat: always wake
            deadline = engine.next_deadline(now)
            self._activity = trio.Event()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._activity.wait()


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


async def open_connector_stream(connector: Any, profile: Any) -> trio.abc.Stream:
    """TCP (+ TLS unless the connector is an allowed plaintext one) to the hub."""
    ssl_context = None
    server_hostname = None
    if profile is not None:
        ssl_context = _contexts.get(profile)
        server_hostname = server_name_for(connector, profile)
    elif not getattr(connector, "allow_plaintext", False):
        raise TLSConnectError("error", f"connector {connector.name!r} has no tls_profile")
    try:
        return await open_upstream_stream(
            connector.host,
            int(connector.port),
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            timeout=float(connector.connect_timeout),
        )
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


async def run_upstream(
    stream: trio.abc.Stream,
    engine: Connection,
    handler: EventHandler,
    on_open: Callable[[EngineDriver], None],
    *,
    name: str,
    bind_driver: Callable[[EngineDriver], None] | None = None,
    tracer: Any = None,
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
        handler(events)

    driver = EngineDriver(stream, engine, handle, name=name, tracer=tracer)
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

