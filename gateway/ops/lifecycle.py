"""Pieces of the daemon's lifecycle: live listener limits, the live configuration,
in-flight deliveries, and the final detach.

- `LiveListenerSettings` is what the listeners admit connections by. The
  accept loop (`gateway.net.listeners.serve_listener`) reads
  ``allowed_networks`` and ``max_connections`` for every connection, so a
  reload changes them in place, and a drain turns new connections away.
- `LiveConfig` stands for the configuration in force: the MQTT relay reads
  its routes from it for every new connection, and a reload swaps what it
  points at.
- `LiveCredentials` does the same for the credential store the MQTT
  listeners use (the AMQP router takes a reloaded store with
  ``Router.set_credentials``).
- `in_flight(router)` counts deliveries not yet settled on any routed link
  pair (and messages queued towards either side): a drain waits for zero.
- `detach_all(router, description)` detaches every routed link with
  ``amqp:connection:forced`` and closes every connection.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any

__all__ = [
    "LiveConfig",
    "LiveCredentials",
    "LiveListenerSettings",
    "detach_all",
    "in_flight",
    "status_text",
]

Network = IPv4Network | IPv6Network


def _networks(values: Iterable[Any]) -> tuple[Network, ...]:
    return tuple(
        v if isinstance(v, IPv4Network | IPv6Network) else ip_network(str(v), strict=False)
        for v in values or ()
    )


@dataclass
class LiveListenerSettings:
    """`gateway.net.listeners.ListenerSettings`, with limits that can change while serving."""

    name: str
    host: str
    port: int
    protocol: str
    limit: int
    allowed_networks: tuple[Network, ...]
    ssl_context: ssl.SSLContext | None
    tls_handshake_timeout: float
    draining: bool = False
    # Bound by the daemon before anything is served (see Daemon.bind).
    sockets: list[Any] = field(default_factory=list)

    @classmethod
    def from_config(cls, listener_cfg: Any, config: Any) -> LiveListenerSettings:
        from gateway.net.listeners import ListenerSettings

        fixed = ListenerSettings.from_config(listener_cfg, config)
        return cls(
            name=fixed.name,
            host=fixed.host,
            port=fixed.port,
            protocol=fixed.protocol,
            limit=fixed.max_connections,
            allowed_networks=fixed.allowed_networks,
            ssl_context=fixed.ssl_context,
            tls_handshake_timeout=fixed.tls_handshake_timeout,
        )

    @property
    def max_connections(self) -> int:
        # Draining: every new connection is over the limit and closed at once.
        return 0 if self.draining else self.limit

    def update_limits(self, listener_cfg: Any) -> None:
        """Adopt a reloaded listener entry's max_connections and allowed_networks."""
        self.limit = int(listener_cfg.max_connections)
        self.allowed_networks = _networks(listener_cfg.allowed_networks)


class LiveConfig:
    """Attribute access goes to the configuration currently in force."""

    __slots__ = ("current",)

    def __init__(self, config: Any) -> None:
        self.current = config

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current, name)

    def __repr__(self) -> str:
        return f"LiveConfig({self.current!r})"


class LiveCredentials:
    """Attribute access goes to the credential store currently in force.

    Always true, even while the store is empty, so a listener given one sets up
    gateway-held credentials at start and a reload that adds entries applies to
    its new connections too (an empty store passes every device through).
    """

    __slots__ = ("current",)

    def __init__(self, store: Any) -> None:
        self.current = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current, name)

    def __len__(self) -> int:
        return len(self.current)

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"LiveCredentials({self.current!r})"


def in_flight(router: Any) -> int:
    """Deliveries on routed link pairs not yet settled on both ends, plus deliveries
    queued towards either side, plus messages being stored (store-and-forward).
    Zero means nothing would be lost by detaching."""
    total = 0
    for device in list(router.devices):
        for pair in list(device.pairs):
            for link in (pair.dev_link, pair.up_link):
                if link is not None:
                    total += len(link.unsettled) + link.queued
        # Store-and-forward: messages received on local links, being stored.
        total += sum(local.pending for local in getattr(device, "local_links", ()))
    return total


def detach_all(router: Any, description: str) -> None:
    """Detach every routed link with ``amqp:connection:forced`` and `description`,
    close every device and upstream connection, and stop the connector pools.
    The connection drivers then write the frames and finish."""
    # Devices first, so they get this description (a device is shut down once;
    # the router's own pass then finds them done and does the rest).
    router.stopping = True
    for device in list(router.devices):
        device.shutdown(description)
    router.shutdown()


def status_text(registry: Any) -> str:
    """One line for systemd's STATUS=: devices, upstream connections, links."""
    if registry is None:
        return "running"
    counts = registry.counts()
    return (
        f"{counts['device_connections']} device connection(s), "
        f"{counts['upstream_connections']} upstream, {counts['links']} link(s)"
    )
