"""The router's observer for operations: its events to the metrics and the registry.

`OpsObserver` implements `gateway.router.observe.RouterObserver`: it turns the
router's events into `gateway.ops.metrics.Metrics` calls and
`gateway.ops.registry.Registry` records (both optional). It keeps each
observed link pair's registry record on the pair (``pair.info``) for the relay
to update in place, reports the relay latency of the connections' chunks
(``on_relay_latency``), and the router's gateway-held tokens:
``on_token_expiry`` feeds the soonest-expiry gauge (shared with the MQTT
relay's per-device expiries, the gauge shows the soonest of all) and
``on_token_renewal_failure`` the failure counter.
"""

from __future__ import annotations

from typing import Any

from gateway.router.identity import identity_of_address
from gateway.router.observe import ObservedDevice, ObservedPair, ObservedUpstream

from .registry import ConnectionInfo, LinkInfo

# Pool states -> registry connector states.
_CONNECTOR_STATE = {"up": "connected", "connecting": "connecting", "backoff": "backoff",
                    "idle": "idle"}  # fmt: skip


class OpsObserver:
    def __init__(self, metrics: Any = None, registry: Any = None) -> None:
        self.metrics = metrics
        self.registry = registry

    def on_device_refused(self, listener: str, reason: str) -> None:
        """A device connection refused at SASL time by the router (a provisioning login)."""
        if self.metrics is not None:
            self.metrics.on_device_refused(listener, reason)

    # ---- links ---------------------------------------------------------------

    def on_link_opened(self, pair: ObservedPair) -> None:
        pair.observed = True
        if self.metrics is not None:
            self.metrics.on_link_open(_route(pair), pair.direction)
        if self.registry is not None:
            link = pair.dev_link
            # The relay counts deliveries in this record in place; credit and
            # unsettled are read from the device link when the record is shown.
            pair.info = self.registry.add_link(LinkInfo(
                id=f"{pair.device.id}/{id(link):x}",
                connection_id=pair.device.id,
                name=str(pair.attach.name),
                role="receiver" if pair.direction == "out" else "sender",
                address=pair.address,
                route=_route(pair),
                direction=pair.direction,
                upstream_link_id=pair.upstream.id if pair.upstream is not None else None,
                device_id=_device_of(pair.address) or "",
                link=link,
            ))  # fmt: skip

    def on_link_closed(self, pair: ObservedPair) -> None:
        if not pair.observed:
            return
        if self.metrics is not None:
            self.metrics.on_link_close(_route(pair), pair.direction)
        if self.registry is not None:
            self.registry.remove_link(f"{pair.device.id}/{id(pair.dev_link):x}")
        pair.info = None

    def on_message(self, pair: ObservedPair, nbytes: int, count: int = 1) -> None:
        """`count` messages (`nbytes` payload bytes in all) relayed on `pair`."""
        metrics = self.metrics
        if metrics is not None:
            if metrics.device_labels:
                metrics.on_message(_route(pair), pair.direction, nbytes,
                                   device=_device_of(pair.address), count=count)  # fmt: skip
            else:
                metrics.on_message(_route(pair), pair.direction, nbytes, count=count)
        registry = self.registry
        if registry is not None:
            conn = registry.connection(pair.device.id)
            up = pair.upstream
            hub = registry.connection(up.id) if up is not None else None
            if pair.direction == "in":
                if conn is not None:
                    conn.count_in(nbytes, count)
                if hub is not None:
                    hub.count_out(nbytes, count)
            else:
                if conn is not None:
                    conn.count_out(nbytes, count)
                if hub is not None:
                    hub.count_in(nbytes, count)

    def on_relay_latency(self, seconds: float, deliveries: int) -> None:
        """`deliveries` transfers read in one chunk were relayed `seconds` after the
        chunk arrived (all of them leave in the same write): one observation each."""
        if self.metrics is not None:
            self.metrics.observe_relay_latency(seconds, "amqp", count=deliveries)

    def on_disposition(self, pair: ObservedPair, outcome: str, count: int = 1) -> None:
        """`count` deliveries of `pair` got the receiver's `outcome`."""
        if self.metrics is not None:
            self.metrics.on_disposition(outcome, pair.direction, count)

    def on_attach_refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.on_attach_refused(reason)

    def on_protocol_error(self, side: str, condition: str) -> None:
        """Labelled like the MQTT relay's: protocol, side, kind (here the AMQP
        condition our close carried, a short fixed vocabulary)."""
        if self.metrics is not None:
            self.metrics.on_protocol_error(condition, side=side, protocol="amqp")

    # ---- connections and connectors ---------------------------------------------

    def on_device_open(self, device: ObservedDevice) -> None:
        if self.registry is not None:
            self.registry.add_connection(ConnectionInfo(
                id=device.id, kind="device", endpoint=device.listener, protocol="amqp",
                remote=f"{device.peer[0]}:{device.peer[1]}",
            ))  # fmt: skip

    def on_device_closed(self, device: ObservedDevice) -> None:
        if self.registry is not None:
            self.registry.remove_connection(device.id)

    def on_upstream_open(self, upstream: ObservedUpstream, remote: str) -> None:
        if self.metrics is not None:
            self.metrics.on_upstream_state(upstream.connector, "open", None)
        if self.registry is not None:
            self.registry.add_connection(ConnectionInfo(
                id=upstream.id, kind="upstream", endpoint=upstream.connector, protocol="amqp",
                remote=remote,
            ))  # fmt: skip

    def on_upstream_closed(self, upstream: ObservedUpstream) -> None:
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

    # ---- gateway-held tokens -----------------------------------------------------

    def on_token_expiry(self, seconds: float | None) -> None:
        """The soonest expiry of the tokens the router holds for devices (None: none)."""
        if self.metrics is not None:
            self.metrics.set_token_expiry(seconds)

    def on_token_renewal_failure(self, identity: str) -> None:
        if self.metrics is not None:
            self.metrics.on_token_renewal_failure(identity)


def _route(pair: Any) -> str:
    """The route as configured: its prefix or pattern (`$cbs`, `devices/`)."""
    route = pair.route.route
    return route.prefix if route.prefix is not None else route.pattern


def _device_of(address: str) -> str | None:
    identity = identity_of_address(address)
    if identity is None or len(identity) < 2:
        return None
    return "/".join(identity[1::2])  # "d1" or "d1/m1"
