"""The AMQP router's connector I/O: pooled connections to the hub.

`AmqpConnectorIO` is what the daemon hands `gateway.router.core.Router`
(it implements the router's `ConnectorIO` interface, `gateway/router/ports.py`,
without importing the router): a `ConnectorPool` per connector, and for each
upstream connection the stream (`open_connector_stream`: the connector's
endpoints in order, TLS), the client engine (`client_engine_for`) and its
driver (`run_upstream`). The router gets the engine's events through the
handler it returns for the connection. For a provisioning device, a
connection of its own with its SASL login relayed (`relay_login`, then
`connect_relayed`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

import trio

from gateway.amqp import AMQPError, Connection
from gateway.amqp.events import Event
from gateway.amqp.sasl import SaslRelayClient

from .amqp_connector import (
    UpstreamOpenError,
    client_engine_for,
    open_connector_stream,
    relay_engine_for,
    run_upstream,
)
from .dial import DialReport, dial_budget
from .pool import ConnectFn, ConnectorPool, PoolObserver, PoolUnavailable
from .sasl_relay import relay_sasl_login
from .tls import TLSConnectError


class UpstreamEnd(Protocol):
    """The router's end of one upstream connection."""

    @property
    def name(self) -> str: ...
    def handle(self, events: list[Event]) -> None: ...
    def opened(self, driver: Any) -> None: ...
    def bind_driver(self, driver: Any) -> None: ...


class AmqpConnectorIO:
    """Connections to AMQP connectors and their pools."""

    unavailable = PoolUnavailable

    def pool(self, connector: Any, connect: ConnectFn, *,
             rng: Callable[[], float] = random.random,
             observer: PoolObserver | None = None,
             close: Callable[[Any], None] | None = None) -> ConnectorPool[Any]:  # fmt: skip
        """The `ConnectorPool` of `connector` (config entry); ``close(conn)`` closes
        a connection idle for the connector's ``idle_close``."""
        return ConnectorPool(
            connector.name,
            connect,
            max_connections=connector.pool.max_connections,
            max_devices_per_connection=connector.pool.max_devices_per_connection,
            connect_timeout=dial_budget(connector),  # connect_timeout per endpoint
            backoff_initial=float(connector.reconnect.initial),
            backoff_max=float(connector.reconnect.max),
            on_demand=bool(connector.on_demand),
            rng=rng,
            observer=observer,
            idle_close=float(getattr(connector, "idle_close", 60.0)),
            close=close,
        )

    async def open_stream(self, connector: Any,
                          profile: Any) -> tuple[trio.abc.Stream, DialReport]:  # fmt: skip
        return await open_connector_stream(connector, profile)

    async def connect(self, connector: Any, profile: Any, container_id: str,
                      start: Callable[[Connection, str], UpstreamEnd], *,
                      tracer: Any = None) -> None:  # fmt: skip
        """Run one upstream connection to `connector` until it ends."""
        stream, dialled = await self.open_stream(connector, profile)
        engine = client_engine_for(connector, profile, container_id)
        end = start(engine, str(dialled.endpoint))
        await run_upstream(stream, engine, end.handle, end.opened, name=end.name,
                           bind_driver=end.bind_driver, tracer=tracer,
                           ack_batching=float(connector.ack_batching))  # fmt: skip

    def open_budget(self, connector: Any) -> float:
        return dial_budget(connector)

    async def relay_login(self, connector: Any, profile: Any,
                          relay: SaslRelayClient) -> trio.abc.Stream:  # fmt: skip
        """A device's SASL login relayed over a connection of its own (see
        `gateway.net.sasl_relay`); raises `PoolUnavailable` if unreachable."""
        stream: trio.abc.Stream | None = None
        done = False
        try:
            with trio.fail_after(dial_budget(connector) + float(connector.connect_timeout)):
                stream, _dialled = await open_connector_stream(connector, profile)
                stream = await relay_sasl_login(stream, relay)
            done = True
            return stream
        except (TLSConnectError, OSError, trio.TooSlowError, trio.BrokenResourceError,
                AMQPError) as exc:  # fmt: skip
            raise PoolUnavailable(str(exc)) from exc
        finally:
            # Failed or cancelled (the device's handshake time ran out): not kept.
            if stream is not None and not done:
                await self.close(stream)

    async def connect_relayed(self, connector: Any, profile: Any, container_id: str,
                              connection: trio.abc.Stream,
                              start: Callable[[Connection, str], UpstreamEnd], *,
                              tracer: Any = None) -> None:  # fmt: skip
        """Run the upstream connection whose SASL login was relayed."""
        engine = relay_engine_for(connector, profile, container_id)
        end = start(engine, str(connector.target))
        try:
            await run_upstream(connection, engine, end.handle, end.opened, name=end.name,
                               bind_driver=end.bind_driver, tracer=tracer)  # fmt: skip
        except UpstreamOpenError as exc:
            raise PoolUnavailable(str(exc)) from exc

    async def close(self, connection: trio.abc.Stream) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await connection.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
