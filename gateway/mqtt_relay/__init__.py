"""The MQTT relay: each device connection relayed over its own upstream connection.

The peer of `gateway.router` (the AMQP link router). The daemon hands it what
it does not do itself (listening, opening upstream connections, the
connectors' `ack_batching` policy) and gets back a handler per listener.

- `handler`: the entry points (`connection_handler`, `relay_mqtt_connection`);
- `session`: one device connection: CONNECT, route, upstream connection(s),
  keep-alive, close;
- `routes`: which route a CONNECT takes (pure);
- `pump`: the byte pump, one direction of a session;
- `in_flight`: the relay's side of `ack_batching`;
- `local_session`, `forwarder`: store-and-forward: the session the gateway
  answers while the hub is unreachable, and replaying what it stored;
- `credentials`, `renewal`: credentials the gateway holds for its devices,
  and renewing their tokens under a live session;
- `upstream`: an upstream connection and how one is opened;
- `observer`: what the relay reports to metrics and the packet trace;
- `closing`: why a session ends.
"""

from __future__ import annotations

from .closing import CloseReason
from .forwarder import MqttForwarder
from .handler import ConnectionHandler, connection_handler, relay_mqtt_connection
from .in_flight import AckPolicy
from .local_session import LocalSessions, StoreForward
from .observer import PacketTracer, RelayObserver
from .renewal import RenewalMode
from .routes import hub_host_from_username, select_mqtt_route, select_route
from .upstream import Opened, OpenUpstream, UpstreamUnavailable

__all__ = [
    "AckPolicy",
    "CloseReason",
    "ConnectionHandler",
    "LocalSessions",
    "MqttForwarder",
    "OpenUpstream",
    "Opened",
    "PacketTracer",
    "RelayObserver",
    "RenewalMode",
    "StoreForward",
    "UpstreamUnavailable",
    "connection_handler",
    "hub_host_from_username",
    "relay_mqtt_connection",
    "select_mqtt_route",
    "select_route",
]
