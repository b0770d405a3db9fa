"""Prometheus metrics (``iotgw_*``) behind a small facade the relays call.

The relays never touch prometheus_client directly: they call one method on
:class:`Metrics` per event (``on_message(route, direction, nbytes)``), and the
facade keeps the labelled children in dicts so the hot path is a dict lookup
and an increment.

Label values are names from the configuration (listener, connector, route
prefix or pattern) or short fixed vocabularies (direction, outcome, reason,
packet type). Device ids never become label values unless
``gateway.metrics_device_labels`` is set; callers always pass the device id
where one is known and this module decides. Each label set is capped
(:data:`MAX_LABEL_VALUES`) so a caller that passes, say, a full address by
mistake folds into ``other`` instead of growing memory without bound.

Directions: ``in`` is device -> hub, ``out`` is hub -> device, for AMQP routes
and MQTT packets alike.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.values import MutexValue

from gateway.ops.registry import ConnectionInfo, connection_id

__all__ = [
    "LATENCY_BUCKETS",
    "MAX_LABEL_VALUES",
    "Metrics",
    "NullMetrics",
    "MqttRelayMetrics",
    "FastHistogram",
    "HotValue",
    "hot_value",
]

# Relay latency is measured from a frame arriving to the re-encoded frame
# leaving, inside the gateway: tens of microseconds when idle, milliseconds
# under load, 100 ms means something is badly wrong.
LATENCY_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
)  # fmt: skip

# Distinct label combinations kept per metric before new ones fold into "other".
MAX_LABEL_VALUES = 500
# Per-device series are capped separately; a fleet bigger than this should
# not be labelled per device anyway.
MAX_DEVICE_SERIES = 5000

_OTHER = "other"


class _Children:
    """Cache of a metric's labelled children, keyed by the label tuple."""

    __slots__ = ("_metric", "_cache", "_limit")

    def __init__(self, metric: Any, limit: int = MAX_LABEL_VALUES) -> None:
        self._metric = metric
        self._cache: dict[tuple[str, ...], Any] = {}
        self._limit = limit

    def get(self, *labels: str) -> Any:
        child = self._cache.get(labels)
        if child is None:
            child = self._create(labels)
        return child

    def _create(self, labels: tuple[str, ...]) -> Any:
        key = labels
        if len(self._cache) >= self._limit:
            key = tuple(_OTHER for _ in labels)
            child = self._cache.get(key)
            if child is not None:
                return child
        child = self._metric.labels(*(str(v) for v in key))
        self._cache[key] = child
        return child

    def forget(self, predicate: Callable[[tuple[str, ...]], bool]) -> None:
        for key in [k for k in self._cache if predicate(k)]:
            del self._cache[key]
            try:
                self._metric.remove(*key)
            except KeyError:
                pass

    def __len__(self) -> int:
        return len(self._cache)


class Metrics:
    """The gateway's metrics, registered in ``registry`` (a fresh one by default)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        device_labels: bool = False,
        process_metrics: bool = True,
        gateway_id: str = "",
        version: str = "",
    ) -> None:
        if registry is None:
            registry = CollectorRegistry(auto_describe=True)
            if process_metrics:
                # RSS, CPU seconds and open fds of the daemon: what a Pi operator
                # looks at first. The default registry has these already.
                ProcessCollector(registry=registry)
        self.registry = registry
        self.device_labels = device_labels
        r = registry

        info = Info("iotgw_build", "Gateway version and id", registry=r)
        info.info({"version": version or _package_version(), "gateway_id": gateway_id})

        # Device side.
        self._device_open = _Children(
            Gauge(
                "iotgw_device_connections_open",
                "Device connections currently open",
                ["listener", "protocol"],
                registry=r,
            )
        )
        self._device_total = _Children(
            Counter(
                "iotgw_device_connections",
                "Device connections accepted",
                ["listener", "protocol"],
                registry=r,
            )
        )
        self._device_refused = _Children(
            Counter(
                "iotgw_device_connections_refused",
                "Device connections refused before the protocol started",
                ["listener", "reason"],
                registry=r,
            )
        )

        # Upstream side.
        self._upstream = _Children(
            Gauge(
                "iotgw_upstream_connections",
                "Upstream (hub) connections by state",
                ["connector", "state"],
                registry=r,
            )
        )
        self._upstream_opened = _Children(
            Counter(
                "iotgw_upstream_connections_opened",
                "Upstream connections established (TLS and protocol handshake done)",
                ["connector"],
                registry=r,
            )
        )
        self._tls_failures = _Children(
            Counter(
                "iotgw_tls_handshake_failures",
                "TLS handshake failures towards a connector",
                ["connector", "reason"],
                registry=r,
            )
        )
        self._reconnects = _Children(
            Counter(
                "iotgw_reconnects",
                "Reconnect attempts after an upstream connection was lost or failed",
                ["connector"],
                registry=r,
            )
        )

        # Links and traffic.
        self._links_open = _Children(
            Gauge(
                "iotgw_links_open",
                "Routed AMQP link pairs currently attached",
                ["route", "direction"],
                registry=r,
            )
        )
        self._links_total = _Children(
            Counter(
                "iotgw_links",
                "Routed AMQP link pairs attached",
                ["route", "direction"],
                registry=r,
            )
        )
        self._messages_metric = Counter(
            "iotgw_messages",
            "Messages relayed (AMQP deliveries, MQTT PUBLISH packets)",
            ["route", "direction"],
            registry=r,
        )
        self._bytes_metric = Counter(
            "iotgw_message_bytes",
            "Message bytes relayed (AMQP transfer payload, MQTT packet size)",
            ["route", "direction"],
            registry=r,
        )
        # One lookup yields both children: the hot path is on_message.
        self._traffic: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._dispositions = _Children(
            Counter(
                "iotgw_dispositions",
                "Delivery outcomes relayed (the receiver's disposition), by outcome and "
                "direction of the message",
                ["outcome", "direction"],
                registry=r,
            )
        )
        self._attach_refusals = _Children(
            Counter(
                "iotgw_attach_refusals",
                "Link attaches refused (by the gateway or the hub), by error condition",
                ["reason"],
                registry=r,
            )
        )
        self._protocol_errors = _Children(
            Counter(
                "iotgw_protocol_errors",
                "Protocol errors, by protocol, side (device|upstream) and kind",
                ["protocol", "side", "kind"],
                registry=r,
            )
        )
        self._latency = _Children(
            Histogram(
                "iotgw_relay_latency_seconds",
                "Time from a frame arriving to the relayed frame being sent, inside the gateway",
                ["protocol"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
        )
        self._fast_latency: dict[str, FastHistogram] = {}
        self._hot_dispositions: dict[tuple[str, str], Any] = {}
        self._mqtt_packets = _Children(
            Counter(
                "iotgw_mqtt_packets",
                "MQTT packets relayed, by type and direction",
                ["type", "direction"],
                registry=r,
            )
        )
        self._mqtt_closes = _Children(
            Counter(
                "iotgw_mqtt_sessions_closed",
                "MQTT relayed sessions closed, by reason",
                ["reason"],
                registry=r,
            )
        )
        # Store-and-forward: MQTT telemetry a local session could not store (QoS 0).
        self._mqtt_store_dropped = _Children(
            Counter(
                "iotgw_mqtt_store_dropped",
                "MQTT telemetry dropped in a store-and-forward local session, by reason (qos0)",
                ["reason"],
                registry=r,
            )
        )

        # Credentials (token expiry, renewal): used once the gateway holds keys.
        self._token_expiry = Gauge(
            "iotgw_token_expiry_seconds",
            "Seconds until the soonest gateway-held SAS token expires",
            registry=r,
        )
        # Expiry deadlines (monotonic seconds) by holder: a device or module identity,
        # or None for the AMQP router's soonest. Scrapes see the time left now.
        self._token_deadlines: dict[str | None, float] = {}
        self._token_expiry.set_function(self._soonest_token_expiry)
        self._renewal_failures = Counter(
            "iotgw_token_renewal_failures",
            "SAS token renewals that failed",
            registry=r,
        )

        # Lifecycle.
        self._reloads = _Children(
            Counter(
                "iotgw_config_reloads",
                "Configuration reloads (SIGHUP), by result",
                ["result"],
                registry=r,
            )
        )

        # Draining after SIGTERM: a replica stuck here serves nobody (alerts: drain stuck).
        self._draining = Gauge(
            "iotgw_draining",
            "1 while the gateway drains after SIGTERM (new connections and attaches refused)",
            registry=r,
        )

        # Optional per-device series.
        self._device_messages: _Children | None = None
        self._device_bytes: _Children | None = None
        self._device_token_expiry: _Children | None = None
        self._device_renewal_failures: _Children | None = None
        if device_labels:
            self._device_messages = _Children(
                Counter(
                    "iotgw_device_messages",
                    "Messages relayed per device",
                    ["device", "direction"],
                    registry=r,
                ),
                MAX_DEVICE_SERIES,
            )
            self._device_bytes = _Children(
                Counter(
                    "iotgw_device_message_bytes",
                    "Message bytes relayed per device",
                    ["device", "direction"],
                    registry=r,
                ),
                MAX_DEVICE_SERIES,
            )
            self._device_token_expiry = _Children(
                Gauge(
                    "iotgw_device_token_expiry_seconds",
                    "Seconds until the device's gateway-held SAS token expires",
                    ["device"],
                    registry=r,
                ),
                MAX_DEVICE_SERIES,
            )
            self._device_renewal_failures = _Children(
                Counter(
                    "iotgw_device_token_renewal_failures",
                    "SAS token renewals that failed, per device or module identity",
                    ["device"],
                    registry=r,
                ),
                MAX_DEVICE_SERIES,
            )

    # -- device connections --------------------------------------------------

    def on_device_connect(self, listener: str, protocol: str) -> None:
        self._device_open.get(listener, protocol).inc()
        self._device_total.get(listener, protocol).inc()

    def on_device_disconnect(self, listener: str, protocol: str) -> None:
        self._device_open.get(listener, protocol).dec()

    def on_device_refused(self, listener: str, reason: str) -> None:
        """A connection closed before the protocol started (limit, network policy, ...)."""
        self._device_refused.get(listener, reason).inc()

    # -- upstream connections ----------------------------------------------------

    def on_upstream_state(
        self, connector: str, state: str | None, previous: str | None = None
    ) -> None:
        """Move one upstream connection from ``previous`` to ``state``.

        ``previous=None`` is a new connection; ``state=None`` (or "closed") means
        it is gone. Typical states: connecting, open, closing.
        """
        if previous is not None and previous != "closed":
            self._upstream.get(connector, previous).dec()
        if state is not None and state != "closed":
            self._upstream.get(connector, state).inc()
            if state == "open" and previous != "open":
                self._upstream_opened.get(connector).inc()

    def on_tls_handshake_failure(self, connector: str, reason: str) -> None:
        self._tls_failures.get(connector, reason).inc()

    def on_reconnect(self, connector: str) -> None:
        self._reconnects.get(connector).inc()

    # -- links and traffic ---------------------------------------------------------

    def on_link_open(self, route: str, direction: str) -> None:
        self._links_open.get(route, direction).inc()
        self._links_total.get(route, direction).inc()

    def on_link_close(self, route: str, direction: str) -> None:
        self._links_open.get(route, direction).dec()

    def on_message(
        self, route: str, direction: str, nbytes: int, device: str | None = None, count: int = 1
    ) -> None:
        """`count` messages (of `nbytes` in all) relayed. The hot path: a dict
        lookup and two increments."""
        pair = self._traffic.get((route, direction))
        if pair is None:
            pair = self._traffic_children(route, direction)
        pair[0].inc(count)
        pair[1].inc(nbytes)
        if device is not None and self._device_messages is not None:
            self._device_messages.get(device, direction).inc(count)
            self._device_bytes.get(device, direction).inc(nbytes)  # type: ignore[union-attr]

    def _traffic_children(self, route: str, direction: str) -> tuple[Any, Any]:
        key = (route, direction)
        if len(self._traffic) >= MAX_LABEL_VALUES:
            key = (_OTHER, _OTHER)
            pair = self._traffic.get(key)
            if pair is not None:
                return pair
        pair = (
            hot_value(self._messages_metric.labels(*key)),
            hot_value(self._bytes_metric.labels(*key)),
        )
        self._traffic[key] = pair
        return pair

    def on_disposition(self, outcome: str, direction: str, count: int = 1) -> None:
        """A receiver's disposition relayed to the sender (for `count` deliveries).

        outcome: accepted | rejected | released | modified | received | settled
        (settled without an outcome); direction: of the message, ``in`` = the
        hub's outcome of a device message, ``out`` = the device's outcome of a
        cloud-to-device message.
        """
        value = self._hot_dispositions.get((outcome, direction))
        if value is None:
            value = self._hot_dispositions[outcome, direction] = hot_value(
                self._dispositions.get(outcome, direction)
            )
        value.inc(count)

    def on_attach_refused(self, reason: str) -> None:
        """reason: the AMQP error condition, e.g. amqp:not-found."""
        self._attach_refusals.get(reason).inc()

    def on_protocol_error(self, kind: str, side: str = "device", protocol: str = "amqp") -> None:
        self._protocol_errors.get(protocol, side, kind).inc()

    def observe_relay_latency(self, seconds: float, protocol: str = "amqp", count: int = 1) -> None:
        """`count` relayed frames (or messages) took `seconds` each: as many observations."""
        fast = self._fast_latency.get(protocol)
        if fast is None:
            fast = self._fast_latency[protocol] = FastHistogram(self._latency.get(protocol))
        if count > 0:
            fast.observe(seconds, count)

    def relay_latency(self, protocol: str = "amqp") -> Any:
        """The histogram child for ``protocol``, for callers that observe in a loop."""
        return self._latency.get(protocol)

    # -- MQTT ----------------------------------------------------------------------

    def on_mqtt_packet(self, packet_type: str, direction: str, count: int = 1) -> None:
        self._mqtt_packets.get(packet_type, direction).inc(count)

    def mqtt_counters(self, packet_type: str, direction: str, route: str) -> tuple[Any, ...]:
        """The counter children a relayed batch of `packet_type` increments, for a
        caller to keep: (packets,) or, for PUBLISH, (packets, messages, bytes)."""
        packets = hot_value(self._mqtt_packets.get(packet_type, direction))
        if packet_type != "PUBLISH":
            return (packets,)
        pair = self._traffic.get((route, direction))
        if pair is None:
            pair = self._traffic_children(route, direction)
        return (packets, pair[0], pair[1])

    def on_mqtt_closed(self, reason: str) -> None:
        self._mqtt_closes.get(reason).inc()

    def on_mqtt_store_dropped(self, reason: str) -> None:
        self._mqtt_store_dropped.get(reason).inc()

    def mqtt_observer(self, listener: str = "", route: str = "mqtt",
                      registry: Any = None) -> MqttRelayMetrics:  # fmt: skip
        """The MQTT relay's observer for one listener (``registry``: the live
        registry for connector state and device ids, optional)."""
        return MqttRelayMetrics(self, listener, route, registry)

    # -- credentials ---------------------------------------------------------------

    def set_token_expiry(self, seconds: float | None, device: str | None = None) -> None:
        """Seconds from now until a gateway-held token expires (None: no token any more).

        ``device`` is the identity the token is for; None stands for the AMQP
        router's soonest expiry. The gauge shows the soonest of all, counting
        down between reports; NaN while the gateway holds no token ("0 seconds
        left" would page someone).
        """
        if seconds is None:
            self._token_deadlines.pop(device, None)
            if device is not None and self._device_token_expiry is not None:
                self._device_token_expiry.forget(lambda key: key[0] == device)
            return
        deadline = time.monotonic() + seconds
        self._token_deadlines[device] = deadline
        if device is not None and self._device_token_expiry is not None:
            self._device_token_expiry.get(device).set_function(lambda: deadline - time.monotonic())

    def _soonest_token_expiry(self) -> float:
        if not self._token_deadlines:
            return float("nan")
        return min(self._token_deadlines.values()) - time.monotonic()

    def on_token_renewal_failure(self, device: str | None = None) -> None:
        """A gateway-held token for ``device`` (an identity, ``d1`` or ``d1/m1``) could
        not be renewed. Labelled by identity only with ``metrics_device_labels``."""
        self._renewal_failures.inc()
        if device is not None and self._device_renewal_failures is not None:
            self._device_renewal_failures.get(device).inc()

    # -- lifecycle -------------------------------------------------------------------

    def on_reload(self, ok: bool) -> None:
        self._reloads.get("ok" if ok else "rejected").inc()

    def set_draining(self, draining: bool) -> None:
        self._draining.set(1 if draining else 0)

    def forget_device(self, device: str) -> None:
        """Drop a departed device's per-device series (and its token expiry)."""
        self._token_deadlines.pop(device, None)
        for children in (self._device_messages, self._device_bytes, self._device_token_expiry,
                         self._device_renewal_failures):  # fmt: skip
            if children is not None:
                children.forget(lambda key: key[0] == device)


class MqttRelayMetrics:
    """Adapter from the MQTT relay's observer hooks to :class:`Metrics` (and,
    given one, the live `gateway.ops.registry.Registry`).

    PUBLISH packets also count as messages on ``route`` so MQTT and AMQP
    traffic read the same in iotgw_messages_total. Upstream opens and closes
    keep the connector's state and connection count in the registry
    (``connected`` while any session is relayed, ``idle`` at none).
    """

    __slots__ = ("_metrics", "_latency", "_counters", "listener", "route", "registry")

    def __init__(self, metrics: Metrics | NullMetrics, listener: str, route: str,
                 registry: Any = None) -> None:  # fmt: skip
        self._metrics = metrics
        self._latency = FastHistogram(metrics.relay_latency("mqtt"))
        # (direction, packet type) -> the counter children a batch increments.
        self._counters: dict[tuple[str, str], tuple[Any, ...]] = {}
        self.listener = listener
        self.route = route
        self.registry = registry

    def on_packet(self, direction: str, packet_type: str, nbytes: int = 0) -> None:
        self._metrics.on_mqtt_packet(packet_type, direction)
        if packet_type == "PUBLISH":
            self._metrics.on_message(self.route, direction, nbytes)

    def on_packets(self, direction: str, packet_type: str, count: int, nbytes: int) -> None:
        """`count` packets of one type (`nbytes` in all) relayed in one batch."""
        counters = self._counters.get((direction, packet_type))
        if counters is None:
            counters = self._counters[direction, packet_type] = self._metrics.mqtt_counters(
                packet_type, direction, self.route
            )
        counters[0].inc(count)
        if len(counters) == 3:
            counters[1].inc(count)
            counters[2].inc(nbytes)

    def on_batch(
        self, direction: str, packet_type: str, count: int, nbytes: int, seconds: float
    ) -> None:
        """`on_packets` and `on_relay_latency` in one call: the relay's hot path."""
        self.on_packets(direction, packet_type, count, nbytes)
        self._latency.observe(seconds)

    def on_relay_latency(self, seconds: float) -> None:
        """Time from the bytes of a packet arriving to their relay being written
        (call once per relayed read or batch, not per packet, on the hot path)."""
        self._latency.observe(seconds)

    def on_close(self, reason: str) -> None:
        self._metrics.on_mqtt_closed(reason)
        side = _MQTT_PROTOCOL_ERRORS.get(reason)
        if side is not None:
            self._metrics.on_protocol_error(reason, side=side, protocol="mqtt")

    def on_store_dropped(self, device: str, reason: str) -> None:
        """A local session dropped a device's telemetry (QoS 0: nothing to acknowledge)."""
        self._metrics.on_mqtt_store_dropped(reason)

    def on_device_identified(self, conn_key: Any, device_id: str) -> None:
        """The session's CONNECT named its client (``dev`` or ``dev/mod``).
        ``conn_key``: the device's peer ``(host, port)`` as the listener handed it
        to the relay (or a registry connection id). Shown in /api/connections;
        never a metric label."""
        if self.registry is None:
            return
        if isinstance(conn_key, tuple):
            conn_key = connection_id(self.listener, conn_key)
        self.registry.identify_device(str(conn_key), device_id)

    def device_record(self, conn_key: Any) -> Any:
        """The registry record of the device's connection, for the relay to count on."""
        if self.registry is None:
            return None
        if isinstance(conn_key, tuple):
            conn_key = connection_id(self.listener, conn_key)
        return self.registry.connection(str(conn_key))

    def upstream_record(self, conn_key: Any, name: str, connector: str, remote: str | None,
                        client_id: str) -> Any:  # fmt: skip
        """A registry record for one upstream connection of a device's session (shown
        in /api/connections; the connector's count is kept by ``on_upstream_open``)."""
        if self.registry is None:
            return None
        info = ConnectionInfo(id=f"{connector}#{name}", kind="upstream", endpoint=connector,
                              protocol="mqtt", remote=remote or "")  # fmt: skip
        if client_id:
            info.device_ids.add(client_id)
        return self.registry.add_relay_upstream(info)

    def upstream_record_closed(self, record: Any) -> None:
        if self.registry is not None:
            self.registry.remove_relay_upstream(record.id)

    def on_upstream_connect_failure(self, connector: str, reason: str) -> None:
        """TCP/TLS connect to the connector failed (reason as the TLS layer classifies it)."""
        self._metrics.on_tls_handshake_failure(connector, reason)

    def on_token_renewal_failure(self, device: str) -> None:
        """A gateway-issued token could not be renewed (each attempt, and at expiry)."""
        self._metrics.on_token_renewal_failure(device)

    def on_token_expiry(self, device: str, seconds: float | None) -> None:
        """A gateway-issued token's remaining life when issued; None once the session ended."""
        self._metrics.set_token_expiry(seconds, device)

    def on_upstream_open(self, connector: str) -> None:
        """A device's own upstream (TLS) connection to ``connector`` is established."""
        self._metrics.on_upstream_state(connector, "open", None)
        if self.registry is not None:
            self.registry.relay_upstream_opened(connector)

    def on_upstream_close(self, connector: str) -> None:
        """That upstream connection is gone (after ``on_upstream_open`` only)."""
        self._metrics.on_upstream_state(connector, None, "open")
        if self.registry is not None:
            self.registry.relay_upstream_closed(connector)


# MQTT relay close reasons that are protocol errors, and on which side.
_MQTT_PROTOCOL_ERRORS = {
    "device_protocol_error": "device",
    "packet_too_large": "device",
    "connect_too_large": "device",
    "unsupported_protocol": "device",
    "upstream_protocol_error": "upstream",
}


class NullMetrics:
    """Same interface as :class:`Metrics`, records nothing (metrics disabled, unit tests)."""

    registry: CollectorRegistry | None = None
    device_labels = False

    def on_device_connect(self, listener: str, protocol: str) -> None: ...
    def on_device_disconnect(self, listener: str, protocol: str) -> None: ...
    def on_device_refused(self, listener: str, reason: str) -> None: ...
    def on_upstream_state(
        self, connector: str, state: str | None, previous: str | None = None
    ) -> None: ...
    def on_tls_handshake_failure(self, connector: str, reason: str) -> None: ...
    def on_reconnect(self, connector: str) -> None: ...
    def on_link_open(self, route: str, direction: str) -> None: ...
    def on_link_close(self, route: str, direction: str) -> None: ...
    def on_message(
        self, route: str, direction: str, nbytes: int, device: str | None = None, count: int = 1
    ) -> None: ...
    def on_disposition(self, outcome: str, direction: str, count: int = 1) -> None: ...
    def on_attach_refused(self, reason: str) -> None: ...
    def on_protocol_error(
        self, kind: str, side: str = "device", protocol: str = "amqp"
    ) -> None: ...
    def observe_relay_latency(
        self, seconds: float, protocol: str = "amqp", count: int = 1
    ) -> None: ...
    def relay_latency(self, protocol: str = "amqp") -> Any:
        return _NULL_CHILD

    def on_mqtt_packet(self, packet_type: str, direction: str, count: int = 1) -> None: ...
    def mqtt_counters(self, packet_type: str, direction: str, route: str) -> tuple[Any, ...]:
        return (_NULL_CHILD,)

    def on_mqtt_closed(self, reason: str) -> None: ...
    def on_mqtt_store_dropped(self, reason: str) -> None: ...
    def mqtt_observer(self, listener: str = "", route: str = "mqtt",
                      registry: Any = None) -> MqttRelayMetrics:  # fmt: skip
        return MqttRelayMetrics(self, listener, route, registry)

    def set_token_expiry(self, seconds: float | None, device: str | None = None) -> None: ...
    def on_token_renewal_failure(self, device: str | None = None) -> None: ...
    def on_reload(self, ok: bool) -> None: ...
    def set_draining(self, draining: bool) -> None: ...
    def forget_device(self, device: str) -> None: ...


class HotValue:
    """A metric child's value for the relays' hot paths: prometheus_client's
    `MutexValue` without the lock, which was a third of each increment.

    Only the trio thread updates the children given one (the relays run
    there); a scrape renders in a worker thread and only reads the float,
    which the GIL makes atomic.
    """

    __slots__ = ("value", "_exemplar")

    def __init__(self, value: float = 0.0) -> None:
        self.value = value
        self._exemplar: Any = None

    def inc(self, amount: float) -> None:
        self.value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self.value = value

    def set_exemplar(self, exemplar: Any) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self.value

    def get_exemplar(self) -> Any:
        return self._exemplar


def hot_value(child: Any) -> Any:
    """Something with `inc(amount)` that counts into `child` (a Counter child)
    cheaply: its value, made a `HotValue`. A child that does not hold a plain
    `MutexValue` (another prometheus_client value class, a test double) is
    returned as it is."""
    value = getattr(child, "_value", None)
    if type(value) is HotValue:
        return value
    if type(value) is not MutexValue:
        return child
    child._value = hot = _hot(value)
    return hot


def _hot(value: Any) -> Any:
    """`value` (a `MutexValue` or already a `HotValue`) as a `HotValue`."""
    if type(value) is not MutexValue:
        return value
    hot = HotValue(value.get())
    hot._exemplar = value.get_exemplar()
    return hot


def _hot_values(values: Any) -> list[Any] | None:
    """A histogram child's bucket values made `HotValue`s (None if they are not
    prometheus_client's `MutexValue`s)."""
    if not isinstance(values, list) or any(type(v) not in (MutexValue, HotValue) for v in values):
        return None
    values[:] = [_hot(v) for v in values]
    return values


class FastHistogram:
    """A histogram child observed on a hot path: ``observe(amount, count)``.

    prometheus_client's ``observe`` checks the metric each call and scans the
    buckets in Python; a relay observes once per batch on every connection. This
    finds the bucket by bisection and updates the child's own bucket and sum
    values (made `HotValue`s), and `count` observations of one amount are one
    update. A child whose internals are not prometheus_client's is observed one
    call at a time.
    """

    __slots__ = ("_child", "_bounds", "_buckets", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        bounds = getattr(child, "_upper_bounds", None)
        buckets = _hot_values(getattr(child, "_buckets", None))
        total = getattr(child, "_sum", None)
        if type(total) is MutexValue:
            total = child._sum = _hot(total)
        if (
            bounds is None
            or buckets is None
            or type(total) is not HotValue
            or len(bounds) != len(buckets)
        ):
            self._bounds: list[float] | None = None
        else:
            self._bounds = list(bounds)
        self._buckets = buckets
        self._sum = total

    def observe(self, amount: float, count: int = 1) -> None:
        bounds = self._bounds
        if bounds is None:
            for _ in range(count):
                self._child.observe(amount)
            return
        self._sum.inc(amount * count)
        # Bucket i holds amounts <= bounds[i]; the last bound is +Inf.
        self._buckets[bisect_left(bounds, amount)].inc(count)


class _NullChild:
    def observe(self, value: float) -> None:
        pass

    def inc(self, amount: float = 1) -> None:
        pass


_NULL_CHILD = _NullChild()


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("iot-gateway")
    except Exception:
        return "unknown"
