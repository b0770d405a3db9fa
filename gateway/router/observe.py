"""Feeds the router's events to the metrics facade and the live registry.

The router calls one method per event (`RouterObserver` in core.py); this
adapter turns that into `gateway.ops.metrics.Metrics` calls and
`gateway.ops.registry.Registry` records. Both are optional.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .device import DeviceConn
    from .linkpair import LinkPair
    from .upstream import UpstreamConn

# Pool states -> registry connector states.
_CONNECTOR_STATE = {"up": "connected", "connecting": "connecting", "backoff": "backoff",
                    "idle": "idle"}  # fmt: skip


class OpsObserver:
    def __init__(self, metrics: Any = None, registry: Any = None) -> None:
        self.metrics = metrics
        self.registry = registry

    # ---- links ---------------------------------------------------------------

    def on_link_opened(self, pair: LinkPair) -> None:
        pair.observed = True
        if self.metrics is not None:
            self.metrics.on_link_open(pair.route.route.spec, pair.direction)
        if self.registry is not None:
            from gateway.ops.registry import LinkInfo

            link = pair.dev_link
            self.registry.add_link(LinkInfo(
                id=f"{pair.device.id}/{id(link):x}",
                connection_id=pair.device.id,
                name=str(pair.attach.name),
                role="receiver" if pair.direction == "out" else "sender",
                address=pair.address,
                route=pair.route.route.spec,
                direction=pair.direction,
                upstream_link_id=pair.upstream.id if pair.upstream is not None else None,
            ))  # fmt: skip

    def on_link_closed(self, pair: LinkPair) -> None:
        if not pair.observed:
            return
        if self.metrics is not None:
            self.metrics.on_link_close(pair.route.route.spec, pair.direction)
        if self.registry is not None:
            self.registry.remove_link(f"{pair.device.id}/{id(pair.dev_link):x}")

    def on_message(self, pair: LinkPair, nbytes: int) -> None:
        if self.metrics is not None:
            self.metrics.on_message(pair.route.route.spec, pair.direction, nbytes)

    def on_attach_refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.on_attach_refused(reason)

    # ---- connections and connectors ---------------------------------------------

    def on_device_open(self, device: DeviceConn) -> None:
        if self.registry is not None:
            from gateway.ops.registry import ConnectionInfo

            self.registry.add_connection(ConnectionInfo(
                id=device.id, kind="device", endpoint=device.listener, protocol="amqp",
                remote=f"{device.peer[0]}:{device.peer[1]}",
            ))  # fmt: skip

    def on_device_closed(self, device: DeviceConn) -> None:
        if self.registry is not None:
            self.registry.remove_connection(device.id)

    def on_upstream_open(self, upstream: UpstreamConn, remote: str) -> None:
        if self.metrics is not None:
            self.metrics.on_upstream_state(upstream.connector, "open", None)
        if self.registry is not None:
            from gateway.ops.registry import ConnectionInfo

            self.registry.add_connection(ConnectionInfo(
                id=upstream.id, kind="upstream", endpoint=upstream.connector, protocol="amqp",
                remote=remote,
            ))  # fmt: skip

    def on_upstream_closed(self, upstream: UpstreamConn) -> None:
        if self.metrics is not None:
            self.metrics.on_upstream_state(upstream.connector, None, "open")
        if self.registry is not None:
            self.registry.remove_connection(upstream.id)

    def on_connector_state(self, connector: str, state: str, detail: str) -> None:
        if self.registry is not None:
            self.registry.set_connector_state(connector, _CONNECTOR_STATE.get(state, state), detail)

    def on_reconnect(self, connector: str) -> None:
        if self.metrics is not None:
            self.metrics.on_reconnect(connector)
