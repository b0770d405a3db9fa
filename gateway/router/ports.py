"""The I/O the router is handed: connections to its connectors, and their pools.

Direction: imports nothing of the router but the observer interface. The
router does no I/O of its own: the daemon hands `core.Router` a `ConnectorIO`
(`gateway.net.upstream_io.AmqpConnectorIO` in the daemon, in-memory hubs in
tests). Like a hypercorn protocol object, the router only sees events and a
way to send: for each upstream connection the I/O side opens the stream,
builds the client engine, asks the router for an `UpstreamEnd` (the event
handler and callbacks of that connection) and runs the engine's driver until
the connection ends. The router's connect function, which the pool calls for
each of its slots, is built by the router and runs that.

A provisioning device's connection (`dps.py`) is opened by the I/O side too:
it relays the device's SASL login there (`relay_login`), and later runs the
router's end of it on that same connection (`connect_relayed`). The router
holds the connection as an opaque value in between.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import trio

from gateway.amqp import Connection
from gateway.amqp.events import Event
from gateway.amqp.sasl import SaslRelayClient

from .observe import RouterObserver

C = TypeVar("C")

EventHandler = Callable[[list[Event]], None]
# connect(slot, on_up): runs one upstream connection of a pool for its whole
# life, calling on_up(conn) once it is usable.
ConnectFn = Callable[[int, Callable[[Any], None]], Awaitable[None]]


class Unavailable(Protocol):
    """Why a pool could not lease a connection: the AMQP error condition to refuse
    the device's attach with and a readable description."""

    condition: str
    description: str


class Lease(Protocol[C]):
    """A device connection's place on one upstream connection of a pool."""

    @property
    def conn(self) -> C: ...
    @property
    def lost(self) -> trio.Event: ...  # set when the connection is gone
    def release(self) -> None: ...
    def retire(self) -> None:
        """Release, and take the connection out of the pool (the owner closes it)."""


class Pool(Protocol[C]):
    """A connector's pool of upstream connections (`gateway.net.pool.ConnectorPool`)."""

    @property
    def max_devices_per_connection(self) -> int: ...
    @property
    def usable(self) -> bool:
        """A connection is up and may be leased (it may be full)."""
    @property
    def backing_off(self) -> bool:
        """No usable connection and the last attempt failed (the hub is unreachable)."""
    async def run(self, *, task_status: Any = ...) -> None: ...
    def close(self) -> None: ...
    async def acquire(self, owner: Any = None) -> Lease[C]:
        """A lease on a usable connection; raises the I/O's ``unavailable``."""


@dataclass(slots=True)
class UpstreamEnd:
    """The router's end of one upstream connection, handed to the I/O side."""

    name: str  # for logs and traces
    handle: EventHandler  # the engine's events, one call per received chunk
    opened: Callable[[Any], None]  # the hub's open arrived (gets the driver)
    bind_driver: Callable[[Any], None]  # the driver, before the engine opens


class ConnectorIO(Protocol):
    """Connections to connectors and their pools, handed to the router."""

    # The exception a pool's acquire raises when no connection can take a device,
    # and the I/O raises when a connection cannot be had: an `Unavailable`, made
    # as ``unavailable(description[, condition])``.
    unavailable: type[Exception]

    def open_budget(self, connector: Any) -> float:
        """How long opening a connection to `connector` may take, in seconds."""

    def pool(self, connector: Any, connect: ConnectFn, *, rng: Callable[[], float],
             observer: RouterObserver, close: Callable[[Any], None]) -> Pool[Any]:  # fmt: skip
        """The pool of `connector` (config entry: its limits, timeouts and backoff),
        running ``connect`` for each of its connections; ``close(conn)`` closes one
        that had no device for the connector's ``idle_close``."""

    async def connect(self, connector: Any, profile: Any, container_id: str,
                      start: Callable[[Connection, str], UpstreamEnd], *,
                      tracer: Any = None) -> None:  # fmt: skip
        """Open the stream to `connector` (config entry; `profile`: its TLS profile
        or None), build the client engine, get the router's end of it from
        ``start(engine, remote)`` (remote: the endpoint reached, for logs and the
        registry) and run it until the connection ends. Raises if it could not be
        opened or ended before the hub's open."""

    async def relay_login(self, connector: Any, profile: Any, relay: SaslRelayClient) -> Any:
        """Open a connection of its own to `connector` and run `relay` (a device's
        sasl-init, its outcome in ``relay.outcome`` after) on it; the connection,
        for `connect_relayed` or `close`. Raises ``unavailable`` if unreachable."""

    async def connect_relayed(self, connector: Any, profile: Any, container_id: str,
                              connection: Any, start: Callable[[Connection, str], UpstreamEnd],
                              *, tracer: Any = None) -> None:  # fmt: skip
        """As `connect`, on a connection `relay_login` opened (its SASL done).
        Raises ``unavailable`` if it ended before the peer's open."""

    async def close(self, connection: Any) -> None:
        """Close a connection `relay_login` opened (bounded, shielded)."""


__all__ = ["ConnectFn", "ConnectorIO", "EventHandler", "Lease", "Pool", "Unavailable",
           "UpstreamEnd"]  # fmt: skip
