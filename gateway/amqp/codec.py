"""AMQP 1.0 type codec: values <-> bytes (spec part 1, "Types").

Decoding accepts every valid encoding (compact and wide forms alike) and
returns the wrapper types of ``types`` so that a decoded value re-encodes as
the same AMQP type. Encoding picks the compact forms (uint0, smalluint, list0,
8-bit widths when they fit). Bad input raises ``DecodeError`` and nothing else:
the peer's bytes must never crash the caller.

Maps decode to a dict unless a dict would drop or refuse an entry (keys distinct
in AMQP but equal in Python, repeated keys, list or map keys); those decode to
``types.Map``, which keeps every entry in wire order and re-encodes to the same
bytes.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from typing import Any

from .constants import ELEMENT_TYPES
from .errors import DecodeError, EncodeError
from .types import (
    Array,
    Byte,
    Char,
    Composite,
    Decimal32,
    Decimal64,
    Decimal128,
    Described,
    Float,
    Int,
    Long,
    Map,
    Short,
    Symbol,
    Timestamp,
    UByte,
    UInt,
    ULong,
    UShort,
)

__all__ = [
    "encode_value",
    "encode_into",
    "encode_list_into",
    "encode_typed_into",
    "decode_value",
    "skip_value",
    "MAX_DEPTH",
    "MAX_ZERO_WIDTH_ITEMS",
]

Buffer = bytes | bytearray | memoryview

# Nesting bound for compound values: real AMQP frames nest a handful of levels;
# this keeps hostile input from exhausting the Python stack.
MAX_DEPTH = 64

_B = struct.Struct(">B")
_b = struct.Struct(">b")
_H = struct.Struct(">H")
_h = struct.Struct(">h")
_I = struct.Struct(">I")
_i = struct.Struct(">i")
_Q = struct.Struct(">Q")
_q = struct.Struct(">q")
_f = struct.Struct(">f")
_d = struct.Struct(">d")
_BI = struct.Struct(">BI")
_BB = struct.Struct(">BB")
_II = struct.Struct(">II")
_BII = struct.Struct(">BII")

# Shared instances of the most common small values (immutable, safe to share).
_SMALL_UINT = tuple(UInt(i) for i in range(256))
_SMALL_ULONG = tuple(ULong(i) for i in range(256))
_UBYTES = tuple(UByte(i) for i in range(256))


# --------------------------------------------------------------------------- decoding

DecodeFn = Callable[[Buffer, int, int, int], tuple[Any, int]]


def _short(pos: int, need: int, end: int, what: str) -> DecodeError:
    have = max(end - pos, 0)
    return DecodeError(f"offset {pos}: {what} needs {need} bytes, only {have} left")


def _d_null(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
    return None, pos


def _d_true(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
    return True, pos


def _d_false(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
    return False, pos


def _d_bool(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
    if pos >= end:
        raise _short(pos, 1, end, "boolean")
    b = buf[pos]
    if b > 1:
        raise DecodeError(f"offset {pos}: boolean byte must be 0x00 or 0x01, got 0x{b:02x}")
    return b == 1, pos + 1


def _d_uint0(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
    return _SMALL_UINT[0], pos


def _d_ulong0(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
    return _SMALL_ULONG[0], pos


def _d_list0(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
    return [], pos


def _d_smalluint(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
    if pos >= end:
        raise _short(pos, 1, end, "smalluint")
    return _SMALL_UINT[buf[pos]], pos + 1


def _d_smallulong(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
    if pos >= end:
        raise _short(pos, 1, end, "smallulong")
    return _SMALL_ULONG[buf[pos]], pos + 1


def _d_ubyte(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
    if pos >= end:
        raise _short(pos, 1, end, "ubyte")
    return _UBYTES[buf[pos]], pos + 1


def _fixed(
    width: int, unpack: Callable[..., tuple[Any, ...]], wrap: Callable[[Any], Any], what: str
) -> DecodeFn:
    def decode(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
        nxt = pos + width
        if nxt > end:
            raise _short(pos, width, end, what)
        return wrap(unpack(buf, pos)[0]), nxt

    return decode


def _d_char(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
    if pos + 4 > end:
        raise _short(pos, 4, end, "char")
    cp = _I.unpack_from(buf, pos)[0]
    if cp > 0x10FFFF:
        raise DecodeError(f"offset {pos}: char code point 0x{cp:x} is beyond Unicode")
    return Char(chr(cp)), pos + 4


def _d_uuid(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
    if pos + 16 > end:
        raise _short(pos, 16, end, "uuid")
    return uuid.UUID(bytes=bytes(buf[pos : pos + 16])), pos + 16


def _decimal(width: int, cls: type) -> DecodeFn:
    def decode(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
        if pos + width > end:
            raise _short(pos, width, end, cls.__name__.lower())
        return cls(bytes(buf[pos : pos + width])), pos + width

    return decode


def _var8(what: str, convert: Callable[[Buffer, int, int], Any]) -> DecodeFn:
    def decode(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
        if pos >= end:
            raise _short(pos, 1, end, what + " size")
        start = pos + 1
        stop = start + buf[pos]
        if stop > end:
            raise _short(start, stop - start, end, what)
        return convert(buf, start, stop), stop

    return decode


def _var32(what: str, convert: Callable[[Buffer, int, int], Any]) -> DecodeFn:
    def decode(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
        if pos + 4 > end:
            raise _short(pos, 4, end, what + " size")
        start = pos + 4
        stop = start + _I.unpack_from(buf, pos)[0]
        if stop > end:
            raise _short(start, stop - start, end, what)
        return convert(buf, start, stop), stop

    return decode


def _as_binary(buf: Buffer, start: int, stop: int) -> bytes:
    return bytes(buf[start:stop])


def _as_string(buf: Buffer, start: int, stop: int) -> str:
    try:
        return str(buf[start:stop], "utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"offset {start}: string is not valid UTF-8 ({exc.reason})") from None


def _as_symbol(buf: Buffer, start: int, stop: int) -> Symbol:
    try:
        return Symbol(str(buf[start:stop], "ascii"))
    except UnicodeDecodeError:
        raise DecodeError(f"offset {start}: symbol is not ASCII") from None


def _compound_header(
    buf: Buffer, pos: int, end: int, wide: bool, what: str
) -> tuple[int, int, int]:
    """Read size and count; return (count, offset of first element, end of value)."""
    if wide:
        if pos + 8 > end:
            raise _short(pos, 8, end, what + " size and count")
        size, count = _II.unpack_from(buf, pos)
        if size < 4:
            raise DecodeError(f"offset {pos}: {what} size {size} is smaller than its count field")
        first = pos + 8
        stop = pos + 4 + size
    else:
        if pos + 2 > end:
            raise _short(pos, 2, end, what + " size and count")
        size = buf[pos]
        count = buf[pos + 1]
        if size < 1:
            raise DecodeError(f"offset {pos}: {what} size 0 is smaller than its count field")
        first = pos + 2
        stop = pos + 1 + size
    if stop > end:
        raise _short(pos, stop - pos, end, what)
    return count, first, stop


def _list(wide: bool) -> DecodeFn:
    what = "list32" if wide else "list8"

    def decode(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
        count, p, stop = _compound_header(buf, pos, end, wide, what)
        if count > stop - p:
            raise DecodeError(f"offset {pos}: {what} claims {count} elements in {stop - p} bytes")
        if depth >= MAX_DEPTH:
            raise DecodeError(f"offset {pos}: values nested deeper than {MAX_DEPTH} levels")
        depth += 1
        items = []
        append = items.append
        table = _DECODERS
        for _ in range(count):
            if p >= stop:
                raise _short(p, 1, stop, f"{what} element constructor")
            fn = table[buf[p]]
            if fn is None:
                raise DecodeError(f"offset {p}: unknown type constructor 0x{buf[p]:02x}")
            v, p = fn(buf, p + 1, stop, depth)
            append(v)
        if p != stop:
            raise DecodeError(
                f"offset {pos}: {what} size says {stop - pos} bytes, elements used {p - pos}"
            )
        return items, stop

    return decode


def _map(wide: bool) -> DecodeFn:
    what = "map32" if wide else "map8"

    def decode(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
        count, p, stop = _compound_header(buf, pos, end, wide, what)
        if count & 1:
            raise DecodeError(f"offset {pos}: {what} has an odd element count {count}")
        if count > stop - p:
            raise DecodeError(f"offset {pos}: {what} claims {count} elements in {stop - p} bytes")
        if depth >= MAX_DEPTH:
            raise DecodeError(f"offset {pos}: values nested deeper than {MAX_DEPTH} levels")
        depth += 1
        result: dict[Any, Any] = {}
        pairs: list[tuple[Any, Any]] | None = None  # set once a dict would lose an entry
        table = _DECODERS
        for _ in range(count >> 1):
            if p >= stop:
                raise _short(p, 1, stop, f"{what} key constructor")
            fn = table[buf[p]]
            if fn is None:
                raise DecodeError(f"offset {p}: unknown type constructor 0x{buf[p]:02x}")
            k, p = fn(buf, p + 1, stop, depth)
            if p >= stop:
                raise _short(p, 1, stop, f"{what} value constructor")
            fn = table[buf[p]]
            if fn is None:
                raise DecodeError(f"offset {p}: unknown type constructor 0x{buf[p]:02x}")
            v, p = fn(buf, p + 1, stop, depth)
            if pairs is not None:
                pairs.append((k, v))
                continue
            n = len(result)
            try:
                result.setdefault(k, v)
            except TypeError:  # an unhashable key (list, map, array)
                pass
            else:
                if len(result) > n:
                    continue
            # A key equal to an earlier one as a Python value (UInt(1) and Long(1),
            # "a" and Symbol("a"), a repeat) or an unhashable key: a dict cannot hold
            # every entry, so the map becomes a Map of all its pairs.
            pairs = list(result.items())
            pairs.append((k, v))
        if p != stop:
            raise DecodeError(
                f"offset {pos}: {what} size says {stop - pos} bytes, elements used {p - pos}"
            )
        return (result if pairs is None else Map(pairs)), stop

    return decode


# Element constructors that take no bytes per element (null, true, false, uint0,
# ulong0, list0). A 4-byte array of them could claim 2**32 elements, so their
# count has a fixed cap, checked the same way when encoding so that anything
# decoded re-encodes and decodes again. No known peer sends such arrays (proton
# writes array elements at full width; only null-typed arrays are zero-width).
MAX_ZERO_WIDTH_ITEMS = 64
_ZERO_WIDTH = frozenset((0x40, 0x41, 0x42, 0x43, 0x44, 0x45))


def _array(wide: bool) -> DecodeFn:
    what = "array32" if wide else "array8"

    def decode(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
        count, p, stop = _compound_header(buf, pos, end, wide, what)
        if depth >= MAX_DEPTH:
            raise DecodeError(f"offset {pos}: values nested deeper than {MAX_DEPTH} levels")
        depth += 1
        if p >= stop:
            raise _short(p, 1, stop, f"{what} element constructor")
        code = buf[p]
        p += 1
        descriptor = None
        if code == 0x00:
            if p >= stop:
                raise _short(p, 1, stop, f"{what} descriptor")
            fn = _DECODERS[buf[p]]
            if fn is None:
                raise DecodeError(f"offset {p}: unknown type constructor 0x{buf[p]:02x}")
            descriptor, p = fn(buf, p + 1, stop, depth)
            if p >= stop:
                raise _short(p, 1, stop, f"{what} element constructor")
            code = buf[p]
            p += 1
            if code == 0x00:
                raise DecodeError(f"offset {p - 1}: nested described array constructor")
        fn = _DECODERS[code]
        if fn is None:
            raise DecodeError(f"offset {p - 1}: unknown array element constructor 0x{code:02x}")
        if code in _ZERO_WIDTH:
            if count > MAX_ZERO_WIDTH_ITEMS:
                raise DecodeError(
                    f"offset {pos}: {what} of {count} zero-width elements exceeds the limit of"
                    f" {MAX_ZERO_WIDTH_ITEMS}"
                )
        elif count > stop - p:
            raise DecodeError(f"offset {pos}: {what} claims {count} elements in {stop - p} bytes")
        items = []
        append = items.append
        for _ in range(count):
            v, p = fn(buf, p, stop, depth)
            append(v)
        if p != stop:
            raise DecodeError(
                f"offset {pos}: {what} size says {stop - pos} bytes, elements used {p - pos}"
            )
        return Array(ELEMENT_TYPES[code], items, descriptor), stop

    return decode


def _d_described(buf: Buffer, pos: int, end: int, depth: int) -> tuple[Any, int]:
    if depth >= MAX_DEPTH:
        raise DecodeError(f"offset {pos}: values nested deeper than {MAX_DEPTH} levels")
    depth += 1
    if pos >= end:
        raise _short(pos, 1, end, "descriptor")
    fn = _DECODERS[buf[pos]]
    if fn is None:
        raise DecodeError(f"offset {pos}: unknown type constructor 0x{buf[pos]:02x}")
    descriptor, pos = fn(buf, pos + 1, end, depth)
    if pos >= end:
        raise _short(pos, 1, end, "described value")
    fn = _DECODERS[buf[pos]]
    if fn is None:
        raise DecodeError(f"offset {pos}: unknown type constructor 0x{buf[pos]:02x}")
    value, pos = fn(buf, pos + 1, end, depth)
    return Described(descriptor, value), pos


def _build_decoders() -> list[DecodeFn | None]:
    t: list[DecodeFn | None] = [None] * 256
    t[0x00] = _d_described
    t[0x40] = _d_null
    t[0x41] = _d_true
    t[0x42] = _d_false
    t[0x56] = _d_bool
    t[0x43] = _d_uint0
    t[0x44] = _d_ulong0
    t[0x45] = _d_list0
    t[0x50] = _d_ubyte
    t[0x52] = _d_smalluint
    t[0x53] = _d_smallulong
    t[0x51] = _fixed(1, _b.unpack_from, Byte, "byte")
    t[0x54] = _fixed(1, _b.unpack_from, Int, "smallint")
    t[0x55] = _fixed(1, _b.unpack_from, Long, "smalllong")
    t[0x60] = _fixed(2, _H.unpack_from, UShort, "ushort")
    t[0x61] = _fixed(2, _h.unpack_from, Short, "short")
    t[0x70] = _fixed(4, _I.unpack_from, UInt, "uint")
    t[0x71] = _fixed(4, _i.unpack_from, Int, "int")
    t[0x72] = _fixed(4, _f.unpack_from, Float, "float")
    t[0x80] = _fixed(8, _Q.unpack_from, ULong, "ulong")
    t[0x81] = _fixed(8, _q.unpack_from, Long, "long")
    t[0x82] = _fixed(8, _d.unpack_from, float, "double")
    t[0x83] = _fixed(8, _q.unpack_from, Timestamp, "timestamp")
    t[0x73] = _d_char
    t[0x98] = _d_uuid
    t[0x74] = _decimal(4, Decimal32)
    t[0x84] = _decimal(8, Decimal64)
    t[0x94] = _decimal(16, Decimal128)
    t[0xA0] = _var8("vbin8", _as_binary)
    t[0xB0] = _var32("vbin32", _as_binary)
    t[0xA1] = _var8("str8", _as_string)
    t[0xB1] = _var32("str32", _as_string)
    t[0xA3] = _var8("sym8", _as_symbol)
    t[0xB3] = _var32("sym32", _as_symbol)
    t[0xC0] = _list(False)
    t[0xD0] = _list(True)
    t[0xC1] = _map(False)
    t[0xD1] = _map(True)
    t[0xE0] = _array(False)
    t[0xF0] = _array(True)
    return t


_DECODERS = _build_decoders()


def decode_value(buf: Buffer, offset: int = 0) -> tuple[Any, int]:
    """Decode the value at ``offset``; return it and the offset just after it.

    Raises DecodeError (with the offset and what was expected) on any malformed
    or truncated input.
    """
    end = len(buf)
    if offset < 0 or offset >= end:
        raise DecodeError(f"offset {offset}: expected a value, found end of data")
    fn = _DECODERS[buf[offset]]
    if fn is None:
        raise DecodeError(f"offset {offset}: unknown type constructor 0x{buf[offset]:02x}")
    try:
        return fn(buf, offset + 1, end, 0)
    except DecodeError:
        raise
    except (struct.error, IndexError, ValueError, OverflowError, RecursionError) as exc:
        # Defence in depth: every bound is checked above, but a codec bug must
        # still surface as a protocol error, never as a crash of the caller.
        raise DecodeError(
            f"offset {offset}: malformed value ({type(exc).__name__}: {exc})"
        ) from None


# ----------------------------------------------------------------------------- skipping

_FIXED_WIDTHS: dict[int, int] = {
    0x40: 0, 0x41: 0, 0x42: 0, 0x43: 0, 0x44: 0, 0x45: 0,
    0x50: 1, 0x51: 1, 0x52: 1, 0x53: 1, 0x54: 1, 0x55: 1, 0x56: 1,
    0x60: 2, 0x61: 2,
    0x70: 4, 0x71: 4, 0x72: 4, 0x73: 4, 0x74: 4,
    0x80: 8, 0x81: 8, 0x82: 8, 0x83: 8, 0x84: 8,
    0x94: 16, 0x98: 16,
}  # fmt: skip
_VAR8 = frozenset((0xA0, 0xA1, 0xA3, 0xC0, 0xC1, 0xE0))
_VAR32 = frozenset((0xB0, 0xB1, 0xB3, 0xD0, 0xD1, 0xF0))


def _skip(buf: Buffer, pos: int, end: int, depth: int) -> int:
    if pos >= end:
        raise _short(pos, 1, end, "constructor")
    code = buf[pos]
    pos += 1
    width = _FIXED_WIDTHS.get(code)
    if width is not None:
        stop = pos + width
    elif code in _VAR8:
        if pos >= end:
            raise _short(pos, 1, end, "size")
        stop = pos + 1 + buf[pos]
    elif code in _VAR32:
        if pos + 4 > end:
            raise _short(pos, 4, end, "size")
        stop = pos + 4 + _I.unpack_from(buf, pos)[0]
    elif code == 0x00:
        if depth >= MAX_DEPTH:
            raise DecodeError(f"offset {pos}: values nested deeper than {MAX_DEPTH} levels")
        pos = _skip(buf, pos, end, depth + 1)
        return _skip(buf, pos, end, depth + 1)
    else:
        raise DecodeError(f"offset {pos - 1}: unknown type constructor 0x{code:02x}")
    if stop > end:
        raise _short(pos, stop - pos, end, f"value of type 0x{code:02x}")
    return stop


def skip_value(buf: Buffer, offset: int = 0) -> int:
    """Return the offset just after the value at ``offset``, without building it.

    Checks sizes against the buffer only (the contents of compound values are
    not validated).
    """
    return _skip(buf, offset, len(buf), 0)


# --------------------------------------------------------------------------- encoding

EncodeFn = Callable[[bytearray, Any], None]


def _check(v: int, lo: int, hi: int, what: str) -> None:
    if v < lo or v > hi:
        raise EncodeError(f"{v} is out of range for AMQP {what}")


def _e_null(buf: bytearray, v: Any) -> None:
    buf.append(0x40)


def _e_bool(buf: bytearray, v: Any) -> None:
    buf.append(0x41 if v else 0x42)


def _e_ubyte(buf: bytearray, v: int) -> None:
    _check(v, 0, 0xFF, "ubyte")
    buf += _BB.pack(0x50, v)


def _e_ushort(buf: bytearray, v: int) -> None:
    _check(v, 0, 0xFFFF, "ushort")
    buf.append(0x60)
    buf += _H.pack(v)


def _e_uint(buf: bytearray, v: int) -> None:
    if v == 0:
        buf.append(0x43)
    elif 0 < v < 256:
        buf += _BB.pack(0x52, v)
    else:
        _check(v, 0, 0xFFFFFFFF, "uint")
        buf += _BI.pack(0x70, v)


def _e_ulong(buf: bytearray, v: int) -> None:
    if v == 0:
        buf.append(0x44)
    elif 0 < v < 256:
        buf += _BB.pack(0x53, v)
    else:
        _check(v, 0, 0xFFFFFFFFFFFFFFFF, "ulong")
        buf.append(0x80)
        buf += _Q.pack(v)


def _e_byte(buf: bytearray, v: int) -> None:
    _check(v, -0x80, 0x7F, "byte")
    buf.append(0x51)
    buf += _b.pack(v)


def _e_short(buf: bytearray, v: int) -> None:
    _check(v, -0x8000, 0x7FFF, "short")
    buf.append(0x61)
    buf += _h.pack(v)


def _e_int(buf: bytearray, v: int) -> None:
    if -128 <= v <= 127:
        buf.append(0x54)
        buf += _b.pack(v)
    else:
        _check(v, -0x80000000, 0x7FFFFFFF, "int")
        buf.append(0x71)
        buf += _i.pack(v)


def _e_long(buf: bytearray, v: int) -> None:
    if -128 <= v <= 127:
        buf.append(0x55)
        buf += _b.pack(v)
    else:
        _check(v, -0x8000000000000000, 0x7FFFFFFFFFFFFFFF, "long")
        buf.append(0x81)
        buf += _q.pack(v)


def _e_timestamp(buf: bytearray, v: int) -> None:
    _check(v, -0x8000000000000000, 0x7FFFFFFFFFFFFFFF, "timestamp")
    buf.append(0x83)
    buf += _q.pack(v)


def _e_float(buf: bytearray, v: float) -> None:
    buf.append(0x72)
    try:
        buf += _f.pack(v)
    except OverflowError:
        buf += _f.pack(float("inf") if v > 0 else float("-inf"))


def _e_double(buf: bytearray, v: float) -> None:
    buf.append(0x82)
    buf += _d.pack(v)


def _e_decimal(buf: bytearray, v: bytes) -> None:
    buf.append({4: 0x74, 8: 0x84, 16: 0x94}[len(v)])
    buf += v


def _e_char(buf: bytearray, v: str) -> None:
    if len(v) != 1:
        raise EncodeError(f"AMQP char needs one code point, got {len(v)}")
    buf.append(0x73)
    buf += _I.pack(ord(v))


def _e_uuid(buf: bytearray, v: uuid.UUID) -> None:
    buf.append(0x98)
    buf += v.bytes


def _e_binary(buf: bytearray, v: Buffer) -> None:
    n = len(v) if not isinstance(v, memoryview) else v.nbytes
    if n < 256:
        buf += _BB.pack(0xA0, n)
    else:
        _check(n, 0, 0xFFFFFFFF, "binary length")
        buf += _BI.pack(0xB0, n)
    buf += v


def _e_string(buf: bytearray, v: str) -> None:
    try:
        b = v.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EncodeError(f"string is not encodable as UTF-8: {exc.reason}") from None
    n = len(b)
    if n < 256:
        buf += _BB.pack(0xA1, n)
    else:
        _check(n, 0, 0xFFFFFFFF, "string length")
        buf += _BI.pack(0xB1, n)
    buf += b


def _e_symbol(buf: bytearray, v: str) -> None:
    try:
        b = v.encode("ascii")
    except UnicodeEncodeError:
        raise EncodeError(f"symbol {v!r} is not ASCII") from None
    n = len(b)
    if n < 256:
        buf += _BB.pack(0xA3, n)
    else:
        _check(n, 0, 0xFFFFFFFF, "symbol length")
        buf += _BI.pack(0xB3, n)
    buf += b


def _finish_compound(
    buf: bytearray, start: int, count: int, empty_code: int | None, code8: int, code32: int
) -> None:
    """Fix up a compound header reserved as 3 bytes (code8, size, count) at ``start``."""
    body = len(buf) - start - 3
    if count == 0 and empty_code is not None:
        del buf[start:]
        buf.append(empty_code)
    elif body < 255 and count < 256:
        buf[start] = code8
        buf[start + 1] = body + 1
        buf[start + 2] = count
    else:
        _check(body + 4, 0, 0xFFFFFFFF, "compound size")
        buf[start : start + 3] = _BII.pack(code32, body + 4, count)


def encode_list_into(buf: bytearray, items: Any, encoders: Any = None) -> None:
    """Append a list; ``encoders`` optionally gives a typed encoder per item."""
    start = len(buf)
    buf += b"\xc0\x00\x00"
    count = 0
    if encoders is None:
        for item in items:
            encode_into(buf, item)
            count += 1
    else:
        for item, enc in zip(items, encoders, strict=True):
            enc(buf, item)
            count += 1
    _finish_compound(buf, start, count, 0x45, 0xC0, 0xD0)


def _e_list(buf: bytearray, v: Any) -> None:
    start = len(buf)
    buf += b"\xc0\x00\x00"
    for item in v:
        encode_into(buf, item)
    _finish_compound(buf, start, len(v), 0x45, 0xC0, 0xD0)


def _e_map(buf: bytearray, v: dict[Any, Any] | Map) -> None:
    start = len(buf)
    buf += b"\xc1\x00\x00"
    for key, value in v.items():
        encode_into(buf, key)
        encode_into(buf, value)
    _finish_compound(buf, start, 2 * len(v), None, 0xC1, 0xD1)


def _e_described(buf: bytearray, v: Described) -> None:
    buf.append(0x00)
    encode_into(buf, v.descriptor)
    encode_into(buf, v.value)


# ---- arrays: one constructor, then element bodies without constructors


def _body_fixed(st: struct.Struct, lo: int, hi: int, what: str) -> EncodeFn:
    def enc(buf: bytearray, v: Any) -> None:
        _check(v, lo, hi, what)
        buf += st.pack(v)

    return enc


def _body_bool(buf: bytearray, v: Any) -> None:
    if not isinstance(v, bool):
        raise EncodeError(f"boolean array item {v!r} is not a bool")
    buf.append(1 if v else 0)


def _body_float(buf: bytearray, v: Any) -> None:
    try:
        buf += _f.pack(v)
    except OverflowError:
        buf += _f.pack(float("inf") if v > 0 else float("-inf"))


def _body_double(buf: bytearray, v: Any) -> None:
    buf += _d.pack(v)


def _body_decimal(width: int) -> EncodeFn:
    def enc(buf: bytearray, v: Any) -> None:
        if len(v) != width:
            raise EncodeError(f"decimal array item needs {width} bytes, got {len(v)}")
        buf += v

    return enc


def _body_char(buf: bytearray, v: Any) -> None:
    if len(v) != 1:
        raise EncodeError(f"AMQP char needs one code point, got {len(v)}")
    buf += _I.pack(ord(v))


def _body_uuid(buf: bytearray, v: Any) -> None:
    buf += v.bytes


def _to_bytes(kind: int, v: Any) -> bytes:
    try:
        if kind == 0xB0:
            return bytes(v)
        if kind == 0xB1:
            return v.encode("utf-8")
        return v.encode("ascii")
    except (UnicodeEncodeError, AttributeError, TypeError) as exc:
        raise EncodeError(
            f"array item {v!r} does not fit element type 0x{kind:02x}: {exc}"
        ) from None


def _body_compound32(buf: bytearray, v: Any, kind: int) -> None:
    # Encode the item in its 32-bit form and drop the constructor byte.
    tmp = bytearray()
    if kind == 0xD0:
        start = 0
        tmp += b"\xd0\x00\x00\x00\x00\x00\x00\x00\x00"
        for item in v:
            encode_into(tmp, item)
        count = len(v)
    elif kind == 0xD1:
        start = 0
        tmp += b"\xd1\x00\x00\x00\x00\x00\x00\x00\x00"
        for key, value in v.items():
            encode_into(tmp, key)
            encode_into(tmp, value)
        count = 2 * len(v)
    else:
        if not isinstance(v, Array):
            raise EncodeError(f"array of arrays needs Array items, got {type(v).__name__}")
        _encode_array(tmp, v, wide=True)
        buf += memoryview(tmp)[1:]
        return
    body = len(tmp) - start - 9
    _check(body + 4, 0, 0xFFFFFFFF, "compound size")
    tmp[1:9] = _II.pack(body + 4, count)
    buf += memoryview(tmp)[1:]


_ARRAY_FIXED: dict[int, tuple[int, EncodeFn]] = {
    0x50: (0x50, _body_fixed(_B, 0, 0xFF, "ubyte")),
    0x51: (0x51, _body_fixed(_b, -0x80, 0x7F, "byte")),
    0x60: (0x60, _body_fixed(_H, 0, 0xFFFF, "ushort")),
    0x61: (0x61, _body_fixed(_h, -0x8000, 0x7FFF, "short")),
    0x72: (0x72, _body_float),
    0x82: (0x82, _body_double),
    0x74: (0x74, _body_decimal(4)),
    0x84: (0x84, _body_decimal(8)),
    0x94: (0x94, _body_decimal(16)),
    0x73: (0x73, _body_char),
    0x83: (0x83, _body_fixed(_q, -0x8000000000000000, 0x7FFFFFFFFFFFFFFF, "timestamp")),
    0x98: (0x98, _body_uuid),
    0x56: (0x56, _body_bool),
}

# (canonical type) -> (narrow code, narrow body, wide code, wide body, narrow-fit test)
_ARRAY_INTS: dict[int, tuple[int, EncodeFn, int, EncodeFn, Callable[[int], bool]]] = {
    0x70: (0x52, _body_fixed(_B, 0, 0xFF, "uint"), 0x70, _body_fixed(_I, 0, 0xFFFFFFFF, "uint"),
           lambda v: 0 <= v < 256),
    0x80: (0x53, _body_fixed(_B, 0, 0xFF, "ulong"), 0x80,
           _body_fixed(_Q, 0, 0xFFFFFFFFFFFFFFFF, "ulong"), lambda v: 0 <= v < 256),
    0x71: (0x54, _body_fixed(_b, -0x80, 0x7F, "int"), 0x71,
           _body_fixed(_i, -0x80000000, 0x7FFFFFFF, "int"), lambda v: -128 <= v <= 127),
    0x81: (0x55, _body_fixed(_b, -0x80, 0x7F, "long"), 0x81,
           _body_fixed(_q, -0x8000000000000000, 0x7FFFFFFFFFFFFFFF, "long"),
           lambda v: -128 <= v <= 127),
}  # fmt: skip


def _encode_array(buf: bytearray, v: Array, wide: bool = False) -> None:
    kind = ELEMENT_TYPES.get(v.element_type)
    if kind is None:
        raise EncodeError(f"unknown array element type 0x{v.element_type:02x}")
    items = v.items
    start = len(buf)
    buf += b"\xe0\x00\x00"  # reserved: code, size8, count8
    if v.descriptor is not None:
        buf.append(0x00)
        encode_into(buf, v.descriptor)
    if kind == 0x40:
        if any(item is not None for item in items):
            raise EncodeError("array of null holds a non-null item")
        if len(items) > MAX_ZERO_WIDTH_ITEMS:
            raise EncodeError(
                f"array of {len(items)} nulls exceeds the limit of {MAX_ZERO_WIDTH_ITEMS}"
            )
        buf.append(0x40)
    elif kind in _ARRAY_FIXED:
        code, body = _ARRAY_FIXED[kind]
        buf.append(code)
        for item in items:
            body(buf, item)
    elif kind in _ARRAY_INTS:
        ncode, nbody, wcode, wbody, fits = _ARRAY_INTS[kind]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int):
                raise EncodeError(f"integer array item {item!r} is not an int")
        if all(fits(item) for item in items):
            buf.append(ncode)
            for item in items:
                nbody(buf, item)
        else:
            buf.append(wcode)
            for item in items:
                wbody(buf, item)
    elif kind in (0xB0, 0xB1, 0xB3):
        raw = [_to_bytes(kind, item) for item in items]
        if all(len(b) < 256 for b in raw):
            buf.append(kind - 0x10)  # vbin8 / str8 / sym8
            for b in raw:
                buf.append(len(b))
                buf += b
        else:
            buf.append(kind)
            for b in raw:
                _check(len(b), 0, 0xFFFFFFFF, "array item length")
                buf += _I.pack(len(b))
                buf += b
    elif kind in (0xD0, 0xD1, 0xF0):
        buf.append(kind)
        for item in items:
            _body_compound32(buf, item, kind)
    else:  # pragma: no cover - ELEMENT_TYPES covers every canonical code above
        raise EncodeError(f"unsupported array element type 0x{kind:02x}")
    body = len(buf) - start - 3
    count = len(items)
    if not wide and body < 255 and count < 256:
        buf[start + 1] = body + 1
        buf[start + 2] = count
    else:
        _check(body + 4, 0, 0xFFFFFFFF, "array size")
        buf[start : start + 3] = _BII.pack(0xF0, body + 4, count)


def _e_array(buf: bytearray, v: Array) -> None:
    _encode_array(buf, v)


def _e_composite(buf: bytearray, v: Composite) -> None:
    v._amqp_encode(buf)


_ENCODERS: dict[type, EncodeFn] = {
    type(None): _e_null,
    bool: _e_bool,
    int: _e_long,
    float: _e_double,
    str: _e_string,
    bytes: _e_binary,
    bytearray: _e_binary,
    memoryview: _e_binary,
    list: _e_list,
    tuple: _e_list,
    dict: _e_map,
    uuid.UUID: _e_uuid,
    UByte: _e_ubyte,
    UShort: _e_ushort,
    UInt: _e_uint,
    ULong: _e_ulong,
    Byte: _e_byte,
    Short: _e_short,
    Int: _e_int,
    Long: _e_long,
    Timestamp: _e_timestamp,
    Float: _e_float,
    Decimal32: _e_decimal,
    Decimal64: _e_decimal,
    Decimal128: _e_decimal,
    Char: _e_char,
    Symbol: _e_symbol,
    Array: _e_array,
    Map: _e_map,
    Described: _e_described,
}


def _lookup_encoder(t: type) -> EncodeFn:
    if issubclass(t, Composite):
        enc: EncodeFn = _e_composite
    else:
        for base in t.__mro__[1:]:
            found = _ENCODERS.get(base)
            if found is not None:
                enc = found
                break
        else:
            raise EncodeError(f"cannot encode a {t.__module__}.{t.__qualname__} as an AMQP value")
    _ENCODERS[t] = enc
    return enc


def encode_into(buf: bytearray, value: Any) -> None:
    """Append the AMQP encoding of ``value`` to ``buf``."""
    enc = _ENCODERS.get(type(value))
    if enc is None:
        enc = _lookup_encoder(type(value))
    try:
        enc(buf, value)
    except struct.error as exc:
        raise EncodeError(f"cannot encode {value!r}: {exc}") from None


def encode_value(value: Any) -> bytes:
    """Return the AMQP encoding of ``value``."""
    buf = bytearray()
    encode_into(buf, value)
    return bytes(buf)


# ------------------------------------------------------- typed encoders for composite fields
#
# Composite fields have a declared AMQP type; these encode whatever the caller
# passed (often a plain int or str) as that type, and None as null.


def _opt(enc: EncodeFn, what: str, check: Callable[[Any], bool]) -> EncodeFn:
    def encode(buf: bytearray, v: Any) -> None:
        if v is None:
            buf.append(0x40)
        elif check(v):
            enc(buf, v)
        else:
            raise EncodeError(f"expected {what}, got {type(v).__name__} {v!r}")

    return encode


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_bytes(v: Any) -> bool:
    return isinstance(v, bytes | bytearray | memoryview)


def _e_fields(buf: bytearray, v: Any) -> None:
    # fields / annotations: keys are symbols; plain str keys are promoted.
    if v is None:
        buf.append(0x40)
        return
    if not isinstance(v, dict | Map):
        raise EncodeError(f"expected a map, got {type(v).__name__}")
    start = len(buf)
    buf += b"\xc1\x00\x00"
    for key, value in v.items():
        if type(key) is str:
            _e_symbol(buf, key)
        else:
            encode_into(buf, key)
        encode_into(buf, value)
    _finish_compound(buf, start, 2 * len(v), None, 0xC1, 0xD1)


def _e_symbols(buf: bytearray, v: Any) -> None:
    # multiple="true" symbol fields: one symbol, or an array of symbols.
    if v is None:
        buf.append(0x40)
    elif isinstance(v, str):
        _e_symbol(buf, v)
    elif isinstance(v, Array):
        _encode_array(buf, v)
    elif isinstance(v, list | tuple):
        _encode_array(buf, Array(0xB3, v))
    else:
        raise EncodeError(f"expected symbol(s), got {type(v).__name__}")


def _e_any(buf: bytearray, v: Any) -> None:
    encode_into(buf, v)


TYPED_ENCODERS: dict[str, EncodeFn] = {
    "uint": _opt(_e_uint, "uint", _is_int),
    "ulong": _opt(_e_ulong, "ulong", _is_int),
    "ushort": _opt(_e_ushort, "ushort", _is_int),
    "ubyte": _opt(_e_ubyte, "ubyte", _is_int),
    "bool": _opt(_e_bool, "bool", lambda v: isinstance(v, bool)),
    "string": _opt(_e_string, "string", lambda v: isinstance(v, str)),
    "symbol": _opt(_e_symbol, "symbol", lambda v: isinstance(v, str)),
    "binary": _opt(_e_binary, "binary", _is_bytes),
    "timestamp": _opt(_e_timestamp, "timestamp", _is_int),
    "map": _opt(_e_map, "map", lambda v: isinstance(v, dict | Map)),
    "fields": _e_fields,
    "symbols": _e_symbols,
    "any": _e_any,
}


def encode_typed_into(buf: bytearray, kind: str, value: Any) -> None:
    """Append ``value`` encoded as the declared field type ``kind`` (see TYPED_ENCODERS)."""
    TYPED_ENCODERS[kind](buf, value)
