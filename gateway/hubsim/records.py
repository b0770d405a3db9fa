"""What the emulated hub saw, for tests to assert on (the hub's word, not the gateway's).

Written from the hub's I/O thread, read from any thread. ``wait_for`` blocks on
a condition variable that every new record notifies; nothing polls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

Protocol = Literal["amqp", "mqtt", "dps-amqp", "dps-mqtt"]
T = TypeVar("T")


@dataclass(frozen=True)
class D2CRecord:
    device_id: str  # identity: "dev" or "dev/mod"
    protocol: Protocol
    body: bytes  # AMQP data section(s) / amqp-value string as UTF-8; MQTT payload
    raw: bytes  # AMQP: the encoded message exactly as transferred; MQTT: the payload
    properties: dict[str, Any]  # AMQP: properties (by AMQP field name) + application properties; MQTT: the bag
    topic: str | None = None
    message_format: int | None = None
    delivery_tag: bytes | None = None
    qos: int | None = None
    retain: bool = False
    settled: bool = False  # AMQP: sent pre-settled
    app_properties: dict[str, Any] = field(default_factory=dict)
    annotations: dict[Any, Any] = field(default_factory=dict)
    connection: int = 0


@dataclass(frozen=True)
class DispositionRecord:
    """Outcome of one C2D delivery attempt."""

    device_id: str
    protocol: Protocol
    message_id: str
    lock_token: bytes | None  # AMQP delivery tag; None for MQTT
    outcome: str  # accepted | rejected | released | modified | puback | lost
    delivery_count: int


@dataclass(frozen=True)
class FeedbackRecord:
    """Service-side feedback the hub produces for a settled C2D message."""

    device_id: str
    message_id: str
    status: str  # Success | Rejected | DeliveryCountExceeded


@dataclass(frozen=True)
class CbsRecord:
    audience: str | None
    device_id: str | None
    status: int
    description: str
    connection: int
    token_type: str | None = None
    message_id: Any = None
    reply_to: str | None = None
    replied: bool = True  # False: no CBS sender link matched the reply address


@dataclass(frozen=True)
class AuthRecord:
    """A connection-level authentication decision (SASL, MQTT CONNECT)."""

    protocol: Protocol
    device_id: str | None
    mechanism: str  # ANONYMOUS | PLAIN | EXTERNAL | none | sas | x509
    ok: bool
    description: str
    connection: int
    code: int | None = None  # MQTT CONNACK return code
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class LinkRecord:
    """An AMQP attach the hub answered (accepted or refused)."""

    connection: int
    address: str | None
    role: str  # the hub's role: sender | receiver
    name: str
    device_id: str | None
    accepted: bool
    error: str | None = None
    properties: dict[Any, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ConnectionRecord:
    protocol: Protocol
    connection: int
    kind: str  # open | close
    device_id: str | None = None
    reason: str = ""
    at: float = field(default_factory=time.monotonic)


@dataclass
class ProtocolConnections:
    opened: int = 0  # TCP/TLS connections accepted so far
    open: int = 0  # currently open
    devices: dict[str, int] = field(default_factory=dict)  # authenticated connects per identity
    open_devices: dict[str, int] = field(default_factory=dict)  # identity -> open connections


class Recorder:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        # Benchmarks that send many messages may turn this off: only d2c_count grows then.
        self.keep_d2c = True
        self.clear()

    def clear(self) -> None:
        with self._cond:
            self.d2c: list[D2CRecord] = []
            self.d2c_count = 0
            self.d2c_bytes = 0
            self.dispositions: list[DispositionRecord] = []
            self.feedback: list[FeedbackRecord] = []
            self.cbs: list[CbsRecord] = []
            self.auth: list[AuthRecord] = []
            self.links: list[LinkRecord] = []
            self.connection_log: list[ConnectionRecord] = []
            self.events: list[tuple[str, Any]] = []
            self.dps: list[Any] = []  # DpsRecord (gateway.hubsim.dps)
            open_now = {
                p: dict(c.open_devices) for p, c in getattr(self, "connections", {}).items()
            }
            open_count = {p: c.open for p, c in getattr(self, "connections", {}).items()}
            # Currently-open counts describe the present, so they survive a clear.
            self.connections: dict[str, ProtocolConnections] = {
                p: ProtocolConnections(open=open_count.get(p, 0), open_devices=open_now.get(p, {}))
                for p in ("amqp", "mqtt", "dps-amqp", "dps-mqtt")
            }
            self._cond.notify_all()

    # -- writers (hub thread) ------------------------------------------------

    def add(self, kind: str, record: Any) -> None:
        with self._cond:
            if kind == "d2c":
                self.d2c_count += 1
                self.d2c_bytes += len(record.raw)
                if not self.keep_d2c:
                    self._cond.notify_all()
                    return
            target = {
                "d2c": self.d2c,
                "disposition": self.dispositions,
                "feedback": self.feedback,
                "cbs": self.cbs,
                "auth": self.auth,
                "link": self.links,
                "dps": self.dps,
            }.get(kind)
            if target is not None:
                target.append(record)
            self.events.append((kind, record))
            self._cond.notify_all()

    def connection_opened(self, protocol: Protocol, conn_id: int) -> None:
        with self._cond:
            stats = self.connections[protocol]
            stats.opened += 1
            stats.open += 1
            rec = ConnectionRecord(protocol, conn_id, "open")
            self.connection_log.append(rec)
            self.events.append(("connection", rec))
            self._cond.notify_all()

    def device_connected(self, protocol: Protocol, device_id: str) -> None:
        with self._cond:
            stats = self.connections[protocol]
            stats.devices[device_id] = stats.devices.get(device_id, 0) + 1
            stats.open_devices[device_id] = stats.open_devices.get(device_id, 0) + 1
            self._cond.notify_all()

    def connection_closed(
        self, protocol: Protocol, conn_id: int, devices: list[str], reason: str
    ) -> None:
        with self._cond:
            stats = self.connections[protocol]
            stats.open -= 1
            for dev in devices:
                left = stats.open_devices.get(dev, 0) - 1
                if left > 0:
                    stats.open_devices[dev] = left
                else:
                    stats.open_devices.pop(dev, None)
            rec = ConnectionRecord(
                protocol, conn_id, "close", devices[0] if devices else None, reason
            )
            self.connection_log.append(rec)
            self.events.append(("connection", rec))
            self._cond.notify_all()

    # -- readers (any thread) ------------------------------------------------

    def wait_for(self, predicate: Callable[[], T], timeout: float = 10.0) -> T:
        """Block until ``predicate()`` is truthy and return its value.

        Raises TimeoutError after ``timeout`` seconds. The predicate runs with the
        recorder's lock held, so it sees a consistent snapshot.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"hubsim: condition not met within {timeout:.1f} s")
                self._cond.wait(remaining)

    def notify(self) -> None:
        """Wake waiters after a state change that adds no record (twin updates)."""
        with self._cond:
            self._cond.notify_all()

    def d2c_for(self, device_id: str) -> list[D2CRecord]:
        with self._cond:
            return [r for r in self.d2c if r.device_id == device_id]
