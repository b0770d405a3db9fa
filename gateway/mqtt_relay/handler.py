"""What a listener runs for each accepted device connection.

The daemon builds one `connection_handler` per `protocol: mqtt` listener and
hands it to the listener (`gateway.net.listeners.serve_listener`), together
with what the relay does not do itself: opening upstream connections
(`OpenUpstream`) and the connectors' `ack_batching` policy.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from .credentials import MqttCredentials
from .in_flight import AckBatchingFactory
from .local_session import StoreForward
from .observer import NullObserver, PacketTracer, RelayObserver
from .renewal import RenewalMode
from .session import Session
from .upstream import HandshakeBudget, OpenUpstream

if TYPE_CHECKING:
    from gateway.auth.credentials import CredentialStore

__all__ = ["ConnectionHandler", "connection_handler", "relay_mqtt_connection"]

ConnectionHandler = Callable[[trio.abc.Stream, tuple[str, int]], Awaitable[None]]


async def relay_mqtt_connection(
    device_stream: trio.abc.Stream,
    peer: tuple[str, int],
    listener_cfg: Any,
    config: Any,
    observer: RelayObserver | None = None,
    *,
    open_upstream: OpenUpstream,
    ack_batching: AckBatchingFactory | None = None,
    tracer: PacketTracer | None = None,
    credentials: MqttCredentials | None = None,
    renewal_mode: RenewalMode = RenewalMode.AUTO,
    handshake: HandshakeBudget | None = None,
    store_forward: StoreForward | None = None,
) -> str:
    """Relay one device connection until either side ends it; returns the CloseReason.

    Closes both streams before returning. `open_upstream(connector, profile)`
    opens the connection to the hub. `ack_batching(wait)` builds the policy for
    a connector with `ack_batching` (None: the hub's answers are relayed at
    once). `tracer` logs every relayed packet on the device connection's id
    ("<-" from the device, "->" to it) when its `mqtt_enabled` is set.
    `credentials`: the listener's `MqttCredentials` (None: devices bring their
    own credentials); `renewal_mode` how a token renewal replaces the upstream
    connection (see `gateway.mqtt_relay.renewal`). `handshake`: the daemon's
    budget for bytes held before authentication (None: each CONNECT is still
    bounded, their sum is not). `store_forward`: the message store and local
    sessions when store-and-forward is configured (see
    `gateway.mqtt_relay.local_session`).
    """
    session = Session(
        device_stream,
        peer,
        listener_cfg,
        config,
        observer or NullObserver(),
        open_upstream,
        tracer,
        credentials,
        renewal_mode,
        ack_batching,
        handshake,
        store_forward,
    )
    return await session.run()


def connection_handler(
    listener_cfg: Any,
    config: Any,
    *,
    open_upstream: OpenUpstream,
    ack_batching: AckBatchingFactory | None = None,
    observer: RelayObserver | None = None,
    tracer: PacketTracer | None = None,
    credentials: CredentialStore | None = None,
    clock: Callable[[], float] = time.time,
    renewal_mode: RenewalMode = RenewalMode.AUTO,
    handshake: HandshakeBudget | None = None,
    store_forward: StoreForward | None = None,
) -> ConnectionHandler:
    """The handler for one `protocol: mqtt` listener's connections.

    `config` is read for every new connection (the daemon passes its live
    configuration, so a reload changes the routes). `credentials`: the store
    built from the config's `credentials:` section; None or an empty store:
    devices bring their own credentials. `clock`: wall-clock Unix seconds for
    SAS token expiries. The rest as for `relay_mqtt_connection`.
    """
    held = MqttCredentials(credentials, clock=clock) if credentials else None

    async def handle(stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        await relay_mqtt_connection(
            stream,
            peer,
            listener_cfg,
            config,
            observer,
            open_upstream=open_upstream,
            ack_batching=ack_batching,
            tracer=tracer,
            credentials=held,
            renewal_mode=renewal_mode,
            handshake=handshake,
            store_forward=store_forward,
        )

    return handle
