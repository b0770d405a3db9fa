"""The listeners' observer in the daemon: metrics for every admission, and a
registry record for every device connection the router does not record itself.

`gateway.net.listeners.serve_listener` calls ``on_device_connect``,
``on_device_disconnect`` and ``on_device_refused`` (the metrics), and
``on_connection_open(listener, protocol, peer)`` / ``on_connection_close(key)``
around each accepted connection's handler. AMQP device connections are
recorded by the router (`gateway.ops.router_observer.OpsObserver.on_device_open`,
with their links and message counts); MQTT sessions only exist at the
listener, so they are recorded here, under `gateway.ops.registry.connection_id`
(``{listener}/{host}:{port}``), which is also the key the MQTT relay's
``on_device_identified(peer, device_id)`` hook finds them by.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.ops.registry import ConnectionInfo, Registry, connection_id

__all__ = ["ListenerConnections"]


class ListenerConnections:
    """Listener hooks: `metrics` (a `Metrics`, or None) and `registry` records for
    connections of the protocols in `record` (default: MQTT)."""

    def __init__(self, metrics: Any, registry: Registry | None, *,
                 record: Iterable[str] = ("mqtt",)) -> None:  # fmt: skip
        self.metrics = metrics
        self.registry = registry
        self.record = frozenset(record)

    def on_device_connect(self, listener: str, protocol: str) -> None:
        if self.metrics is not None:
            self.metrics.on_device_connect(listener, protocol)

    def on_device_disconnect(self, listener: str, protocol: str) -> None:
        if self.metrics is not None:
            self.metrics.on_device_disconnect(listener, protocol)

    def on_device_refused(self, listener: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.on_device_refused(listener, reason)

    def on_connection_open(self, listener: str, protocol: str,
                           peer: tuple[str, int]) -> str | None:  # fmt: skip
        """Record the connection; returns the key `on_connection_close` takes."""
        if self.registry is None or protocol not in self.record:
            return None
        key = connection_id(listener, peer)
        host, port = peer
        remote = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.registry.add_connection(ConnectionInfo(
            id=key, kind="device", endpoint=listener, protocol=protocol, remote=remote,
        ))  # fmt: skip
        return key

    def on_connection_close(self, key: str | None) -> None:
        if key is not None and self.registry is not None:
            self.registry.remove_connection(key)
