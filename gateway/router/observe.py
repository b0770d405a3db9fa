"""Feeds the router's events to the metrics facade and the live registry.

The router calls one method per event (`RouterObserver` in core.py); this
adapter turns that into `gateway.ops.metrics.Metrics` calls and
`gateway.ops.registry.Registry` records. Both are optional.

It also keeps each observed link pair's registry record on the pair
(``pair.info``) for the relay to update in place, reports the relay latency
of device chunks (``on_relay_latency``, from `linkpair.timed_handler`), and
the router's gateway-held tokens: ``on_token_expiry`` feeds the soonest-expiry
gauge (shared with the MQTT relay's per-device expiries, the gauge shows the
soonest of all) and ``on_token_renewal_failure`` the failure counter.

`dispositions_relayed` is called by the disposition relay in linkpair.py for
each run of deliveries on one link whose disposition crossed the gateway; it
counts the receiver's outcomes (the hub's for device messages, the device's
for cloud-to-device messages) and ignores a sender merely settling.

The relay reports in batches: ``on_message`` gets the messages of a pair
relayed while one received chunk was handled (``count`` of them, ``nbytes``
in all), ``on_disposition`` the outcomes of one disposition, and
``on_relay_latency`` one chunk's latency for each of its transfers; each
becomes one metric update per batch, with the counts exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .device import DeviceConn
    from .linkpair import LinkPair
    from .upstream import UpstreamConn

from .identity import identity_of_address

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

    def on_link_opened(self, pair: LinkPair) -> None:
        pair.observed = True
        if self.metrics is not None:
            self.metrics.on_link_open(_route(pair), pair.direction)
        if self.registry is not None:
            from gateway.ops.registry import LinkInfo

            link = pair.dev_link
            # The relay updates this record in place (deliveries, credit, unsettled).
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
            ))  # fmt: skip

    def on_link_closed(self, pair: LinkPair) -> None:
        if not pair.observed:
            return
        if self.metrics is not None:
            self.metrics.on_link_close(_route(pair), pair.direction)
        if self.registry is not None:
            self.registry.remove_link(f"{pair.device.id}/{id(pair.dev_link):x}")
        pair.info = None

    def on_message(self, pair: LinkPair, nbytes: int, count: int = 1) -> None:
        """`count` messages (`nbytes` payload bytes in all) relayed on `pair`."""
        metrics = self.metrics
        if metrics is not None:
            if metrics.device_labels:
                metrics.on_message(_route(pair), pair.direction, nbytes,
                                   device=_device_of(pair.address), count=count)  # fmt: skip
            else:
                metrics.on_message(_route(pair), pair.direction, nbytes, count=count)
        if self.registry is not None:
            conn = self.registry.connection(pair.device.id)
            if conn is not None:
                if pair.direction == "in":
                    conn.count_in(nbytes, count)
                else:
                    conn.count_out(nbytes, count)

    def on_relay_latency(self, seconds: float, deliveries: int) -> None:
        """`deliveries` transfers read in one chunk were relayed `seconds` after the
        chunk arrived (all of them leave in the same write): one observation each."""
        if self.metrics is not None:
            self.metrics.observe_relay_latency(seconds, "amqp", count=deliveries)

    def on_disposition(self, pair: LinkPair, outcome: str, count: int = 1) -> None:
        """`count` deliveries of `pair` got the receiver's `outcome`."""
        if self.metrics is not None:
            self.metrics.on_disposition(outcome, pair.direction, count)

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

    # ---- gateway-held tokens -----------------------------------------------------

    def on_token_expiry(self, seconds: float | None) -> None:
        """The soonest expiry of the tokens the router holds for devices (None: none)."""
        if self.metrics is not None:
            self.metrics.set_token_expiry(seconds)

    def on_token_renewal_failure(self, identity: str) -> None:
        if self.metrics is not None:
            self.metrics.on_token_renewal_failure(identity)


# ---- the disposition relay's hook ---------------------------------------------------------

_OUTCOMES = {"Accepted": "accepted", "Rejected": "rejected", "Released": "released",
             "Modified": "modified", "Received": "received"}  # fmt: skip


def outcome_name(state: Any, settled: bool) -> str:
    """A fixed label for a delivery state: accepted, rejected, ..., or settled (no state)."""
    if state is None:
        return "settled" if settled else "none"
    return _OUTCOMES.get(type(state).__name__, "other")


def dispositions_relayed(link: Any, state: Any, settled: bool, count: int) -> None:
    """`count` deliveries on `link` (ours, the link that received the disposition)
    had their peer's disposition relayed to the other hop. Counted when the peer
    is the receiver, i.e. our link is the sender, and the link belongs to a
    routed pair."""
    if not link.is_sender:
        return
    pair = link.context
    device = getattr(pair, "device", None)
    direction = getattr(pair, "direction", None)
    if device is None or direction is None:
        return  # a CBS link: put-token replies are not message outcomes
    hook = getattr(device.router.observer, "on_disposition", None)
    if hook is not None:
        if count == 1:
            hook(pair, outcome_name(state, settled))
        else:
            hook(pair, outcome_name(state, settled), count)


def disposition_relayed(delivery: Any, state: Any, settled: bool) -> None:
    """One delivery's disposition relayed (see `dispositions_relayed`)."""
    dispositions_relayed(delivery.link, state, settled, 1)


def _route(pair: Any) -> str:
    """The route as configured: its prefix or pattern (`$cbs`, `devices/`)."""
    route = pair.route.route
    return route.prefix if route.prefix is not None else route.pattern


def _device_of(address: str) -> str | None:
    identity = identity_of_address(address)
    if identity is None or len(identity) < 2:
        return None
    return "/".join(identity[1::2])  # "d1" or "d1/m1"
