"""AMQP 1.0 frames and protocol headers (spec 2.2, 2.3, 5.3).

``FrameReader`` turns a byte stream (after the 8-byte protocol header) into
``Frame`` objects. It checks a frame's SIZE against ``max_frame_size`` as soon
as the 4 size bytes are in, before buffering the body. A transfer frame is
decoded by a specialised path that reads only the performative and hands the
message bytes back as a ``memoryview`` slice of the received data: the message
itself is never parsed or copied. Flow and disposition frames, the other
per-message performatives, take the same specialised path.

Payload views keep the received chunk they point into alive; a caller that
holds on to a payload for long should copy it.

The encoders build complete frames. ``encode_transfer_frame``, ``encode_flow``
and ``encode_disposition`` write the bytes directly, without building a
performative object, because they run once per message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from .codec import _DECODERS, TYPED_ENCODERS, decode_value, encode_into
from .errors import AMQPError, DecodeError, EncodeError, FramingError
from .performatives import (
    AMQP_PERFORMATIVES,
    SASL_PERFORMATIVES,
    Accepted,
    Disposition,
    Flow,
    Performative,
    Transfer,
    decode_performative,
    decode_state,
)
from .types import Described, UInt

__all__ = [
    "AMQP_HEADER",
    "SASL_HEADER",
    "TLS_HEADER",
    "FRAME_AMQP",
    "FRAME_SASL",
    "MIN_MAX_FRAME_SIZE",
    "PRE_OPEN_FRAME_LIMIT",
    "SASL_FRAME_LIMIT",
    "HEADER_AMQP",
    "HEADER_SASL",
    "HEADER_TLS",
    "Frame",
    "FrameReader",
    "PlainTransfer",
    "plain_transfer",
    "read_protocol_header",
    "encode_frame",
    "encode_frame_into",
    "encode_transfer_frame",
    "encode_transfer_frame_into",
    "encode_flow",
    "encode_disposition",
    "FramingError",
]

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"
TLS_HEADER = b"AMQP\x02\x01\x00\x00"
FRAME_AMQP = 0
FRAME_SASL = 1
MIN_MAX_FRAME_SIZE = 512
# What a device may send before it is authenticated (a server engine's limits).
# The spec promises only MIN_MAX_FRAME_SIZE until the open exchange; we accept
# more, as clients' SASL PLAIN (a SAS token for the longest ids, about 1 KB) and
# open frames (container id, host name, properties) can exceed it, but bounded.
#: largest SASL frame a server engine reads (larger: SASL outcome auth, closed)
SASL_FRAME_LIMIT = 8192
#: largest frame a server engine reads before the peer's open (its open included)
PRE_OPEN_FRAME_LIMIT = 16384

HEADER_AMQP = "amqp"
HEADER_SASL = "sasl"
HEADER_TLS = "tls"
_HEADER_KINDS = {0: HEADER_AMQP, 2: HEADER_TLS, 3: HEADER_SASL}

Buffer = bytes | bytearray | memoryview

_FRAME_HEADER = struct.Struct(">IBBH")

#: The fields of a plain transfer frame, as ``FrameReader.read_frame`` returns
#: them: handle, delivery-id, delivery-tag, message-format (None if left out),
#: settled (None if left out) and more (False).
PlainTransfer = tuple[UInt, UInt, bytes, "UInt | None", "bool | None", bool]
_I = struct.Struct(">I")
_EMPTY = memoryview(b"")


@dataclass(slots=True)
class Frame:
    """One decoded frame. ``performative`` is None for an empty (keep-alive)
    frame; ``payload`` holds the bytes after the performative (only transfers
    carry any), as a zero-copy view of the received data."""

    frame_type: int
    channel: int
    performative: Performative | None
    payload: memoryview


# ----------------------------------------------------------------------- protocol header


def read_protocol_header(buf: Buffer) -> tuple[str | None, bytes]:
    """Read an AMQP protocol header from the start of ``buf``.

    Returns ``(HEADER_AMQP | HEADER_SASL | HEADER_TLS, bytes after the header)``,
    or ``(None, bytes(buf))`` while fewer than 8 bytes arrived. Raises
    FramingError as soon as the bytes cannot be an AMQP 1.0.0 header; the
    caller should then answer with the header it supports and close.
    """
    data = bytes(buf)
    n = min(len(data), 8)
    if data[: min(n, 4)] != b"AMQP"[: min(n, 4)]:
        raise FramingError(f"not an AMQP protocol header: {data[:8]!r}")
    if n >= 5 and data[4] not in _HEADER_KINDS:
        raise FramingError(f"unknown AMQP protocol id {data[4]} in header {data[:8]!r}")
    if n >= 8 and data[5:8] != b"\x01\x00\x00":
        raise FramingError(
            f"unsupported AMQP version {data[5]}.{data[6]}.{data[7]} (only 1.0.0), header {data[:8]!r}"
        )
    if n < 8:
        return None, data
    return _HEADER_KINDS[data[4]], data[8:]


# -------------------------------------------------------------------------------- reader


class FrameReader:
    """Incremental frame parser: ``feed(data)``, then ``next_frame()`` until None.

    Set ``max_frame_size`` to the value we advertised in our open (it bounds
    what we accept). Errors raise FramingError (size/doff/type) or DecodeError
    (the performative); after one, the reader keeps raising it.
    """

    __slots__ = ("max_frame_size", "_buf", "_view", "_pos", "_pending", "_pending_len", "_error")

    def __init__(self, max_frame_size: int = 4294967295) -> None:
        self.max_frame_size = max_frame_size
        self._buf: bytes = b""
        self._view = memoryview(self._buf)
        self._pos = 0
        # Chunks received after _buf; joined only once a whole frame is available,
        # so each byte is copied at most once however small the reads are.
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._error: AMQPError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos + self._pending_len

    def feed(self, data: Buffer) -> None:
        if not data:
            return
        if self._pos >= len(self._buf) and not self._pending:
            self._buf = data if type(data) is bytes else bytes(data)
            self._view = memoryview(self._buf)
            self._pos = 0
        else:
            chunk = data if type(data) is bytes else bytes(data)
            self._pending.append(chunk)
            self._pending_len += len(chunk)

    def _peek(self, n: int) -> bytes | None:
        have = len(self._buf) - self._pos
        if have >= n:
            return self._buf[self._pos : self._pos + n]
        if have + self._pending_len < n:
            return None
        parts = [self._buf[self._pos :]]
        need = n - have
        for chunk in self._pending:
            parts.append(chunk[:need])
            need -= len(chunk)
            if need <= 0:
                break
        return b"".join(parts)

    def _consolidate(self) -> None:
        self._buf = b"".join([self._view[self._pos :], *self._pending])
        self._view = memoryview(self._buf)
        self._pos = 0
        self._pending = []
        self._pending_len = 0

    def read_protocol_header(self) -> str | None:
        """Consume an 8-byte protocol header from the buffered bytes.

        For when a header follows frames in the same stream (the AMQP header
        after the SASL exchange) or when all input goes through one reader.
        Returns HEADER_AMQP / HEADER_SASL / HEADER_TLS, or None until 8 bytes
        are in; raises FramingError as soon as the bytes cannot be a header.
        """
        if self._error is not None:
            raise self._error
        try:
            head = self._peek(8)
            if head is None:
                read_protocol_header(self._peek(self.buffered) or b"")
                return None
            kind, _ = read_protocol_header(head)
        except AMQPError as exc:
            self._error = exc
            raise
        if len(self._buf) - self._pos < 8:
            self._consolidate()
        self._pos += 8
        return kind

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or None if more bytes are needed."""
        parts = self.read_frame()
        if parts is None:
            return None
        frame_type, channel, performative, payload = parts
        if type(performative) is tuple:
            performative = plain_transfer(performative)
        return Frame(frame_type, channel, performative, payload)

    def read_frame(self) -> tuple[int, int, Performative | PlainTransfer | None, memoryview] | None:
        """``next_frame`` as a tuple (frame_type, channel, performative, payload),
        without the Frame object: the connection's receive loop, once per frame.

        The usual transfer, a whole message in one frame with no delivery state
        (``more``, ``aborted``, ``batchable`` and ``resume`` false), comes as a
        ``PlainTransfer`` tuple instead of a Transfer: ``plain_transfer()`` makes
        the performative of it when one is needed."""
        if self._error is not None:
            raise self._error
        pos = self._pos
        buf = self._buf
        have = len(buf) - pos
        if not have and not self._pending:
            return None  # everything received has been read (the usual end of a chunk)
        try:
            if have >= 8:
                size, doff, ftype, channel = _FRAME_HEADER.unpack_from(buf, pos)
            else:
                head = self._peek(8)
                if head is None:
                    if self.buffered >= 4:
                        self._check_size(_I.unpack(self._peek(4))[0])  # type: ignore[arg-type]
                    return None
                size, doff, ftype, channel = _FRAME_HEADER.unpack(head)
            if size > self.max_frame_size or size < 8:
                self._check_size(size)
            if doff != 2 or ftype:
                _check_frame_header(size, doff, ftype)
            if have < size:
                if self.buffered < size:
                    return None
                self._consolidate()
                buf = self._buf
                pos = 0
            end = pos + size
            self._pos = end
            body = pos + doff * 4
            if body == end:
                return ftype, channel, None, _EMPTY
            # Fast paths for the per-message performatives (transfer, flow,
            # disposition) with the usual smallulong descriptor: no generic
            # described-value objects, and the payload stays a view.
            if buf[body] == 0x00 and end - body >= 3 and buf[body + 1] == 0x53 and not ftype:
                code = buf[body + 2]
                if code == 0x14:
                    plain = None
                    if end - body > 3 and buf[body + 3] == 0xC0:
                        try:
                            plain = _decode_plain_transfer(buf, body + 3, end)
                        except (IndexError, struct.error):
                            plain = None
                    if plain is None:
                        transfer, p = _decode_transfer(buf, body + 3, end)
                        return FRAME_AMQP, channel, transfer, self._view[p:end]
                    p = body + 5 + buf[body + 4]
                    if plain[5]:  # more: the first frame of several
                        return FRAME_AMQP, channel, plain_transfer(plain), self._view[p:end]
                    return FRAME_AMQP, channel, plain, self._view[p:end]
                fast = _FAST_DECODERS.get(code)
                if fast is not None:
                    performative, p = fast(buf, body + 3, end)
                    if p != end:
                        raise FramingError(
                            f"{type(performative).__name__} frame has {end - p} unexpected bytes after its body"
                        )
                    return FRAME_AMQP, channel, performative, _EMPTY
            view = self._view[:end]
            value, p = decode_value(view, body)
            performative = decode_performative(value)
            table = AMQP_PERFORMATIVES if ftype == FRAME_AMQP else SASL_PERFORMATIVES
            if performative.descriptor_code not in table:
                kind = "AMQP" if ftype == FRAME_AMQP else "SASL"
                raise FramingError(f"{type(performative).__name__} is not allowed in an {kind} frame")
            if p != end and type(performative) is not Transfer:
                raise FramingError(
                    f"{type(performative).__name__} frame has {end - p} unexpected bytes after its body"
                )
            return ftype, channel, performative, view[p:end] if p != end else _EMPTY
        except AMQPError as exc:
            self._error = exc
            raise

    def _check_size(self, size: int) -> None:
        if size > self.max_frame_size:
            raise FramingError(
                f"frame of {size} bytes exceeds the maximum frame size {self.max_frame_size}"
            )
        if size < 8:
            raise FramingError(f"frame size {size} is below the 8-byte frame header")


def _check_frame_header(size: int, doff: int, ftype: int) -> None:
    """The data offset and type checks of a frame header that is not the usual
    AMQP frame with an 8-byte header."""
    if doff < 2:
        raise FramingError(f"frame data offset {doff} is below the minimum of 2 (8 bytes)")
    if doff * 4 > size:
        raise FramingError(f"frame data offset {doff * 4} bytes exceeds the frame size {size}")
    if ftype > FRAME_SASL:
        raise FramingError(f"unknown frame type 0x{ftype:02x}")


_SMALL_UINT = tuple(UInt(i) for i in range(256))
_U32 = struct.Struct(">I")
_II = struct.Struct(">II")
_NONE = type(None)


def _signatures(allowed: list[tuple[type, ...]], min_len: int) -> frozenset[tuple[type, ...]]:
    """Type signatures of field lists that need no conversion: every field
    already has its declared type, no null needs a default, and every
    mandatory field is there. Anything else takes the generic path."""
    sigs: set[tuple[type, ...]] = {()}
    out: set[tuple[type, ...]] = {()} if min_len == 0 else set()
    for n, options in enumerate(allowed, start=1):
        sigs = {sig + (t,) for sig in sigs for t in options}
        if n >= min_len:
            out |= sigs
    return frozenset(out)


_U_OR_NULL = (UInt, _NONE)
# handle, delivery-id, delivery-tag, message-format, settled, more
_PLAIN_TRANSFER = _signatures(
    [(UInt,), _U_OR_NULL, (bytes, _NONE), _U_OR_NULL, (bool, _NONE), (bool,)], 1
)
_TRANSFER_DEFAULTS = (None, None, None, None, None, False, None, None, False, False, False)
# next-incoming-id, incoming-window, next-outgoing-id, outgoing-window, handle,
# delivery-count, link-credit, available, drain, echo, properties
_PLAIN_FLOW = _signatures(
    [_U_OR_NULL, (UInt,), (UInt,), (UInt,), _U_OR_NULL, _U_OR_NULL, _U_OR_NULL, _U_OR_NULL,
     (bool,), (bool,), (dict, _NONE)],
    4,
)  # fmt: skip
_FLOW_DEFAULTS = (None, None, None, None, None, None, None, None, False, False, None)
# role, first, last, settled, state, batchable
_PLAIN_DISPOSITION = _signatures(
    [(bool,), (UInt,), _U_OR_NULL, (bool,), (Described, _NONE), (bool,)], 2
)
_DISPOSITION_DEFAULTS = (None, None, None, False, None, False)


def _decode_fields(buf: bytes, pos: int, end: int, what: str) -> tuple[list[Any], int]:
    """Decode a performative's field list starting at its list constructor.

    ``buf`` is the received bytes object (indexing bytes is about twice as fast
    as indexing a memoryview). The encodings every stack uses for these fields
    are decoded inline; anything else goes through the generic decoders.
    """
    if pos >= end:
        raise DecodeError(f"offset {pos}: {what} has no field list")
    code = buf[pos]
    if code == 0xC0:
        if pos + 3 > end:
            raise DecodeError(f"offset {pos}: truncated {what} field list")
        stop = pos + 2 + buf[pos + 1]
        count = buf[pos + 2]
        p = pos + 3
    elif code == 0xD0:
        if pos + 9 > end:
            raise DecodeError(f"offset {pos}: truncated {what} field list")
        size, count = _II.unpack_from(buf, pos + 1)
        p = pos + 9
        stop = pos + 5 + size
    elif code == 0x45:
        return [], pos + 1
    else:
        raise DecodeError(f"offset {pos}: {what} body must be a list, got constructor 0x{code:02x}")
    if stop > end or stop < p:
        raise DecodeError(f"offset {pos}: {what} field list overruns the frame")
    if count > stop - p:
        raise DecodeError(f"offset {pos}: {what} claims {count} fields in {stop - p} bytes")
    values: list[Any] = []
    append = values.append
    for _ in range(count):
        if p >= stop:
            raise DecodeError(f"offset {p}: truncated {what} field list")
        c = buf[p]
        if c == 0x43:
            append(_SMALL_UINT[0])
            p += 1
        elif c == 0x52:
            if p + 2 > stop:
                raise DecodeError(f"offset {p}: truncated smalluint")
            append(_SMALL_UINT[buf[p + 1]])
            p += 2
        elif c == 0x42:
            append(False)
            p += 1
        elif c == 0x41:
            append(True)
            p += 1
        elif c == 0x40:
            append(None)
            p += 1
        elif c == 0xA0:
            n = buf[p + 1] if p + 1 < stop else 0
            if p + 2 + n > stop:
                raise DecodeError(f"offset {p}: truncated binary")
            append(buf[p + 2 : p + 2 + n])
            p += 2 + n
        elif c == 0x70:
            if p + 5 > stop:
                raise DecodeError(f"offset {p}: truncated uint")
            append(UInt(_U32.unpack_from(buf, p + 1)[0]))
            p += 5
        else:
            fn = _DECODERS[c]
            if fn is None:
                raise DecodeError(f"offset {p}: unknown type constructor 0x{c:02x}")
            try:
                v, p = fn(buf, p + 1, stop, 1)
            except DecodeError:
                raise
            except (struct.error, IndexError, ValueError, OverflowError, RecursionError) as exc:
                raise DecodeError(f"offset {p}: malformed {what} field ({exc})") from None
            append(v)
    if p != stop:
        raise DecodeError(f"offset {pos}: {what} list size disagrees with its fields")
    return values, stop


def _plain_uint(buf: bytes, p: int) -> tuple[Any, int]:
    """A uint in one of its three encodings at ``p``, else (None, p)."""
    c = buf[p]
    if c == 0x52:
        return _SMALL_UINT[buf[p + 1]], p + 2
    if c == 0x43:
        return _SMALL_UINT[0], p + 1
    if c == 0x70:
        return UInt(_U32.unpack_from(buf, p + 1)[0]), p + 5
    return None, p


def _decode_plain_transfer(buf: bytes, pos: int, end: int) -> PlainTransfer | None:
    """The first frame of a message as stacks write it: a list8 of handle,
    delivery-id, delivery-tag (vbin8), then optionally message-format, settled
    and more (proton leaves out trailing defaults). Returns those six fields as
    a tuple (``more`` False when left out), None for anything else (the generic
    path decides)."""
    count = buf[pos + 2]
    if count < 3 or count > 6:
        return None
    stop = pos + 2 + buf[pos + 1]
    if stop > end:
        return None
    # handle and delivery-id: smalluint and uint0 inline, the rest by _plain_uint
    p = pos + 3
    c = buf[p]
    if c == 0x52:
        handle = _SMALL_UINT[buf[p + 1]]
        p += 2
    elif c == 0x43:
        handle = _SMALL_UINT[0]
        p += 1
    else:
        handle, p = _plain_uint(buf, p)
        if handle is None:
            return None
    c = buf[p]
    if c == 0x70:
        did = UInt(_U32.unpack_from(buf, p + 1)[0])
        p += 5
    elif c == 0x52:
        did = _SMALL_UINT[buf[p + 1]]
        p += 2
    elif c == 0x43:
        did = _SMALL_UINT[0]
        p += 1
    else:
        return None
    if buf[p] != 0xA0:
        return None
    n = buf[p + 1]
    if n > 32:
        return None
    tag = buf[p + 2 : p + 2 + n]
    p += 2 + n
    fmt = settled = None
    more = False
    if count > 3:
        c = buf[p]
        if c == 0x43:
            fmt = _SMALL_UINT[0]
            p += 1
        else:
            fmt, p = _plain_uint(buf, p)
            if fmt is None:
                return None
        if count > 4:
            c = buf[p]
            if c == 0x42:
                settled = False
            elif c == 0x41:
                settled = True
            elif c != 0x40:
                return None
            p += 1
            if count > 5:
                c = buf[p]
                if c == 0x41:
                    more = True
                elif c != 0x42:
                    return None
                p += 1
    if p != stop:
        return None
    return handle, did, tag, fmt, settled, more


def plain_transfer(fields: PlainTransfer) -> Transfer:
    """The Transfer performative of a plain transfer's fields (see ``read_frame``)."""
    return Transfer(*fields, None, None, False, False, False)


def _decode_transfer(buf: bytes, pos: int, end: int) -> tuple[Transfer, int]:
    if pos + 3 <= end and buf[pos] == 0xC0:
        try:
            plain = _decode_plain_transfer(buf, pos, end)
        except (IndexError, struct.error):
            plain = None
        if plain is not None:
            return Transfer(*plain, None, None, False, False, False), pos + 2 + buf[pos + 1]
    values, stop = _decode_fields(buf, pos, end, "transfer")
    count = len(values)
    if tuple(map(type, values)) in _PLAIN_TRANSFER and (
        count < 3 or values[2] is None or len(values[2]) <= 32
    ):
        if count < 11:
            values += _TRANSFER_DEFAULTS[count:]
        return Transfer(*values), stop
    return Transfer._from_list(values), stop


def _decode_flow(buf: bytes, pos: int, end: int) -> tuple[Flow, int]:
    values, stop = _decode_fields(buf, pos, end, "flow")
    count = len(values)
    if tuple(map(type, values)) in _PLAIN_FLOW:
        if count < 11:
            values += _FLOW_DEFAULTS[count:]
        return Flow(*values), stop
    return Flow._from_list(values), stop


# The accepted outcome as every stack encodes it: descriptor 0x24, empty list.
_ACCEPTED_BYTES = b"\x00\x53\x24\x45"


def _decode_plain_disposition(buf: bytes, pos: int, end: int) -> Disposition | None:
    """A disposition as stacks write it per message: a list8 of role, first, and
    optionally last, settled, a null or accepted state and batchable, each in
    its usual encoding. None for anything else (the generic path decides)."""
    count = buf[pos + 2]
    if count < 2 or count > 6:
        return None
    stop = pos + 2 + buf[pos + 1]
    if stop > end:
        return None
    c = buf[pos + 3]
    if c == 0x41:
        role = True
    elif c == 0x42:
        role = False
    else:
        return None
    first, p = _plain_uint(buf, pos + 4)
    if first is None:
        return None
    last = state = None
    settled = batchable = False
    if count > 2:
        if buf[p] == 0x40:
            p += 1
        else:
            last, p = _plain_uint(buf, p)
            if last is None:
                return None
        if count > 3:
            c = buf[p]
            if c == 0x41:
                settled = True
            elif c != 0x42:
                return None
            p += 1
            if count > 4:
                if buf[p] == 0x40:
                    p += 1
                elif buf[p : p + 4] == _ACCEPTED_BYTES:
                    state = Accepted()
                    p += 4
                else:
                    return None
                if count > 5:
                    c = buf[p]
                    if c == 0x41:
                        batchable = True
                    elif c != 0x42:
                        return None
                    p += 1
    if p != stop:
        return None
    return Disposition(role, first, last, settled, state, batchable)


def _decode_disposition(buf: bytes, pos: int, end: int) -> tuple[Disposition, int]:
    if pos + 3 <= end and buf[pos] == 0xC0:
        try:
            disposition = _decode_plain_disposition(buf, pos, end)
        except (IndexError, struct.error):
            disposition = None
        if disposition is not None:
            return disposition, pos + 2 + buf[pos + 1]
    values, stop = _decode_fields(buf, pos, end, "disposition")
    count = len(values)
    if tuple(map(type, values)) in _PLAIN_DISPOSITION:
        if count > 4 and values[4] is not None:
            values[4] = decode_state(values[4])
        if count < 6:
            values += _DISPOSITION_DEFAULTS[count:]
        return Disposition(*values), stop
    return Disposition._from_list(values), stop


_FAST_DECODERS: dict[int, Any] = {
    0x13: _decode_flow,
    0x14: _decode_transfer,
    0x15: _decode_disposition,
}


# ------------------------------------------------------------------------------ encoding


def _frame_header(size: int, frame_type: int, channel: int) -> bytes:
    if not 0 <= channel <= 0xFFFF:
        raise EncodeError(f"channel {channel} out of range")
    return _FRAME_HEADER.pack(size, 2, frame_type, channel)


def encode_frame_into(
    out: bytearray,
    performative: Performative | None,
    channel: int = 0,
    payload: Buffer = b"",
    frame_type: int = FRAME_AMQP,
) -> None:
    """Append a frame to ``out``; a None performative makes an empty frame."""
    start = len(out)
    out += b"\x00\x00\x00\x00\x02\x00\x00\x00"
    if performative is not None:
        encode_into(out, performative)
    if payload:
        out += payload
    size = len(out) - start
    out[start : start + 8] = _frame_header(size, frame_type, channel)


def encode_frame(
    performative: Performative | None,
    channel: int = 0,
    payload: Buffer = b"",
    frame_type: int = FRAME_AMQP,
) -> bytes:
    """Return one frame; a None performative makes an empty (keep-alive) frame."""
    out = bytearray()
    encode_frame_into(out, performative, channel, payload, frame_type)
    return bytes(out)


_enc_uint = TYPED_ENCODERS["uint"]
_enc_binary = TYPED_ENCODERS["binary"]
_enc_ubyte = TYPED_ENCODERS["ubyte"]
_enc_fields = TYPED_ENCODERS["fields"]


def _uint_bytes(v: int) -> bytes:
    if v == 0:
        return b"\x43"
    if 0 < v < 256:
        return bytes((0x52, v))
    if 0 < v <= 0xFFFFFFFF:
        return b"\x70" + _U32.pack(v)
    raise EncodeError(f"{v} is out of range for AMQP uint")


_UINT_CACHE = tuple(_uint_bytes(i) for i in range(256))


def _uint(v: int) -> bytes:
    if 0 <= v < 256:
        return _UINT_CACHE[v]
    return _uint_bytes(v)


def _bool(v: bool | None) -> bytes:
    if v is None:
        return b"\x40"
    return b"\x41" if v else b"\x42"


def _finish_list(fields_: list[bytes] | bytearray, count: int) -> bytes:
    body = b"".join(fields_) if isinstance(fields_, list) else bytes(fields_)
    n = len(body)
    if count == 0:
        return b"\x45"
    if n < 255:
        return bytes((0xC0, n + 1, count)) + body
    return struct.pack(">BII", 0xD0, n + 4, count) + body


def _transfer_body(
    handle: int,
    delivery_id: int | None,
    delivery_tag: bytes | None,
    message_format: int | None,
    settled: bool | None,
    more: bool,
    rcv_settle_mode: int | None,
    state: Any,
    resume: bool,
    aborted: bool,
    batchable: bool,
) -> bytes:
    parts = [
        _uint(handle),
        b"\x40" if delivery_id is None else _uint(delivery_id),
    ]
    if delivery_tag is None:
        parts.append(b"\x40")
    else:
        n = len(delivery_tag)
        if n > 32:
            raise EncodeError(f"delivery tag of {n} bytes exceeds the 32-byte limit")
        parts.append(bytes((0xA0, n)) + bytes(delivery_tag))
    parts.append(b"\x40" if message_format is None else _uint(message_format))
    parts.append(_bool(settled))
    parts.append(b"\x41" if more else b"\x42")
    if rcv_settle_mode is None and state is None and not (resume or aborted or batchable):
        # The common case: drop trailing defaults (more=false, then nulls).
        count = 6
        if not more:
            count = 5
            while count > 1 and parts[count - 1] == b"\x40":
                count -= 1
        return _finish_list(parts[:count], count)
    if rcv_settle_mode is None:
        parts.append(b"\x40")
    else:
        b = bytearray()
        _enc_ubyte(b, rcv_settle_mode)
        parts.append(bytes(b))
    if state is None:
        parts.append(b"\x40")
    else:
        b = bytearray()
        encode_into(b, state)
        parts.append(bytes(b))
    parts.append(b"\x41" if resume else b"\x42")
    parts.append(b"\x41" if aborted else b"\x42")
    parts.append(b"\x41" if batchable else b"\x42")
    count = 11
    while parts[count - 1] in (b"\x40", b"\x42") and count > 6:
        count -= 1
    return _finish_list(parts[:count], count)


def encode_transfer_frame_into(
    out: bytearray,
    channel: int,
    handle: int,
    delivery_id: int | None,
    delivery_tag: bytes | None,
    message_format: int | None,
    settled: bool | None,
    more: bool,
    payload: Buffer,
    *,
    rcv_settle_mode: int | None = None,
    state: Any = None,
    resume: bool = False,
    aborted: bool = False,
    batchable: bool = False,
) -> None:
    """Append one transfer frame carrying ``payload`` (a message or a fragment).

    Continuation frames of a multi-frame delivery may pass None for
    delivery_id, delivery_tag and message_format.
    """
    body = _transfer_body(
        handle, delivery_id, delivery_tag, message_format, settled, more,
        rcv_settle_mode, state, resume, aborted, batchable,
    )  # fmt: skip
    n = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
    out += _frame_header(11 + len(body) + n, FRAME_AMQP, channel)
    out += b"\x00\x53\x14"
    out += body
    out += payload


_PLAIN_TRANSFER_HEAD = struct.Struct(">IBBHBBBBBB")  # frame header, descriptor, list8 of 5
_MARKED_U32 = struct.Struct(">BI")
_TAG_HEAD = tuple(bytes((0xA0, n)) for n in range(33))


def encode_plain_transfer_into(
    out: bytearray,
    channel: int,
    handle: int,
    delivery_id: int,
    delivery_tag: bytes,
    message_format: int,
    settled: bool,
    payload: Buffer,
) -> None:
    """Append the one frame of a whole message with no delivery state, not
    batchable: the relay's common case. The same bytes as
    ``encode_transfer_frame_into(..., more=False)`` with fewer steps."""
    n = len(delivery_tag)
    if n > 32:
        raise EncodeError(f"delivery tag of {n} bytes exceeds the 32-byte limit")
    if not 0 <= channel <= 0xFFFF:
        raise EncodeError(f"channel {channel} out of range")
    h = _UINT_CACHE[handle] if 0 <= handle < 256 else _uint_bytes(handle)
    if 0 <= delivery_id < 256:
        d = _UINT_CACHE[delivery_id]
    elif 0 < delivery_id <= 0xFFFFFFFF:
        d = _MARKED_U32.pack(0x70, delivery_id)
    else:
        d = _uint_bytes(delivery_id)
    f = b"\x43" if message_format == 0 else _uint(message_format)
    size = len(h) + len(d) + n + len(f) + 3  # + tag constructor and length, settled
    out += b"".join((
        _PLAIN_TRANSFER_HEAD.pack(
            14 + size + (payload.nbytes if type(payload) is memoryview else len(payload)),
            2, FRAME_AMQP, channel, 0x00, 0x53, 0x14, 0xC0, size + 1, 5,
        ),
        h, d, _TAG_HEAD[n], delivery_tag, f, b"\x41" if settled else b"\x42",
    ))  # fmt: skip
    out += payload


def encode_transfer_frame(
    channel: int,
    handle: int,
    delivery_id: int | None,
    delivery_tag: bytes | None,
    message_format: int | None,
    settled: bool | None,
    more: bool,
    payload: Buffer,
    *,
    rcv_settle_mode: int | None = None,
    state: Any = None,
    resume: bool = False,
    aborted: bool = False,
    batchable: bool = False,
) -> bytes:
    """Return one transfer frame (see encode_transfer_frame_into)."""
    body = _transfer_body(
        handle, delivery_id, delivery_tag, message_format, settled, more,
        rcv_settle_mode, state, resume, aborted, batchable,
    )  # fmt: skip
    n = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
    return b"".join(
        (_frame_header(11 + len(body) + n, FRAME_AMQP, channel), b"\x00\x53\x14", body, payload)
    )


def encode_flow(
    channel: int,
    next_incoming_id: int | None,
    incoming_window: int,
    next_outgoing_id: int,
    outgoing_window: int,
    handle: int | None = None,
    delivery_count: int | None = None,
    link_credit: int | None = None,
    available: int | None = None,
    drain: bool = False,
    echo: bool = False,
    properties: dict[Any, Any] | None = None,
) -> bytes:
    """Return one flow frame (session flow when handle is None, else link flow)."""
    parts = [
        b"\x40" if next_incoming_id is None else _uint(next_incoming_id),
        _uint(incoming_window),
        _uint(next_outgoing_id),
        _uint(outgoing_window),
        b"\x40" if handle is None else _uint(handle),
        b"\x40" if delivery_count is None else _uint(delivery_count),
        b"\x40" if link_credit is None else _uint(link_credit),
        b"\x40" if available is None else _uint(available),
        b"\x41" if drain else b"\x42",
        b"\x41" if echo else b"\x42",
    ]
    if properties is not None:
        b = bytearray()
        _enc_fields(b, properties)
        parts.append(bytes(b))
        count = 11
    else:
        count = 10
        if not echo:
            count = 9
            if not drain:
                count = 8
                while count > 4 and parts[count - 1] == b"\x40":
                    count -= 1
    body = _finish_list(parts[:count], count)
    return b"".join((_frame_header(11 + len(body), FRAME_AMQP, channel), b"\x00\x53\x13", body))


def encode_disposition(
    channel: int,
    role: bool,
    first: int,
    last: int | None = None,
    settled: bool = False,
    state: Any = None,
    batchable: bool = False,
) -> bytes:
    """Return one disposition frame for deliveries first..last (inclusive)."""
    parts = [
        b"\x41" if role else b"\x42",
        _uint(first),
        b"\x40" if last is None else _uint(last),
        b"\x41" if settled else b"\x42",
    ]
    if state is None:
        parts.append(b"\x40")
    elif type(state) is Accepted and not state._extra:
        parts.append(_ACCEPTED_BYTES)
    else:
        b = bytearray()
        encode_into(b, state)
        parts.append(bytes(b))
    parts.append(b"\x41" if batchable else b"\x42")
    count = 6
    if not batchable:
        count = 5
        if state is None:
            count = 4
            if not settled:
                count = 3
                if last is None:
                    count = 2
    body = _finish_list(parts[:count], count)
    return b"".join((_frame_header(11 + len(body), FRAME_AMQP, channel), b"\x00\x53\x15", body))
