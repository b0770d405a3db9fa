"""Framing: bytes in, packets out, as views or as spans.

    reader = PacketReader(max_packet_size=263168)
    reader.feed(data)
    while (packet := reader.next_packet()) is not None:
        ...

A relay that forwards most packets untouched takes them in batches instead,
without building a view per packet:

    buf, spans = reader.next_spans()   # every complete packet buffered
    for first_byte, start, body, end in spans:
        ...                            # buf[start:end] is one packet

Bounds before buffering: the type and flags are checked from the first byte
and the size as soon as the remaining length is decoded, so an oversize or
garbage packet is refused before its body is read. The first packet (the
CONNECT, sent before the device is authenticated) may be given a lower limit,
`max_connect_size`; `needed` says how many more bytes complete the packet under
way, so a caller can read no more than that. After an error the reader
stays failed and re-raises it. `next_spans` only frames (fixed header and
size): the bodies are the caller's to check, e.g. with `parse_packet` or
`gateway.mqtt.triage`.
"""

from __future__ import annotations

from .constants import DEFAULT_MAX_PACKET_SIZE
from .errors import ConnectTooLarge, MalformedPacket, MQTTProtocolError, PacketTooLarge
from .packets import Connect, Packet, check_fixed_header, parse_packet

# (first byte, start, body start, end): one packet's place in the buffer.
Span = tuple[int, int, int, int]
Buffer = bytes | bytearray


def _valid_first_bytes(level: int | None) -> bytes:
    """A 256-entry table: 1 where `check_fixed_header` accepts the byte at `level`."""
    table = bytearray(256)
    for first in range(256):
        try:
            check_fixed_header(first, level)
        except MQTTProtocolError:
            continue
        table[first] = 1
    return bytes(table)


_VALID_FIRST_BYTES: dict[int | None, bytes] = {}


def valid_first_bytes(level: int | None) -> bytes:
    table = _VALID_FIRST_BYTES.get(level)
    if table is None:
        table = _VALID_FIRST_BYTES[level] = _valid_first_bytes(level)
    return table


class PacketReader:
    """Splits a byte stream into validated MQTT packets.

    `protocol_level` is the session's level; it decides how version-dependent
    packets parse (MQTT 5 property blocks, AUTH). None means "not known yet":
    packets parse as 3.1.1, and the first CONNECT sets it. A reader for the
    server side of a relayed session is given the level of the client's CONNECT.
    """

    __slots__ = (
        "max_packet_size",
        "max_connect_size",
        "_level",
        "_valid",
        "_buf",
        "_pos",
        "_error",
        "_pending_error",
        "packets_read",
    )

    def __init__(
        self,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        *,
        protocol_level: int | None = None,
        max_connect_size: int | None = None,
    ) -> None:
        if max_packet_size < 2:
            raise ValueError("max_packet_size must be at least 2")
        self.max_packet_size = max_packet_size
        # The first packet's limit (None: max_packet_size): a device's CONNECT.
        self.max_connect_size = max_connect_size
        self._level = protocol_level
        self._valid = valid_first_bytes(protocol_level)
        # Unconsumed bytes are self._buf[self._pos:]. A read that arrives on an empty
        # buffer is kept as it is (no copy); a partial packet is completed in a bytearray.
        self._buf: Buffer = b""
        self._pos = 0
        self._error: MQTTProtocolError | None = None
        # Found behind complete packets by next_spans(): raised once those are taken.
        self._pending_error: MQTTProtocolError | None = None
        self.packets_read = 0

    @property
    def protocol_level(self) -> int | None:
        return self._level

    @protocol_level.setter
    def protocol_level(self, level: int | None) -> None:
        self._level = level
        self._valid = valid_first_bytes(level)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a packet (a partial packet at EOF)."""
        return len(self._buf) - self._pos

    @property
    def needed(self) -> int | None:
        """Bytes still missing from the packet under way: None while its fixed header
        is incomplete, 0 when a whole packet is buffered (or nothing is)."""
        buf, pos = self._buf, self._pos
        n = len(buf)
        if pos >= n:
            return 0
        remaining = 0
        shift = 0
        i = pos + 1
        while True:
            if i >= n or shift == 28:
                return None
            byte = buf[i]
            i += 1
            remaining |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        return max(0, i + remaining - n)

    def head(self, n: int) -> bytes:
        """The first `n` bytes received and not yet returned as a packet (or fewer)."""
        return bytes(self._buf[self._pos : self._pos + n])

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        buf = self._buf
        if self._pos >= len(buf):
            self._buf = data if isinstance(data, bytes) else bytes(data)
            self._pos = 0
        elif self._pos or not isinstance(buf, bytearray):
            tail = bytearray(memoryview(buf)[self._pos :])
            tail += data
            self._buf = tail
            self._pos = 0
        else:
            buf += data

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
        buf, spans = self._frame(1)
        if not spans:
            return None
        _, start, body, end = spans[0]
        raw = bytes(buf[start:end])
        level = self.protocol_level
        packet = parse_packet(raw, body - start, level)
        if level is None and isinstance(packet, Connect):
            self.protocol_level = packet.protocol_level
        return packet

    def next_spans(self) -> tuple[Buffer, list[Span]]:
        """Every complete packet buffered, framed but not parsed: `(buf, spans)`.

        Each span is `(first byte, start, body start, end)` in `buf`. The packets
        are consumed. Fixed-header flags and the size limit are checked; the bodies
        are not. A framing error behind complete packets is raised by the next call,
        once the caller has dealt with the packets before it. Empty spans: more
        bytes are needed.
        """
        if self._error is not None:
            raise self._error
        return self._frame(-1)

    def _frame(self, count: int) -> tuple[Buffer, list[Span]]:
        """Frame up to `count` complete packets (-1: all)."""
        buf = self._buf
        pos = self._pos
        n = len(buf)
        spans: list[Span] = []
        if self._pending_error is not None:
            self._error, self._pending_error = self._pending_error, None
            raise self._error
        if pos >= n:
            return buf, spans
        valid = self._valid
        limit = self.max_packet_size
        connect_limit = self.max_connect_size if not self.packets_read else None
        error: MQTTProtocolError | None = None
        while pos < n and count:
            first = buf[pos]
            if not valid[first]:
                try:
                    check_fixed_header(first, self._level)
                except MQTTProtocolError as exc:
                    error = exc
                break
            # Remaining length: 1-4 bytes, 7 bits each, least significant first.
            i = pos + 1
            if i >= n:
                break
            byte = buf[i]
            i += 1
            if byte < 0x80:
                remaining = byte
            else:
                remaining = byte & 0x7F
                shift = 7
                while True:
                    if i >= n:
                        remaining = -1
                        break
                    byte = buf[i]
                    i += 1
                    remaining |= (byte & 0x7F) << shift
                    if not byte & 0x80:
                        break
                    shift += 7
                    if shift == 28:
                        error = MalformedPacket("remaining length longer than 4 bytes")
                        break
                if remaining < 0 or error is not None:
                    break
            end = i + remaining
            if end - pos > limit:
                error = PacketTooLarge(end - pos, limit)
                break
            if connect_limit is not None:
                # Only the first packet; then the usual limit.
                if end - pos > connect_limit:
                    error = ConnectTooLarge(end - pos, connect_limit)
                    break
                connect_limit = None
            if end > n:
                break
            spans.append((first, pos, i, end))
            pos = end
            count -= 1
        self._pos = pos
        if pos >= n:
            self._buf = b""
            self._pos = 0
        self.packets_read += len(spans)
        if error is not None:
            if not spans:
                self._error = error
                raise error
            self._pending_error = error
        return buf, spans

    def packets(self) -> list[Packet]:
        """Every complete packet currently buffered."""
        out = []
        while (packet := self.next_packet()) is not None:
            out.append(packet)
        return out


def parse_span(buf: Buffer, span: Span, level: int | None) -> Packet:
    """The view of one framed packet (a copy of its bytes); raises only MQTTProtocolError."""
    _, start, body, end = span
    try:
        return parse_packet(bytes(buf[start:end]), body - start, level)
    except MQTTProtocolError:
        raise
    except Exception as exc:  # a parser bug must not escape as anything else
        raise MalformedPacket(f"undecodable packet ({type(exc).__name__})") from exc
