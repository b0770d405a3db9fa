"""The MQTT relay: each device connection relayed over its own upstream connection.

The peer of `gateway.router` (the AMQP link router). `session` runs one device
connection; `credentials` and `renewal` hold the rules for credentials the
gateway keeps for its devices.
"""

from __future__ import annotations

from .session import (
    CloseReason,
    PacketTracer,
    RelayObserver,
    hub_host_from_username,
    relay_mqtt_connection,
    select_mqtt_route,
    select_route,
    serve_mqtt_listener,
)

__all__ = [
    "CloseReason",
    "PacketTracer",
    "RelayObserver",
    "hub_host_from_username",
    "relay_mqtt_connection",
    "select_mqtt_route",
    "select_route",
    "serve_mqtt_listener",
]
