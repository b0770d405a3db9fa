"""Live state of the running gateway, written by the relays, read by the admin API.

Writers touch plain attributes on small slotted records (``conn.messages_in
+= 1``), so the hot path costs an attribute update and nothing else; all the
work of turning state into JSON happens when someone asks for a snapshot.
Everything runs on one trio thread, so no locking is needed.

Nothing secret is ever stored here: records hold names, addresses, counters
and states only. Snapshots still pass free-text fields through the log
redaction helper as a second line of defence.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.ops.trace import redact_text as _scrub

__all__ = [
    "CONNECTOR_STATES",
    "ConnectionInfo",
    "connection_id",
    "ConnectorInfo",
    "LinkInfo",
    "ListenerInfo",
    "Registry",
]

ConnectionKind = Literal["device", "upstream"]

# Connector states as the pool reports them. Readiness treats only
# "connected" as up; "idle" is the normal state of an on-demand connector
# with no devices.
CONNECTOR_STATES = ("idle", "connecting", "connected", "backoff", "down", "closed")


@dataclass(slots=True, eq=False)
class ConnectionInfo:
    """One TCP connection, device side or upstream (hub) side."""

    id: str
    kind: ConnectionKind
    endpoint: str  # listener name (device) or connector name (upstream)
    protocol: str  # "amqp" | "mqtt"
    remote: str  # "host:port" of the peer
    opened_at: float = field(default_factory=time.time)
    device_ids: set[str] = field(default_factory=set)
    state: str = "open"
    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def count_in(self, nbytes: int, count: int = 1) -> None:
        """`count` messages (`nbytes` in all) received on this connection (from the
        device, or on an upstream connection from the hub)."""
        self.messages_in += count
        self.bytes_in += nbytes

    def count_out(self, nbytes: int, count: int = 1) -> None:
        """`count` messages (`nbytes` in all) sent on this connection."""
        self.messages_out += count
        self.bytes_out += nbytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "endpoint": self.endpoint,
            "protocol": self.protocol,
            "remote": self.remote,
            "opened_at": self.opened_at,
            "device_ids": sorted(self.device_ids),
            "state": self.state,
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }


@dataclass(slots=True, eq=False)
class LinkInfo:
    """One AMQP link (device side or upstream side of a routed pair)."""

    id: str
    connection_id: str
    name: str
    role: str  # "sender" | "receiver", from the owning peer's point of view
    address: str
    route: str = ""  # the matching route's prefix or pattern
    direction: str = ""  # "in" (towards the hub) | "out" (towards the device)
    upstream_link_id: str | None = None
    device_id: str = ""  # the identity the address names ("d1", "d1/m1"), if any
    opened_at: float = field(default_factory=time.time)
    # Written in place by the relay: deliveries relayed over the link (either
    # way). Credit and unsettled count are the device link's, read from `link`
    # (the engine's link, with ``credit`` and ``unsettled_count``) when the
    # record is shown, not copied on every message; without a link, as set.
    deliveries: int = 0
    unsettled: int = 0
    credit: int = 0
    link: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "connection_id": self.connection_id,
            "name": self.name,
            "role": self.role,
            "address": _scrub(self.address),
            "route": self.route,
            "direction": self.direction,
            "upstream_link_id": self.upstream_link_id,
            "device_id": self.device_id or None,
            "opened_at": self.opened_at,
            "deliveries": self.deliveries,
            "unsettled": self.unsettled if self.link is None else self.link.unsettled_count,
            "credit": self.credit if self.link is None else self.link.credit,
        }


@dataclass(slots=True, eq=False)
class ConnectorInfo:
    name: str
    protocol: str = ""
    target: str = ""  # "host:port"
    on_demand: bool = True
    state: str = "idle"
    detail: str = ""
    since: float = field(default_factory=time.time)
    connections: int = 0  # open upstream connections, maintained by the registry
    # Failover (gateway.net.dial): the endpoints configured, the one the last
    # successful connect reached (and at which address), and the endpoints the
    # last connect skipped or failed on, each with why.
    endpoints: list[str] = field(default_factory=list)
    endpoint: str | None = None
    address: str | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "target": self.target,
            "on_demand": self.on_demand,
            "state": self.state,
            "detail": _scrub(self.detail),
            "since": self.since,
            "connections": self.connections,
            "endpoints": list(self.endpoints),
            "endpoint": self.endpoint,
            "address": self.address,
            "skipped": [{k: _scrub(v) for k, v in row.items()} for row in self.skipped],
        }


@dataclass(slots=True, eq=False)
class ListenerInfo:
    name: str
    protocol: str = ""
    addresses: list[str] = field(default_factory=list)
    bound: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "protocol": self.protocol,
            "addresses": list(self.addresses),
            "bound": self.bound,
        }


class Registry:
    """In-memory registry of connections, links, connectors, listeners and routes."""

    def __init__(self) -> None:
        self._connections: dict[str, ConnectionInfo] = {}
        self._links: dict[str, LinkInfo] = {}
        self._links_by_connection: dict[str, set[str]] = {}
        self._connectors: dict[str, ConnectorInfo] = {}
        self._listeners: dict[str, ListenerInfo] = {}
        self._routes: list[dict[str, Any]] = []
        self._credentials: Callable[[], list[dict[str, Any]]] | None = None
        self._store: Callable[[], dict[str, Any]] | None = None

    # -- connections -----------------------------------------------------

    def add_connection(self, info: ConnectionInfo) -> ConnectionInfo:
        """Register a connection; returns the record for the caller to update in place."""
        self._connections[info.id] = info
        if info.kind == "upstream":
            self._connector(info.endpoint).connections += 1
        return info

    def remove_connection(self, connection_id: str) -> ConnectionInfo | None:
        """Forget a connection and every link still registered on it."""
        info = self._connections.pop(connection_id, None)
        for link_id in self._links_by_connection.pop(connection_id, ()):
            self._links.pop(link_id, None)
        if info is not None and info.kind == "upstream":
            connector = self._connectors.get(info.endpoint)
            if connector is not None and connector.connections > 0:
                connector.connections -= 1
        return info

    def add_relay_upstream(self, info: ConnectionInfo) -> ConnectionInfo:
        """Register an MQTT session's upstream connection, whose connector count
        `relay_upstream_opened` keeps."""
        self._connections[info.id] = info
        return info

    def remove_relay_upstream(self, connection_id: str) -> None:
        self._connections.pop(connection_id, None)

    def connection(self, connection_id: str) -> ConnectionInfo | None:
        return self._connections.get(connection_id)

    def identify_device(self, connection_id: str, device_id: str) -> None:
        """The device on a connection said who it is (an MQTT CONNECT's client id)."""
        info = self._connections.get(connection_id)
        if info is not None and device_id:
            info.device_ids.add(device_id)

    # -- links -----------------------------------------------------------

    def add_link(self, info: LinkInfo) -> LinkInfo:
        self._links[info.id] = info
        self._links_by_connection.setdefault(info.connection_id, set()).add(info.id)
        return info

    def remove_link(self, link_id: str) -> LinkInfo | None:
        info = self._links.pop(link_id, None)
        if info is not None:
            ids = self._links_by_connection.get(info.connection_id)
            if ids is not None:
                ids.discard(link_id)
                if not ids:
                    del self._links_by_connection[info.connection_id]
        return info

    def link(self, link_id: str) -> LinkInfo | None:
        return self._links.get(link_id)

    # -- connectors and listeners ---------------------------------------

    def register_connector(
        self,
        name: str,
        *,
        protocol: str = "",
        target: str = "",
        on_demand: bool = True,
        endpoints: Sequence[str] = (),
    ) -> ConnectorInfo:
        info = self._connector(name)
        info.protocol = protocol
        info.target = target
        info.on_demand = on_demand
        info.endpoints = list(endpoints) or ([target] if target else [])
        return info

    def connector_dialled(self, report: Any) -> None:
        """A connect to a connector ended (`gateway.net.dial.DialReport`): record the
        endpoint reached (kept when every endpoint failed while other connections
        still use it) and what was skipped on the way."""
        info = self._connectors.get(report.connector)
        if info is None:
            return
        if report.endpoint is not None:
            info.endpoint = str(report.endpoint)
            info.address = report.address
        elif info.connections == 0:
            info.endpoint = info.address = None
        info.skipped = [failure.to_dict() for failure in report.skipped]

    def set_connector_state(self, name: str, state: str, detail: str = "") -> None:
        info = self._connector(name)
        if info.state != state:
            info.since = time.time()
        info.state = state
        info.detail = detail

    def connector_state(self, name: str) -> str | None:
        info = self._connectors.get(name)
        return info.state if info is not None else None

    def relay_upstream_opened(self, name: str) -> None:
        """A per-device upstream connection (MQTT session relay) to `name` is open.
        The connector reads `connected` with the count while any is open."""
        info = self._connector(name)
        info.connections += 1
        self.set_connector_state(name, "connected")

    def relay_upstream_closed(self, name: str) -> None:
        """That connection is gone; at zero the connector is `idle` again."""
        info = self._connector(name)
        if info.connections > 0:
            info.connections -= 1
        if info.connections == 0:
            self.set_connector_state(name, "idle")

    def remove_connector(self, name: str) -> None:
        self._connectors.pop(name, None)

    def register_listener(self, name: str, *, protocol: str = "") -> ListenerInfo:
        info = self._listeners.setdefault(name, ListenerInfo(name))
        info.protocol = protocol
        return info

    def set_listener_bound(self, name: str, addrs: Iterable[Any]) -> None:
        """Record the addresses a listener is bound to (port 0 resolved)."""
        info = self._listeners.setdefault(name, ListenerInfo(name))
        info.addresses = [_format_address(a) for a in addrs]
        info.bound = bool(info.addresses)

    def set_listener_unbound(self, name: str) -> None:
        info = self._listeners.get(name)
        if info is not None:
            info.addresses = []
            info.bound = False

    def listener_bound(self, name: str) -> bool:
        info = self._listeners.get(name)
        return info is not None and info.bound

    # -- routes ----------------------------------------------------------

    def set_routes(self, routes: Sequence[dict[str, Any]]) -> None:
        """Replace the route table snapshot (called at start and on reload)."""
        self._routes = [dict(r) for r in routes]

    # -- credentials -----------------------------------------------------

    def set_credentials(self, describe: Callable[[], list[dict[str, Any]]] | None) -> None:
        """Where /api/credentials comes from: the credential store's ``describe``
        (identities, kinds, local auth: never a key, token or password)."""
        self._credentials = describe

    # -- store and forward -----------------------------------------------

    def set_store(self, snapshot: Callable[[], dict[str, Any]] | None) -> None:
        """Where /api/store comes from (`gateway.ops.store_status.StoreStatus.snapshot`)."""
        self._store = snapshot

    def store(self) -> dict[str, Any]:
        return {"state": "off"} if self._store is None else self._store()

    # -- snapshots (plain JSON-able data) --------------------------------

    def connections(self) -> list[dict[str, Any]]:
        # An upstream connection carries the links routed over it, and the devices
        # those links name; a device connection, the devices its own links name.
        upstream_links: dict[str, int] = {}
        devices: dict[str, set[str]] = {}
        for link in self._links.values():
            upstream = link.upstream_link_id  # the upstream connection's id
            if upstream is not None:
                upstream_links[upstream] = upstream_links.get(upstream, 0) + 1
            if link.device_id:
                devices.setdefault(link.connection_id, set()).add(link.device_id)
                if upstream is not None:
                    devices.setdefault(upstream, set()).add(link.device_id)
        out = []
        for info in self._connections.values():
            d = info.to_dict()
            if info.kind == "upstream":
                d["links"] = upstream_links.get(info.id, 0)
            else:
                d["links"] = len(self._links_by_connection.get(info.id, ()))
            seen = devices.get(info.id)
            if seen:
                d["device_ids"] = sorted(info.device_ids | seen)
            out.append(d)
        return out

    def links(self) -> list[dict[str, Any]]:
        return [info.to_dict() for info in self._links.values()]

    def routes(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._routes]

    def connectors(self) -> list[dict[str, Any]]:
        return [info.to_dict() for info in self._connectors.values()]

    def credentials(self) -> list[dict[str, Any]]:
        if self._credentials is None:
            return []
        return [
            {k: _scrub(v) if isinstance(v, str) else v for k, v in row.items()}
            for row in self._credentials()
        ]

    def listeners(self) -> list[dict[str, Any]]:
        return [info.to_dict() for info in self._listeners.values()]

    def counts(self) -> dict[str, int]:
        devices = sum(1 for c in self._connections.values() if c.kind == "device")
        return {
            "device_connections": devices,
            "upstream_connections": len(self._connections) - devices,
            "links": len(self._links),
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            "connections": self.connections(),
            "links": self.links(),
            "routes": self.routes(),
            "connectors": self.connectors(),
            "listeners": self.listeners(),
        }

    def _connector(self, name: str) -> ConnectorInfo:
        info = self._connectors.get(name)
        if info is None:
            info = self._connectors[name] = ConnectorInfo(name)
        return info


def connection_id(listener: str, peer: Any) -> str:
    """The registry id of a device connection registered by its listener:
    ``{listener}/{host}:{port}`` (unique while the connection is open)."""
    return f"{listener}/{_format_address(peer)}"


def _format_address(addr: Any) -> str:
    if isinstance(addr, str):
        return addr
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = str(addr[0]), addr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr)
