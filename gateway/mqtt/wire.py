"""Primitive MQTT field decoding over a bounded region of a packet's bytes.

Every read checks its bounds and raises `MalformedPacket`, so packet parsers
never see IndexError, struct.error or UnicodeDecodeError.
"""

from __future__ import annotations

from .errors import MalformedPacket


def decode_utf8(data: bytes | memoryview, what: str) -> str:
    """Decode an MQTT UTF-8 string: well-formed UTF-8 and no U+0000 (3.1.1 section 1.5.3)."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what} is not valid UTF-8") from None
    if "\x00" in text:
        raise MalformedPacket(f"{what} contains U+0000")
    return text


class Cursor:
    """Reads fields from `data[pos:end]`, left to right."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes | memoryview, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def _need(self, n: int, what: str) -> int:
        start = self.pos
        if self.end - start < n:
            raise MalformedPacket(f"packet too short for {what}")
        self.pos = start + n
        return start

    def uint8(self, what: str) -> int:
        return self.data[self._need(1, what)]

    def uint16(self, what: str) -> int:
        i = self._need(2, what)
        return (self.data[i] << 8) | self.data[i + 1]

    def uint32(self, what: str) -> int:
        i = self._need(4, what)
        return int.from_bytes(self.data[i : i + 4], "big")

    def varint(self, what: str) -> int:
        """Variable byte integer, at most 4 bytes; non-minimal encodings are accepted."""
        value = 0
        for shift in (0, 7, 14, 21):
            byte = self.data[self._need(1, what)]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise MalformedPacket(f"{what}: variable byte integer longer than 4 bytes")

    def binary(self, what: str) -> bytes:
        n = self.uint16(what)
        i = self._need(n, what)
        return bytes(self.data[i : i + n])

    def binary_span(self, what: str) -> tuple[int, int]:
        """A length-prefixed field's (start, end) offsets, without copying it."""
        n = self.uint16(what)
        i = self._need(n, what)
        return i, i + n

    def utf8(self, what: str) -> str:
        n = self.uint16(what)
        i = self._need(n, what)
        return decode_utf8(self.data[i : i + n], what)

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)

    def expect_end(self, what: str) -> None:
        if self.pos != self.end:
            raise MalformedPacket(f"{self.end - self.pos} unexpected bytes at the end of {what}")
