"""What the relay reports, and to whom: the observer and tracer it is handed.

`RelayObserver` and `PacketTracer` are what the relay needs of the metrics
(`gateway.ops.metrics.MqttRelayMetrics`) and of the packet trace
(`gateway.ops.trace.FrameTracer`); `NullObserver` stands in without metrics.
`PacketReport` turns relayed packets into those calls, choosing once per
connection the cheapest hooks the observer has.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import islice
from typing import Any, Protocol

from gateway.mqtt.constants import PacketType
from gateway.mqtt.packets import Packet
from gateway.mqtt.reader import Span

__all__ = [
    "IN",
    "OUT",
    "BatchObserver",
    "NullObserver",
    "PacketReport",
    "PacketTracer",
    "RelayObserver",
    "call_hook",
]

# Directions, as the metrics name them: "in" = device -> hub, "out" = hub -> device.
IN = "in"
OUT = "out"


class RelayObserver(Protocol):
    """Counting hooks; `gateway.ops.metrics.MqttRelayMetrics` implements them.

    An observer may also define, and they are called when present:
    `on_upstream_connect_failure(connector, reason)` (reason as in
    `UpstreamUnavailable.reason`), `on_upstream_open(connector)` and
    `on_upstream_close(connector)` (each upstream connection, renewals' included),
    `on_token_renewal_failure(identity)` (each failed
    renewal attempt and an expiry), `on_token_expiry(identity, seconds)` (a
    gateway-issued token's remaining life when issued; None once the session ended),
    `on_device_identified(peer, client_id)` (the CONNECT named its client),
    `device_record(peer)` and `upstream_record(peer, name, connector, remote,
    client_id)` (the live records of the device's connection and of an upstream
    connection: objects with ``messages_in``/``messages_out``/``bytes_in``/
    ``bytes_out`` the relay adds to, or None) and `upstream_record_closed(record)`.
    """

    def on_packet(self, direction: str, packet_type: str, nbytes: int) -> None: ...
    def on_close(self, reason: str) -> None: ...


class BatchObserver(RelayObserver, Protocol):
    """An observer that counts many packets of one type at once. The relay calls
    `on_packets` when the observer has it, instead of `on_packet` per packet, and
    `on_batch` (the counts and the batch's relay latency) when it has that."""

    def on_packets(self, direction: str, packet_type: str, count: int, nbytes: int) -> None: ...
    def on_batch(
        self, direction: str, packet_type: str, count: int, nbytes: int, seconds: float
    ) -> None: ...


class PacketTracer(Protocol):
    """`gateway.ops.trace.FrameTracer` (only what the relay uses)."""

    mqtt_enabled: bool

    def mqtt(self, conn_id: Any, direction: str, packet: Any) -> None: ...


class NullObserver:
    def on_packet(self, direction: str, packet_type: str, nbytes: int) -> None:
        pass

    def on_close(self, reason: str) -> None:
        pass


def call_hook(observer: Any, name: str, *args: Any) -> None:
    """Call an optional observer hook (see RelayObserver)."""
    hook = getattr(observer, name, None)
    if hook is not None:
        hook(*args)


# Packet type names by the first byte's high nibble (0 and, before MQTT 5, 15 are refused
# by the reader before anything is counted).
_PUBLISH = int(PacketType.PUBLISH)
TYPE_NAMES = ("RESERVED", *(PacketType(t).name for t in range(1, 16)))


class PacketReport:
    """Counts and traces one connection's relayed packets."""

    __slots__ = ("obs", "tracer", "conn_id", "_counting", "_on_packets", "_on_latency", "_on_batch",
                 "dev", "up")  # fmt: skip

    def __init__(self, observer: RelayObserver, tracer: PacketTracer | None, conn_id: str) -> None:
        self.obs = observer
        self.tracer = tracer
        self.conn_id = conn_id
        self._counting = not isinstance(observer, NullObserver)
        self._on_packets: Callable[[str, str, int, int], None] | None = getattr(
            observer, "on_packets", None
        )
        # Relay latency: from the bytes of a batch being read to their relay being written.
        self._on_latency: Callable[[float], None] | None = getattr(
            observer, "on_relay_latency", None
        )
        # Counts and latency of a batch of one packet type in one call, if the observer can.
        self._on_batch: Callable[[str, str, int, int, float], None] | None = getattr(
            observer, "on_batch", None
        )
        # Live records of the device's connection and of the current upstream one (the
        # admin API's messages and bytes), if the observer keeps them: see `_tally`.
        self.dev: Any = None
        self.up: Any = None

    @property
    def tracing(self) -> bool:
        """Whether the trace wants every packet (it can be switched on at any time)."""
        return self.tracer is not None and self.tracer.mqtt_enabled

    def packet(self, direction: str, arrow: str, packet: Packet) -> None:
        """One packet relayed on its own."""
        self.obs.on_packet(direction, packet.type.name, packet.size)
        if self.dev is not None or self.up is not None:
            self._tally(direction, int(packet.type == _PUBLISH), packet.size)
        if self.tracer is not None and self.tracer.mqtt_enabled:
            self.tracer.mqtt(self.conn_id, arrow, packet)

    def batch(
        self,
        direction: str,
        arrow: str,
        spans: list[Span],
        count: int,
        views: list[Packet] | None,
        read_at: float,
    ) -> None:
        """The first `count` of `spans`, read at `read_at`, relayed in one write."""
        # A batch is nearly always of one type (PUBLISHes one way, their PUBACKs the
        # other): counted in one call, its bytes the batch's extent (spans lie back
        # to back).
        kind = _single_kind(spans, count)
        if self.dev is not None or self.up is not None:
            if kind is not None:
                publishes = count if kind == _PUBLISH else 0
            else:
                publishes = sum(1 for span in islice(spans, count) if span[0] >> 4 == _PUBLISH)
            self._tally(direction, publishes, spans[count - 1][3] - spans[0][1])
        on_batch = self._on_batch
        if on_batch is not None and kind is not None:
            on_batch(
                direction,
                TYPE_NAMES[kind],
                count,
                spans[count - 1][3] - spans[0][1],
                time.perf_counter() - read_at,
            )
        else:
            if self._on_latency is not None:
                self._on_latency(time.perf_counter() - read_at)
            if self._counting:
                on_packets = self._on_packets
                if on_packets is None:
                    on_packet = self.obs.on_packet
                    for first, start, _, end in islice(spans, count):
                        on_packet(direction, TYPE_NAMES[first >> 4], end - start)
                elif kind is None:
                    _count_mixed(on_packets, direction, spans, count)
                else:
                    on_packets(
                        direction, TYPE_NAMES[kind], count, spans[count - 1][3] - spans[0][1]
                    )
        if views and self.tracer is not None and self.tracer.mqtt_enabled:
            for packet in views:
                self.tracer.mqtt(self.conn_id, arrow, packet)


    def _tally(self, direction: str, publishes: int, nbytes: int) -> None:
        """Messages (PUBLISH packets) and bytes (every packet's) relayed in one write,
        on the device's record and the upstream connection's, each from its own side."""
        dev, up = self.dev, self.up
        if direction == IN:
            if dev is not None:
                dev.messages_in += publishes
                dev.bytes_in += nbytes
            if up is not None:
                up.messages_out += publishes
                up.bytes_out += nbytes
        else:
            if dev is not None:
                dev.messages_out += publishes
                dev.bytes_out += nbytes
            if up is not None:
                up.messages_in += publishes
                up.bytes_in += nbytes


def _single_kind(spans: list[Span], count: int) -> int | None:
    """The packet type of the first `count` spans if they share one, else None."""
    kind = spans[0][0] >> 4
    for span in islice(spans, 1, count):
        if span[0] >> 4 != kind:
            return None
    return kind


def _count_mixed(
    on_packets: Callable[[str, str, int, int], None], direction: str, spans: list[Span], count: int
) -> None:
    """`on_packets` once per packet type among the first `count` spans."""
    counts = [0] * 16
    sizes = [0] * 16
    for first, start, _, end in islice(spans, count):
        kind = first >> 4
        counts[kind] += 1
        sizes[kind] += end - start
    for kind, n in enumerate(counts):
        if n:
            on_packets(direction, TYPE_NAMES[kind], n, sizes[kind])
