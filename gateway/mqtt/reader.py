"""Framing: bytes in, packet views out.

    reader = PacketReader(max_packet_size=263168)
    reader.feed(data)
    while (packet := reader.next_packet()) is not None:
        ...

Bounds before buffering: the type and flags are checked from the first byte
and the size as soon as the remaining length is decoded, so an oversize or
garbage packet is refused before its body is read. After an error the reader
stays failed and re-raises it.
"""

from __future__ import annotations

from .constants import DEFAULT_MAX_PACKET_SIZE
from .errors import MalformedPacket, MQTTProtocolError, PacketTooLarge
from .packets import Connect, Packet, check_fixed_header, parse_packet


class PacketReader:
    """Splits a byte stream into validated MQTT packets.

    `protocol_level` is the session's level; it decides how version-dependent
    packets parse (MQTT 5 property blocks, AUTH). None means "not known yet":
    packets parse as 3.1.1, and the first CONNECT sets it. A reader for the
    server side of a relayed session is given the level of the client's CONNECT.
    """

    __slots__ = ("max_packet_size", "protocol_level", "_buf", "_error", "packets_read")

    def __init__(
        self, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE, *, protocol_level: int | None = None
    ) -> None:
        if max_packet_size < 2:
            raise ValueError("max_packet_size must be at least 2")
        self.max_packet_size = max_packet_size
        self.protocol_level = protocol_level
        self._buf = bytearray()
        self._error: MQTTProtocolError | None = None
        self.packets_read = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a packet (a partial packet at EOF)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._buf += data

    def next_packet(self) -> Packet | None:
        """The next complete packet, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_packet()
        except MQTTProtocolError as exc:
            self._error = exc
            raise
        except Exception as exc:  # a parser bug must not escape as anything else
            self._error = MalformedPacket(f"undecodable packet ({type(exc).__name__})")
            raise self._error from exc

    def _next_packet(self) -> Packet | None:
        buf = self._buf
        n = len(buf)
        if not n:
            return None
        level = self.protocol_level
        first = buf[0]
        check_fixed_header(first, level)
        # Remaining length: 1-4 bytes, 7 bits each, least significant first.
        remaining = 0
        i = 1
        while True:
            if i >= n:
                return None
            byte = buf[i]
            remaining |= (byte & 0x7F) << (7 * (i - 1))
            i += 1
            if not byte & 0x80:
                break
            if i == 5:
                raise MalformedPacket("remaining length longer than 4 bytes")
        total = i + remaining
        if total > self.max_packet_size:
            raise PacketTooLarge(total, self.max_packet_size)
        if n < total:
            return None
        raw = bytes(buf[:total])
        del buf[:total]
        packet = parse_packet(raw, i, level)
        if level is None and isinstance(packet, Connect):
            self.protocol_level = packet.protocol_level
        self.packets_read += 1
        return packet

    def packets(self) -> list[Packet]:
        """Every complete packet currently buffered."""
        out = []
        while (packet := self.next_packet()) is not None:
            out.append(packet)
        return out
