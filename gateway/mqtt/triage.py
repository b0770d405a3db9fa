"""Which framed packets a relay may forward without building a view.

Almost everything an established MQTT session carries is PUBLISH, its
acknowledgements and pings. For those, a relay needs no more than a few
bytes checked: the fixed-header flags (already done by the reader), the
shape of the variable header, and that a PUBLISH topic is one already seen,
validated and allowed on this connection. `Triage.fast_prefix` walks the
spans `PacketReader.next_spans()` returned and stops at the first packet
that needs the full parse (`parse_packet`): a new topic, a SUBSCRIBE, a
DISCONNECT, anything unusual, so every rule is still applied by the parser
and the relay's state, only once per topic rather than once per packet.

MQTT 5 PUBLISHes always take the full parse (properties, topic aliases).
"""

from __future__ import annotations

from itertools import islice

from .constants import MQTT_5, PacketType
from .packets import Publish
from .reader import Buffer, Span

# What a first byte allows without a view.
_SLOW = 0  # parse it
_PUBLISH = 1  # topic known, packet id non-zero for QoS > 0
_ACK = 2  # PUBACK/PUBREC/PUBREL/PUBCOMP: exactly a non-zero packet id
_EMPTY = 3  # PINGREQ/PINGRESP: no body

CLIENT = "client"
SERVER = "server"

# Known topics kept per connection; devices use a handful.
MAX_KNOWN_TOPICS = 256


def _kinds(side: str, level: int | None) -> bytes:
    table = bytearray(256)
    if level != MQTT_5:
        for flags in range(16):
            qos = (flags >> 1) & 0x03
            if qos == 3 or (qos == 0 and flags & 0x08):
                continue
            table[(PacketType.PUBLISH << 4) | flags] = _PUBLISH
    table[PacketType.PUBACK << 4] = _ACK
    table[PacketType.PUBREC << 4] = _ACK
    table[(PacketType.PUBREL << 4) | 0x02] = _ACK
    table[PacketType.PUBCOMP << 4] = _ACK
    ping = PacketType.PINGREQ if side == CLIENT else PacketType.PINGRESP
    table[ping << 4] = _EMPTY
    return bytes(table)


class Triage:
    """Fast-path checks for one direction of one relayed connection.

    `side` is who sends the packets: CLIENT (the device) or SERVER (the hub).
    The caller uses it only once the session is established (CONNECT relayed;
    for SERVER, the CONNACK seen), where every packet type it passes is legal.
    """

    __slots__ = ("_kinds", "_topics", "_last_topic")

    def __init__(self, side: str, protocol_level: int | None) -> None:
        self._kinds = _kinds(side, protocol_level)
        self._topics: set[bytes] = set()  # encoded topic names checked on this connection
        # The topic of the last PUBLISH let through: compared in place, without a copy.
        self._last_topic: bytes | None = None

    def fast_prefix(self, buf: Buffer, spans: list[Span], start: int = 0) -> int:
        """The index of the first span from `start` that needs a view (len(spans): none)."""
        kinds = self._kinds
        last = self._last_topic
        index = start
        for first, _, body, end in islice(spans, start, None) if start else spans:
            kind = kinds[first]
            if kind == _PUBLISH:
                if end - body < 2:
                    return index
                length = (buf[body] << 8) | buf[body + 1]
                topic_end = body + 2 + length
                if first & 0x06:  # QoS 1 or 2: a non-zero packet id follows the topic
                    if topic_end + 2 > end or not (buf[topic_end] or buf[topic_end + 1]):
                        return index
                elif topic_end > end:
                    return index
                if last is None or length != len(last) or not buf.startswith(last, body + 2):
                    topic = bytes(buf[body + 2 : topic_end])
                    if topic not in self._topics:
                        return index
                    self._last_topic = last = topic
            elif kind == _ACK:
                if end - body != 2 or not (buf[body] or buf[body + 1]):
                    return index
            elif kind == _EMPTY:
                if end != body:
                    return index
            else:
                return index
            index += 1
        return index

    def learn_topic(self, packet: Publish) -> None:
        """`packet` passed the full parse and the relay's checks: its topic may go fast."""
        raw = packet.raw
        body = packet.body_offset
        length = (raw[body] << 8) | raw[body + 1]
        if len(self._topics) >= MAX_KNOWN_TOPICS:
            self._topics.clear()
            self._last_topic = None
        self._topics.add(bytes(raw[body + 2 : body + 2 + length]))
