"""Values the store hands out: stored messages and statistics (plain, immutable data)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One stored device-to-cloud message, as the device sent it."""

    seq: int  # store-wide increasing; order within a device = seq order
    device: str  # "dev1" or "dev1/mod1"
    connector: str  # the connector the device's route uses
    protocol: str  # "mqtt" | "amqp"
    address: str  # MQTT topic name, or AMQP target address as the device attached it
    meta: bytes = field(repr=False)  # protocol-specific, opaque to the store
    payload: bytes = field(repr=False)  # the message bytes, unchanged
    stored_at: float  # unix time when stored

    @property
    def size(self) -> int:
        """What the message counts against max_bytes."""
        return message_size(self.device, self.address, self.meta, self.payload)


# Bytes counted per message on top of its fields: its row's share of the table and
# index (sequence number, time, names), so many tiny messages cannot exceed the
# limit by far on disk.
ROW_OVERHEAD = 64


def message_size(device: str, address: str, meta: bytes, payload: bytes) -> int:
    return ROW_OVERHEAD + len(device) + len(address) + len(meta) + len(payload)


@dataclass(frozen=True, slots=True)
class Backlog:
    """Messages waiting (for one connector or one device)."""

    messages: int = 0
    bytes: int = 0
    oldest_age: float = 0.0  # seconds since the oldest waiting message was stored; 0 if none


@dataclass(frozen=True, slots=True)
class StoreStats:
    """A snapshot for operations (metrics, /api/store, status). Counters are totals
    since the process started; backlogs are current."""

    state: str  # "ok" | "unavailable"
    reason: str | None  # why unavailable
    path: str
    max_bytes: int
    device_max_bytes: int
    messages: int
    bytes: int
    connectors: dict[str, Backlog]
    devices: dict[str, Backlog]
    device_connectors: dict[str, str]  # device -> connector of its newest waiting messages
    appended: dict[str, int]  # by connector
    replayed: dict[str, int]  # by connector
    expired: dict[str, int]  # by connector
    rejected: dict[str, int]  # by connector (the hub refused a replayed message)
    refused: dict[str, int]  # by reason: full, device_share, unavailable
    errors: dict[str, int]  # by kind: corrupt, locked, disk_full, io, closed
    duplicates_suspected: dict[str, int]  # by connector
    commits: int  # transactions with an fsync (group commits, deletes, expiries)
    replay_rate: float  # configured messages per second per connector
    file_bytes: int  # database + WAL on disk

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly (for /api/store)."""
        return {
            "state": self.state,
            "reason": self.reason,
            "path": self.path,
            "max_bytes": self.max_bytes,
            "device_max_bytes": self.device_max_bytes,
            "messages": self.messages,
            "bytes": self.bytes,
            "file_bytes": self.file_bytes,
            "replay_rate": self.replay_rate,
            "commits": self.commits,
            "connectors": {
                name: _backlog_dict(b)
                | {
                    "appended": self.appended.get(name, 0),
                    "replayed": self.replayed.get(name, 0),
                    "expired": self.expired.get(name, 0),
                    "rejected": self.rejected.get(name, 0),
                    "duplicates_suspected": self.duplicates_suspected.get(name, 0),
                }
                for name, b in sorted(self.connectors.items())
            },
            "devices": {
                name: _backlog_dict(b) | {"connector": self.device_connectors.get(name)}
                for name, b in sorted(self.devices.items())
            },
            "refused": dict(sorted(self.refused.items())),
            "errors": dict(sorted(self.errors.items())),
        }


def _backlog_dict(backlog: Backlog) -> dict[str, object]:
    return {
        "messages": backlog.messages,
        "bytes": backlog.bytes,
        "oldest_age_seconds": round(backlog.oldest_age, 3),
    }
