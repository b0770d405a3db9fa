"""Per-device aggregates and counters, kept in memory.

Only aggregates: a count, a byte total and the oldest time per device (and per
protocol/connector lane of it), never the messages, so memory does not grow
with the backlog. Rebuilt from the database at open; afterwards changed only
from the event loop thread.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from gateway.store.errors import StoreFull
from gateway.store.types import Backlog, StoreStats

log = logging.getLogger("gateway.store")

Lane = tuple[str, str]  # (protocol, connector)


@dataclass(slots=True)
class DeviceBacklog:
    messages: int = 0
    bytes: int = 0
    oldest: float | None = None  # stored_at of the device's first waiting message
    lanes: dict[Lane, list[int]] = field(default_factory=dict)  # lane -> [messages, bytes]
    last_lane: Lane | None = None


class Ledger:
    """What is stored, by device, and what was reserved by appends not yet committed."""

    def __init__(self, max_bytes: int, device_max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.device_max_bytes = device_max_bytes
        self.devices: dict[str, DeviceBacklog] = {}
        self.messages = 0
        self.bytes = 0
        self.reserved = 0
        self.reserved_by_device: Counter[str] = Counter()
        self.appended: Counter[str] = Counter()
        self.replayed: Counter[str] = Counter()
        self.expired: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.duplicates: Counter[str] = Counter()
        self.known_connectors: set[str] = set()

    # -- admission ------------------------------------------------------------------------

    def admit(self, device: str, size: int) -> None:
        """Reserve room for a message or raise StoreFull (counted)."""
        if self.bytes + self.reserved + size > self.max_bytes:
            self.refused["full"] += 1
            raise StoreFull(
                f"store full: {self.bytes + self.reserved} of {self.max_bytes} bytes used",
                scope="full",
            )
        entry = self.devices.get(device)
        used = (entry.bytes if entry else 0) + self.reserved_by_device[device]
        if used + size > self.device_max_bytes:
            self.refused["device_share"] += 1
            raise StoreFull(
                f"device {device} has used its share of the store "
                f"({used} of {self.device_max_bytes} bytes)",
                scope="device_share",
            )
        self.reserved += size
        self.reserved_by_device[device] += size

    def release(self, device: str, size: int) -> None:
        """Give back a reservation (the append failed or was abandoned)."""
        self.reserved -= size
        self.reserved_by_device[device] -= size
        if self.reserved_by_device[device] <= 0:
            del self.reserved_by_device[device]

    # -- changes ----------------------------------------------------------------------------

    def add(
        self, device: str, protocol: str, connector: str, size: int, stored_at: float
    ) -> None:
        entry = self.devices.get(device)
        if entry is None:
            entry = self.devices[device] = DeviceBacklog()
        entry.messages += 1
        entry.bytes += size
        if entry.oldest is None or stored_at < entry.oldest:
            entry.oldest = stored_at
        lane = (protocol, connector)
        counts = entry.lanes.setdefault(lane, [0, 0])
        counts[0] += 1
        counts[1] += size
        entry.last_lane = lane
        self.messages += 1
        self.bytes += size
        self.known_connectors.add(connector)

    def load(
        self,
        device: str,
        protocol: str,
        connector: str,
        messages: int,
        size: int,
        oldest: float,
    ) -> None:
        """One aggregate row read at open."""
        entry = self.devices.get(device)
        if entry is None:
            entry = self.devices[device] = DeviceBacklog()
        entry.messages += messages
        entry.bytes += size
        if entry.oldest is None or oldest < entry.oldest:
            entry.oldest = oldest
        lane = (protocol, connector)
        counts = entry.lanes.setdefault(lane, [0, 0])
        counts[0] += messages
        counts[1] += size
        entry.last_lane = lane
        self.messages += messages
        self.bytes += size
        self.known_connectors.add(connector)

    def remove(self, device: str, protocol: str, connector: str, size: int) -> None:
        entry = self.devices.get(device)
        if entry is None:
            return
        entry.messages -= 1
        entry.bytes -= size
        self.messages -= 1
        self.bytes -= size
        lane = (protocol, connector)
        counts = entry.lanes.get(lane)
        if counts is not None:
            counts[0] -= 1
            counts[1] -= size
            if counts[0] <= 0:
                del entry.lanes[lane]
        if entry.messages <= 0:
            del self.devices[device]

    def set_oldest(self, device: str, oldest: float | None) -> None:
        entry = self.devices.get(device)
        if entry is not None and oldest is not None:
            entry.oldest = oldest

    # -- questions --------------------------------------------------------------------------

    def backlog(self, device: str) -> int:
        entry = self.devices.get(device)
        return entry.messages if entry else 0

    def devices_waiting(self, protocol: str, connector: str | None = None) -> list[str]:
        """Devices with messages of this protocol (and connector), oldest backlog first."""
        found = [
            (entry.oldest or 0.0, device)
            for device, entry in self.devices.items()
            if any(p == protocol and (connector is None or c == connector) for p, c in entry.lanes)
        ]
        return [device for _, device in sorted(found)]

    def connector_backlogs(self, now: float) -> dict[str, Backlog]:
        totals: dict[str, list[float]] = {name: [0, 0, 0.0] for name in self.known_connectors}
        for entry in self.devices.values():
            age = max(0.0, now - entry.oldest) if entry.oldest is not None else 0.0
            for (_, connector), (messages, size) in entry.lanes.items():
                row = totals.setdefault(connector, [0, 0, 0.0])
                row[0] += messages
                row[1] += size
                row[2] = max(row[2], age)
        return {
            name: Backlog(int(row[0]), int(row[1]), row[2]) for name, row in totals.items()
        }

    def device_backlogs(self, now: float) -> dict[str, Backlog]:
        return {
            device: Backlog(
                entry.messages,
                entry.bytes,
                max(0.0, now - entry.oldest) if entry.oldest is not None else 0.0,
            )
            for device, entry in self.devices.items()
        }

    def device_connectors(self) -> dict[str, str]:
        return {
            device: entry.last_lane[1]
            for device, entry in self.devices.items()
            if entry.last_lane is not None
        }

    def stats(
        self,
        now: float,
        *,
        state: str,
        reason: str | None,
        path: str,
        commits: int,
        replay_rate: float,
        file_bytes: int,
    ) -> StoreStats:
        """A snapshot for operations; what differs between stores is passed in."""
        return StoreStats(
            state=state,
            reason=reason,
            path=path,
            max_bytes=self.max_bytes,
            device_max_bytes=self.device_max_bytes,
            messages=self.messages,
            bytes=self.bytes,
            connectors=self.connector_backlogs(now),
            devices=self.device_backlogs(now),
            device_connectors=self.device_connectors(),
            appended=dict(self.appended),
            replayed=dict(self.replayed),
            expired=dict(self.expired),
            rejected=dict(self.rejected),
            refused=dict(self.refused),
            errors=dict(self.errors),
            duplicates_suspected=dict(self.duplicates),
            commits=commits,
            replay_rate=replay_rate,
            file_bytes=file_bytes,
        )
