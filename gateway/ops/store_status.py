"""The message store seen from operations: ``/metrics`` (``iotgw_store_*``), ``/api/store``
and the store section of ``iot-gateway status``.

Pull model: nothing here is called on the relays' hot path. A scrape or an API
call asks ``store.stats()`` (memory only, no disk) through ``StoreStatus``,
which the daemon keeps up to date: configured or not, the open store, or why
it could not be opened.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.store import Backlog, StoreStats, StoreUnavailable

# Per-device series are capped: beyond this many devices the rest are not labelled.
MAX_DEVICE_SERIES = 5000
# Always exported (0 until it happens), so alerts can match on them.
ERROR_KINDS = ("corrupt", "locked", "disk_full", "io")


class _StatsSource(Protocol):
    def stats(self) -> StoreStats: ...


class StoreStatus:
    """What operations knows about the store (one per daemon)."""

    def __init__(self, configured: bool = False, *, max_bytes: int = 0, path: str = "",
                 connectors: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.configured = configured
        self.max_bytes = max_bytes
        self.path = path
        # Every connector gets its backlog series (0 when empty), so alerts and
        # dashboards see them before the first outage.
        self.connectors = connectors
        self.store: _StatsSource | None = None
        self.error: StoreUnavailable | None = None  # why the store could not be opened

    @classmethod
    def from_config(cls, section: Any, connectors: Any = ()) -> StoreStatus:
        if section is None:
            return cls(False)
        return cls(True, max_bytes=int(section.max_bytes), path=str(section.path),
                   connectors=tuple(c.name for c in connectors))  # fmt: skip

    def stats(self) -> StoreStats | None:
        return None if self.store is None else self.store.stats()

    def snapshot(self) -> dict[str, Any]:
        """/api/store: ``state`` off | ok | unavailable, and the figures."""
        if not self.configured:
            return {"state": "off"}
        stats = self.stats()
        if stats is None:
            error = self.error
            return {
                "state": "unavailable",
                "reason": error.reason if error else "not open",
                "path": self.path,
                "max_bytes": self.max_bytes,
                "errors": {error.kind: 1} if error else {},
            }
        return stats.as_dict()


class StoreCollector(Collector):
    """``iotgw_store_*`` from ``StoreStatus`` at each scrape."""

    def __init__(self, status: StoreStatus, *, device_labels: bool = False) -> None:
        self.status = status
        self.device_labels = device_labels

    def describe(self) -> list[Any]:
        return []  # collected fresh each scrape; no fixed description needed

    def collect(self) -> Iterator[Any]:
        status = self.status
        if not status.configured:
            return
        stats = status.stats()
        up = GaugeMetricFamily(
            "iotgw_store_up", "1 while the message store is usable, 0 when unavailable"
        )
        up.add_metric([], 1.0 if stats is not None and stats.state == "ok" else 0.0)
        yield up
        max_bytes = GaugeMetricFamily("iotgw_store_max_bytes", "configured store_and_forward.max_bytes")
        max_bytes.add_metric([], float(stats.max_bytes if stats else status.max_bytes))
        yield max_bytes
        errors = CounterMetricFamily(
            "iotgw_store_errors", "message store errors by kind", labels=["kind"]
        )
        counted = dict(stats.errors) if stats is not None else {}
        if stats is None and status.error is not None:
            counted[status.error.kind] = 1
        for kind in sorted(set(ERROR_KINDS) | set(counted)):
            errors.add_metric([kind], float(counted.get(kind, 0)))
        yield errors
        if stats is None:
            return

        labels = ["connector", "device"] if self.device_labels else ["connector"]
        backlog = GaugeMetricFamily(
            "iotgw_store_backlog_messages", "stored messages waiting for the hub", labels=labels
        )
        backlog_bytes = GaugeMetricFamily(
            "iotgw_store_backlog_bytes", "bytes of stored messages waiting for the hub",
            labels=labels,
        )  # fmt: skip
        oldest = GaugeMetricFamily(
            "iotgw_store_oldest_age_seconds",
            "age of the oldest stored message waiting for the hub",
            labels=labels,
        )
        if self.device_labels:
            for n, (device, b) in enumerate(sorted(stats.devices.items())):
                if n >= MAX_DEVICE_SERIES:
                    break
                key = [stats.device_connectors.get(device, ""), device]
                backlog.add_metric(key, float(b.messages))
                backlog_bytes.add_metric(key, float(b.bytes))
                oldest.add_metric(key, b.oldest_age)
        else:
            by_connector = {name: Backlog() for name in status.connectors}
            by_connector.update(stats.connectors)
            for connector, b in sorted(by_connector.items()):
                backlog.add_metric([connector], float(b.messages))
                backlog_bytes.add_metric([connector], float(b.bytes))
                oldest.add_metric([connector], b.oldest_age)
        yield backlog
        yield backlog_bytes
        yield oldest

        connectors = sorted(set(stats.connectors) | set(status.connectors))
        for name, help_text, values in (
            ("iotgw_store_appended", "messages stored (each acknowledged to its device)",
             stats.appended),
            ("iotgw_store_replayed", "stored messages the hub accepted", stats.replayed),
            ("iotgw_store_expired", "stored messages deleted by max_age", stats.expired),
            ("iotgw_store_rejected", "stored messages the hub rejected (deleted)", stats.rejected),
            ("iotgw_store_duplicates_suspected",
             "stored messages that may have reached the hub twice", stats.duplicates_suspected),
        ):  # fmt: skip
            family = CounterMetricFamily(name, help_text, labels=["connector"])
            for connector in sorted(set(connectors) | set(values)):
                family.add_metric([connector], float(values.get(connector, 0)))
            yield family
        refused = CounterMetricFamily(
            "iotgw_store_refused",
            "appends refused (device got back-pressure) by reason",
            labels=["reason"],
        )
        for reason in ("full", "device_share", "unavailable"):
            refused.add_metric([reason], float(stats.refused.get(reason, 0)))
        yield refused
        commits = CounterMetricFamily(
            "iotgw_store_commits", "store transactions committed (one fsync each)"
        )
        commits.add_metric([], float(stats.commits))
        yield commits
        file_bytes = GaugeMetricFamily(
            "iotgw_store_file_bytes", "the store's database and WAL on disk"
        )
        file_bytes.add_metric([], float(stats.file_bytes))
        yield file_bytes
        rate = GaugeMetricFamily(
            "iotgw_store_replay_rate", "configured replay rate, messages per second per connector"
        )
        rate.add_metric([], float(stats.replay_rate))
        yield rate
