"""The router's observer: the interface it reports its events through.

Direction: imports nothing of the router. The relay pieces (`linkpair`), the
connections (`device`, `upstream`, `gateway_tokens`) and the wiring (`core`)
call a `RouterObserver`; `NullObserver` is the default and the base for
observers that want a few hooks only. `gateway.ops.router_observer.OpsObserver`
implements it with the metrics facade and the live registry, so the router
knows nothing of `gateway.ops`.

What an observer is handed is declared here too (`ObservedPair`,
`ObservedDevice`, `ObservedUpstream`): the router's link pairs and
connections, as far as an observer may read them. An observer may keep a
record on an observed pair (``info``) for the relay to update in place (see
`linkpair.LinkPair`).

The relay reports in batches: ``on_message`` gets the messages of a pair
relayed while one received chunk was handled (``count`` of them, ``nbytes``
in all), ``on_disposition`` the receivers' outcomes of one disposition,
``on_relay_latency`` one chunk's latency for each of its transfers; each
becomes one update per batch, with the counts exact.
"""

from __future__ import annotations

from typing import Any, Protocol


class ObservedDevice(Protocol):
    """A device connection as an observer sees it."""

    @property
    def id(self) -> str: ...
    @property
    def listener(self) -> str: ...  # the listener's name
    @property
    def peer(self) -> tuple[str, int]: ...


class ObservedUpstream(Protocol):
    """An upstream (hub) connection as an observer sees it."""

    @property
    def id(self) -> str: ...
    @property
    def connector(self) -> str: ...


class ObservedPair(Protocol):
    """A routed link pair as an observer sees it. ``observed`` and ``info`` are
    the observer's to set: the pair was reported open, and its record."""

    observed: bool
    info: Any

    @property
    def device(self) -> ObservedDevice: ...
    @property
    def upstream(self) -> ObservedUpstream | None: ...
    @property
    def dev_link(self) -> Any: ...  # gateway.amqp.Link
    @property
    def attach(self) -> Any: ...  # the device's gateway.amqp.performatives.Attach
    @property
    def route(self) -> Any: ...  # routes.RouteMatch
    @property
    def address(self) -> str: ...
    @property
    def direction(self) -> str: ...  # "in": the device sends; "out": it receives


class RouterObserver(Protocol):
    """Hooks for metrics and the live registry."""

    # ---- links
    def on_link_opened(self, pair: ObservedPair) -> None: ...
    def on_link_closed(self, pair: ObservedPair) -> None: ...
    def on_message(self, pair: ObservedPair, nbytes: int, count: int = 1) -> None:
        """`count` messages (`nbytes` payload bytes in all) relayed on `pair`."""
    def on_disposition(self, pair: ObservedPair, outcome: str, count: int = 1) -> None:
        """`count` deliveries of `pair` got the receiver's `outcome` (``accepted``,
        ``rejected``, ..., ``settled`` for a bare settlement)."""
    def on_relay_latency(self, seconds: float, deliveries: int) -> None:
        """`deliveries` transfers read in one chunk were relayed `seconds` after the
        chunk arrived (all of them leave in the same write)."""
    def on_attach_refused(self, reason: str) -> None: ...
    def on_protocol_error(self, side: str, condition: str) -> None:
        """A peer broke the protocol and its connection was closed with the AMQP
        error `condition`; `side` is ``device`` or ``upstream``."""

    # ---- connections and connectors
    def on_device_refused(self, listener: str, reason: str) -> None:
        """A device connection refused at SASL time by the router (a provisioning login)."""
    def on_connector_state(self, connector: str, state: str, detail: str) -> None: ...
    def on_reconnect(self, connector: str) -> None: ...
    def on_device_open(self, device: ObservedDevice) -> None: ...
    def on_device_closed(self, device: ObservedDevice) -> None: ...
    def on_upstream_open(self, upstream: ObservedUpstream, remote: str) -> None: ...
    def on_upstream_closed(self, upstream: ObservedUpstream) -> None: ...

    # ---- tokens the gateway holds for devices
    def on_token_expiry(self, seconds: float | None) -> None:
        """The soonest expiry of the tokens held (None: none held)."""
    def on_token_renewal_failure(self, identity: str) -> None: ...


class NullObserver:
    """Observes nothing; subclass it to implement a few hooks only."""

    def on_link_opened(self, pair: ObservedPair) -> None:
        pass

    def on_link_closed(self, pair: ObservedPair) -> None:
        pass

    def on_message(self, pair: ObservedPair, nbytes: int, count: int = 1) -> None:
        pass

    def on_disposition(self, pair: ObservedPair, outcome: str, count: int = 1) -> None:
        pass

    def on_relay_latency(self, seconds: float, deliveries: int) -> None:
        pass

    def on_attach_refused(self, reason: str) -> None:
        pass

    def on_protocol_error(self, side: str, condition: str) -> None:
        pass

    def on_device_refused(self, listener: str, reason: str) -> None:
        pass

    def on_connector_state(self, connector: str, state: str, detail: str) -> None:
        pass

    def on_reconnect(self, connector: str) -> None:
        pass

    def on_device_open(self, device: ObservedDevice) -> None:
        pass

    def on_device_closed(self, device: ObservedDevice) -> None:
        pass

    def on_upstream_open(self, upstream: ObservedUpstream, remote: str) -> None:
        pass

    def on_upstream_closed(self, upstream: ObservedUpstream) -> None:
        pass

    def on_token_expiry(self, seconds: float | None) -> None:
        pass

    def on_token_renewal_failure(self, identity: str) -> None:
        pass


def observes_relay_latency(observer: RouterObserver) -> bool:
    """Does `observer` implement ``on_relay_latency`` (not `NullObserver`'s no-op)?
    Only then do the connections' handlers read the clock for it."""
    return getattr(type(observer), "on_relay_latency", None) is not NullObserver.on_relay_latency


__all__ = [
    "NullObserver",
    "ObservedDevice",
    "ObservedPair",
    "ObservedUpstream",
    "RouterObserver",
    "observes_relay_latency",
]
