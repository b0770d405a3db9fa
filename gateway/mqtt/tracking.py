"""What a relay must remember to move a device's session to a new upstream connection.

When the gateway replaces the upstream connection under a device (a renewed
SAS token needs a new CONNECT, and MQTT has no way to re-authenticate in
place before 5.0), the new connection must look to the device as if nothing
happened. This object watches the packets of one relayed connection and
keeps what is needed for that:

- the device's QoS 1 PUBLISHes the hub has not acknowledged, to retransmit
  with DUP set (bounded: `full` tells the relay to stop reading the device);
- its SUBSCRIBE and UNSUBSCRIBE packets the hub has not answered, resent as
  they are, so the device gets its SUBACK/UNSUBACK;
- its active subscriptions (those the hub acknowledged), re-subscribed under
  gateway-chosen packet ids whose SUBACKs the relay swallows;
- PINGREQs not yet answered, asked again on the new connection;
- MQTT 5: the device's Topic Aliases, which hold per network connection
  (5.0 section 3.3.2.3.4): a PUBLISH that uses an alias the current upstream
  connection never saw is sent with the topic name written in, and
  retransmissions always carry it;
- for every hub-to-device QoS 1/2 PUBLISH, which upstream connection (its
  generation) delivered it: the device's PUBACK for a message from a retired
  connection is dropped, since that connection is gone and the hub
  redelivers the message on the new one.

Device acknowledgements are matched to deliveries in order per packet id
(MQTT acknowledges QoS 1 deliveries in the order received, 3.1.1 section
4.6), so a packet id reused by the new connection is told apart from the
same id still owed to the old one.

Sans-I/O: packets in, decisions out; the relay does the sending.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from . import encode
from .constants import MQTT_5
from .packets import (
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)
from .reader import PacketReader

# Bounds on what is kept for retransmission: IoT Hub devices keep few
# messages in flight (the SDKs default to 10-20), so this only bites a
# device that floods; the relay then stops reading it until the hub acks.
DEFAULT_MAX_UNACKED = 1000
DEFAULT_MAX_UNACKED_BYTES = 8 * 1024 * 1024
# Deliveries remembered per packet id awaiting the device's PUBACK; more than
# a handful means the device stopped acknowledging, and the oldest are dropped.
MAX_OWNERS_PER_ID = 8


@dataclass
class Replay:
    """What to send on a new upstream connection, in this order, after its CONNACK."""

    resubscribe: bytes | None  # the active subscriptions, under a gateway packet id
    resend: list[bytes] = field(default_factory=list)  # device packets still owed an answer
    pings: int = 0  # PINGREQs to ask again

    def packets(self) -> list[bytes]:
        out = [self.resubscribe] if self.resubscribe is not None else []
        out += self.resend
        out += [encode.pingreq()] * self.pings
        return out


class SessionTracker:
    """Follows one relayed MQTT session in both directions (see the module docstring)."""

    def __init__(
        self,
        protocol_level: int,
        *,
        max_unacked: int = DEFAULT_MAX_UNACKED,
        max_unacked_bytes: int = DEFAULT_MAX_UNACKED_BYTES,
    ) -> None:
        self.protocol_level = protocol_level
        self.max_unacked = max_unacked
        self.max_unacked_bytes = max_unacked_bytes
        self.generation = 0  # which upstream connection is current
        # Device packets owed an answer by the hub, in the order sent: (type, id) -> bytes.
        self._outstanding: dict[tuple[int, int], bytes] = {}
        self._subscribes: dict[int, list[tuple[str, int]]] = {}
        self._unsubscribes: dict[int, list[str]] = {}
        self._unacked_bytes = 0
        self._unacked = 0
        self.subscriptions: dict[str, int] = {}  # filter -> the device's options byte
        self._pings = 0
        self._owners: dict[int, deque[int]] = {}  # packet id -> generations, oldest first
        self._gateway_ids: Counter[int] = Counter()  # SUBSCRIBEs the gateway sent itself
        self.dropped_acks = 0
        self._aliases: dict[int, str] = {}  # MQTT 5 device Topic Alias -> topic name
        self._aliases_upstream: set[int] = set()  # aliases the current connection learnt

    # -- device -> hub -------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """Too much unacknowledged: the relay should wait for PUBACKs before reading on."""
        return self._unacked >= self.max_unacked or self._unacked_bytes >= self.max_unacked_bytes

    @property
    def unacked(self) -> int:
        return self._unacked

    def client_packet(self, packet: Packet) -> bytes | None:
        """A packet from the device: the bytes to forward (normally `packet.raw`), or None
        if it must not be forwarded (a PUBACK owed to a retired connection)."""
        raw = packet.raw
        if isinstance(packet, Publish):
            complete = raw
            if self.protocol_level == MQTT_5 and packet.properties_span is not None:
                raw, complete = self._resolve_alias(packet)
            if packet.qos == 1 and packet.packet_id is not None:
                key = (packet.type, packet.packet_id)
                previous = self._outstanding.pop(key, None)
                if previous is not None:
                    self._unacked -= 1
                    self._unacked_bytes -= len(previous)
                stored = bytes(complete)
                self._outstanding[key] = stored
                self._unacked += 1
                self._unacked_bytes += len(stored)
        elif isinstance(packet, Puback):
            owners = self._owners.get(packet.packet_id)
            if owners:
                owner = owners.popleft()
                if not owners:
                    del self._owners[packet.packet_id]
                if owner != self.generation:
                    self.dropped_acks += 1
                    return None
        elif isinstance(packet, Subscribe):
            self._outstanding[(packet.type, packet.packet_id)] = bytes(packet.raw)
            self._subscribes[packet.packet_id] = list(packet.subscriptions)
        elif isinstance(packet, Unsubscribe):
            self._outstanding[(packet.type, packet.packet_id)] = bytes(packet.raw)
            self._unsubscribes[packet.packet_id] = list(packet.topic_filters)
        elif isinstance(packet, Pingreq):
            self._pings += 1
        return raw

    def _resolve_alias(self, packet: Publish) -> tuple[bytes, bytes]:
        """(bytes to send now, bytes to keep for a retransmission) of an MQTT 5 PUBLISH."""
        raw = bytes(packet.raw)
        alias = packet.topic_alias
        if alias is None:
            return raw, raw
        if packet.topic:
            self._aliases[alias] = packet.topic
            self._aliases_upstream.add(alias)
            return raw, raw
        topic = self._aliases.get(alias)
        if topic is None:
            return raw, raw  # unknown alias: the server's protocol error to report
        complete = encode.publish_with_topic(packet, topic)
        if alias in self._aliases_upstream:
            return raw, complete
        self._aliases_upstream.add(alias)
        return complete, complete

    # -- hub -> device -------------------------------------------------------------------

    def server_packet(self, packet: Packet, generation: int) -> bool:
        """A packet from the upstream connection of `generation`; False to swallow it
        (the answer to the gateway's own re-SUBSCRIBE)."""
        if isinstance(packet, Publish):
            if packet.qos and packet.packet_id is not None:
                owners = self._owners.setdefault(packet.packet_id, deque())
                owners.append(generation)
                if len(owners) > MAX_OWNERS_PER_ID:
                    owners.popleft()
        elif isinstance(packet, Puback):
            raw = self._outstanding.pop((Publish.type, packet.packet_id), None)
            if raw is not None:
                self._unacked -= 1
                self._unacked_bytes -= len(raw)
        elif isinstance(packet, Suback):
            if self._gateway_ids[packet.packet_id]:
                self._gateway_ids[packet.packet_id] -= 1
                if not self._gateway_ids[packet.packet_id]:
                    del self._gateway_ids[packet.packet_id]
                return False
            self._outstanding.pop((Subscribe.type, packet.packet_id), None)
            requested = self._subscribes.pop(packet.packet_id, [])
            for (topic_filter, options), code in zip(requested, packet.return_codes, strict=False):
                if code < 0x80:
                    self.subscriptions[topic_filter] = options
        elif isinstance(packet, Unsuback):
            self._outstanding.pop((Unsubscribe.type, packet.packet_id), None)
            filters = self._unsubscribes.pop(packet.packet_id, [])
            codes = packet.reason_codes or [0] * len(filters)
            for topic_filter, code in zip(filters, codes, strict=False):
                if code < 0x80:
                    self.subscriptions.pop(topic_filter, None)
        elif isinstance(packet, Pingresp):
            self._pings = max(0, self._pings - 1)
        return True

    # -- moving to a new upstream connection ------------------------------------------------

    def next_generation(self) -> Replay:
        """The new upstream connection takes over; returns what to send on it first.

        Call once the old connection has delivered everything it will (its
        acknowledgements were seen), so nothing is retransmitted needlessly.
        """
        self.generation += 1
        resubscribe = None
        if self.subscriptions:
            packet_id = self._free_packet_id()
            self._gateway_ids[packet_id] += 1
            resubscribe = encode.subscribe(
                packet_id, list(self.subscriptions.items()), protocol_level=self.protocol_level
            )
        resend = [
            encode.with_dup(raw) if ptype == Publish.type else raw
            for (ptype, _), raw in self._outstanding.items()
        ]
        pings, self._pings = self._pings, 0
        # Retransmitted PUBLISHes carry their topic names, so the new connection
        # learns every alias they use.
        self._aliases_upstream = set()
        for (ptype, _), raw in self._outstanding.items():
            if ptype == Publish.type and self.protocol_level == MQTT_5:
                self._aliases_upstream.update(self._aliases_in(raw))
        return Replay(resubscribe, resend, pings)

    def _aliases_in(self, raw: bytes) -> list[int]:
        alias = parse_publish_alias(raw, self.protocol_level)
        return [] if alias is None else [alias]

    def _free_packet_id(self) -> int:
        # Counting down from the top: devices count up from 1, so collisions stay rare
        # (and are harmless: the hub answers in order, the gateway's SUBACK comes first).
        in_use = {packet_id for _, packet_id in self._outstanding} | set(self._gateway_ids)
        for packet_id in range(0xFFFF, 0, -1):
            if packet_id not in in_use:
                return packet_id
        raise RuntimeError("no free packet id")  # 65535 packets outstanding: cannot happen


def parse_publish_alias(raw: bytes, protocol_level: int) -> int | None:
    """The Topic Alias of a stored PUBLISH (parsed again: only a retransmission needs it)."""
    reader = PacketReader(max(len(raw), 2), protocol_level=protocol_level)
    reader.feed(raw)
    packet = reader.next_packet()
    return packet.topic_alias if isinstance(packet, Publish) else None
