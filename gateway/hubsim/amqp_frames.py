"""AMQP framing the emulator handles in front of proton's engine.

proton's built-in SASL server cannot check PLAIN credentials (and does not offer
PLAIN at all without Cyrus), so the SASL layer is served here with proton's own
type codec (``proton.Data``). A passive reader also watches the peer's frames for
transfer fields proton's Python binding does not expose (message-format).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from proton import Data, Described

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"
FRAME_AMQP = 0
FRAME_SASL = 1

SASL_MECHANISMS = 0x40
SASL_INIT = 0x41
SASL_OUTCOME = 0x44
ATTACH = 0x12
TRANSFER = 0x14

SASL_OK = 0
SASL_AUTH = 1

MAX_SASL_FRAME = 64 * 1024


class FrameError(Exception):
    pass


def encode_frame(frame_type: int, channel: int, body: bytes) -> bytes:
    return struct.pack(">IBBH", 8 + len(body), 2, frame_type, channel) + body


def encode_performative(descriptor: int, fields: Callable[[Data], None]) -> bytes:
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(descriptor)
    data.put_list()
    data.enter()
    fields(data)
    data.exit()
    data.exit()
    return data.encode()


def decode_performative(body: bytes) -> tuple[int, list[object]]:
    data = Data()
    data.decode(body)
    data.rewind()
    data.next()
    value = data.get_object()
    if not isinstance(value, Described) or not isinstance(value.value, list):
        raise FrameError("frame body is not a described list")
    # Binary values are views into the Data object's memory: copy them while it lives.
    return int(value.descriptor), [owned(v) for v in value.value]  # type: ignore[arg-type]


def owned(value: Any) -> Any:
    """Deep copy of a decoded value with proton's memoryviews turned into bytes."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, list):
        return [owned(v) for v in value]
    if isinstance(value, dict):
        return {owned(k): owned(v) for k, v in value.items()}
    if isinstance(value, Described):
        return Described(value.descriptor, owned(value.value))
    return value


class FrameReader:
    """Splits a byte stream into (type, channel, body) frames."""

    def __init__(self, max_frame: int) -> None:
        self.buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> Iterator[tuple[int, int, bytes]]:
        self.buf += data
        while len(self.buf) >= 8:
            size, doff, ftype, channel = struct.unpack_from(">IBBH", self.buf)
            if size < 8 or doff < 2 or doff * 4 > size or size > self.max_frame:
                raise FrameError(f"bad frame header (size {size}, doff {doff})")
            if len(self.buf) < size:
                return
            body = bytes(self.buf[doff * 4 : size])
            del self.buf[:size]
            yield ftype, channel, body


@dataclass
class SaslResult:
    mechanism: str
    ok: bool
    identity: str | None = None
    description: str = ""


# authenticate(mechanism, initial_response, hostname) -> SaslResult
Authenticator = Callable[[str, bytes | None, str | None], SaslResult]


class SaslServer:
    """Server side of the SASL layer: mechanisms, init, outcome (no challenges)."""

    def __init__(self, mechanisms: list[str], authenticate: Authenticator) -> None:
        self.mechanisms = mechanisms
        self.authenticate = authenticate
        self.reader = FrameReader(MAX_SASL_FRAME)
        self.result: SaslResult | None = None

    def greeting(self) -> bytes:
        def fields(d: Data) -> None:
            d.put_array(False, Data.SYMBOL)
            d.enter()
            for mech in self.mechanisms:
                d.put_symbol(mech)
            d.exit()

        return SASL_HEADER + encode_frame(
            FRAME_SASL, 0, encode_performative(SASL_MECHANISMS, fields)
        )

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        """Feed bytes; returns (bytes to send, bytes left over after the outcome)."""
        for ftype, _channel, body in self.reader.feed(data):
            if ftype != FRAME_SASL or not body:
                raise FrameError("expected a SASL frame")
            descriptor, fields = decode_performative(body)
            if descriptor != SASL_INIT:
                raise FrameError(f"unexpected SASL performative 0x{descriptor:x}")
            mech = str(fields[0]) if fields else ""
            response = fields[1] if len(fields) > 1 else None
            hostname = fields[2] if len(fields) > 2 else None
            if mech not in self.mechanisms:
                self.result = SaslResult(mech, False, description="mechanism not offered")
            else:
                self.result = self.authenticate(
                    mech,
                    bytes(response) if response is not None else None,  # type: ignore[arg-type]
                    str(hostname) if hostname is not None else None,
                )
            code = SASL_OK if self.result.ok else SASL_AUTH
            outcome = encode_performative(SASL_OUTCOME, lambda d, code=code: d.put_ubyte(code))
            rest = bytes(self.reader.buf)
            self.reader.buf.clear()
            return encode_frame(FRAME_SASL, 0, outcome), rest
        return b"", b""


def descriptor_of(body: bytes) -> int | None:
    """Cheap look at a performative's descriptor without decoding the frame."""
    if len(body) >= 3 and body[0] == 0x00 and body[1] == 0x53:
        return body[2]
    if len(body) >= 10 and body[0] == 0x00 and body[1] == 0x80:
        return int.from_bytes(body[2:10], "big")
    return None


class TransferSniffer:
    """Reads the peer's AMQP frames (after the protocol header) alongside proton.

    Remembers the message-format of each incoming delivery, keyed by link name
    and delivery tag, for the recorder.
    """

    def __init__(self, max_frame: int) -> None:
        self.reader = FrameReader(max_frame)
        self.header_left = len(AMQP_HEADER)
        self.link_names: dict[tuple[int, int], str] = {}
        self.continuing: set[tuple[int, int]] = set()  # links in a multi-frame delivery
        self.formats: dict[tuple[str, bytes], deque[int]] = {}

    def feed(self, data: bytes) -> None:
        if self.header_left:
            skip = min(self.header_left, len(data))
            self.header_left -= skip
            data = data[skip:]
        for ftype, channel, body in self.reader.feed(data):
            if ftype != FRAME_AMQP or not body:
                continue
            descriptor = descriptor_of(body)
            if descriptor == ATTACH:
                _, fields = decode_performative(body)
                self.link_names[(channel, int(fields[1]))] = str(fields[0])  # type: ignore[call-overload]
            elif descriptor == TRANSFER:
                _, fields = decode_performative(body)
                tag = fields[2] if len(fields) > 2 else None
                fmt = fields[3] if len(fields) > 3 else None
                more = bool(fields[5]) if len(fields) > 5 else False
                handle = (channel, int(fields[0]))  # type: ignore[call-overload]
                first = handle not in self.continuing
                if more:
                    self.continuing.add(handle)
                else:
                    self.continuing.discard(handle)
                name = self.link_names.get(handle)
                if first and tag is not None and name is not None:
                    key = (name, bytes(tag))  # type: ignore[arg-type]
                    self.formats.setdefault(key, deque()).append(int(fmt or 0))  # type: ignore[call-overload]

    def message_format(self, link_name: str, tag: bytes) -> int | None:
        queue = self.formats.get((link_name, tag))
        if not queue:
            return None
        fmt = queue.popleft()
        if not queue:
            del self.formats[(link_name, tag)]
        return fmt

