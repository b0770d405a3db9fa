"""Python representation of the AMQP 1.0 type system.

Plain Python values map to the obvious AMQP types: None -> null, bool -> boolean,
int -> long, float -> double, str -> string, bytes -> binary, list -> list,
dict -> map, uuid.UUID -> uuid. Every other AMQP type has a small wrapper class
here, so that a decoded value re-encodes as the same AMQP type (a uint stays a
uint, a symbol stays a symbol). The integer wrappers subclass int and compare
equal to plain ints; ranges are checked when encoding, not on construction,
so decoding stays cheap.

Because the wrappers compare equal to their plain values, a dict cannot hold
every AMQP map: UInt(1) and Long(1), "a" and Symbol("a"), False and 0 are one
dict key, and lists or maps cannot be keys at all. Decoding returns a plain
dict when it holds every entry, and a ``Map`` (the entries as pairs, in wire
order) when it would not, so no map entry is ever lost.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

__all__ = [
    "UByte",
    "UShort",
    "UInt",
    "ULong",
    "Byte",
    "Short",
    "Int",
    "Long",
    "Float",
    "Decimal32",
    "Decimal64",
    "Decimal128",
    "Char",
    "Timestamp",
    "Symbol",
    "Array",
    "Map",
    "make_map",
    "Described",
    "Composite",
    "as_symbols",
]


class _TypedInt(int):
    __slots__ = ()
    min_value: ClassVar[int]
    max_value: ClassVar[int]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({int(self)})"

    def __str__(self) -> str:
        return int.__repr__(self)


class UByte(_TypedInt):
    """AMQP ubyte: 8-bit unsigned."""

    __slots__ = ()
    min_value, max_value = 0, 0xFF


class UShort(_TypedInt):
    """AMQP ushort: 16-bit unsigned."""

    __slots__ = ()
    min_value, max_value = 0, 0xFFFF


class UInt(_TypedInt):
    """AMQP uint: 32-bit unsigned (handles, delivery ids, windows, credit)."""

    __slots__ = ()
    min_value, max_value = 0, 0xFFFFFFFF


class ULong(_TypedInt):
    """AMQP ulong: 64-bit unsigned (also the numeric descriptor type)."""

    __slots__ = ()
    min_value, max_value = 0, 0xFFFFFFFFFFFFFFFF


class Byte(_TypedInt):
    """AMQP byte: 8-bit signed."""

    __slots__ = ()
    min_value, max_value = -0x80, 0x7F


class Short(_TypedInt):
    """AMQP short: 16-bit signed."""

    __slots__ = ()
    min_value, max_value = -0x8000, 0x7FFF


class Int(_TypedInt):
    """AMQP int: 32-bit signed."""

    __slots__ = ()
    min_value, max_value = -0x80000000, 0x7FFFFFFF


class Long(_TypedInt):
    """AMQP long: 64-bit signed. A plain Python int encodes as long too."""

    __slots__ = ()
    min_value, max_value = -0x8000000000000000, 0x7FFFFFFFFFFFFFFF


class Timestamp(_TypedInt):
    """AMQP timestamp: milliseconds since the Unix epoch, 64-bit signed."""

    __slots__ = ()
    min_value, max_value = -0x8000000000000000, 0x7FFFFFFFFFFFFFFF


_F32 = struct.Struct(">f")


class Float(float):
    """AMQP float: IEEE 754 32-bit. A plain Python float encodes as double.

    The value is rounded to 32-bit precision on construction so that it
    compares equal to itself after a round trip.
    """

    __slots__ = ()

    def __new__(cls, value: Any = 0.0) -> Float:
        v = float(value)
        try:
            v = _F32.unpack(_F32.pack(v))[0]
        except OverflowError:
            v = float("inf") if v > 0 else float("-inf")
        return super().__new__(cls, v)

    def __repr__(self) -> str:
        return f"Float({float(self)!r})"

    def __str__(self) -> str:
        return float.__repr__(self)


class _Decimal(bytes):
    """Decimal types are carried as their opaque IEEE 754 decimal encoding."""

    __slots__ = ()
    width: ClassVar[int]

    def __new__(cls, value: bytes | bytearray | memoryview) -> _Decimal:
        obj = super().__new__(cls, value)
        if len(obj) != cls.width:
            raise ValueError(f"{cls.__name__} needs exactly {cls.width} bytes, got {len(obj)}")
        return obj

    def __repr__(self) -> str:
        return f"{type(self).__name__}({bytes(self)!r})"


class Decimal32(_Decimal):
    __slots__ = ()
    width = 4


class Decimal64(_Decimal):
    __slots__ = ()
    width = 8


class Decimal128(_Decimal):
    __slots__ = ()
    width = 16


class Char(str):
    """AMQP char: a single Unicode code point (UTF-32BE on the wire)."""

    __slots__ = ()

    def __new__(cls, value: str) -> Char:
        if len(value) != 1:
            raise ValueError(f"Char needs exactly one code point, got {len(value)}")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"Char({str(self)!r})"


class Symbol(str):
    """AMQP symbol: an ASCII name (capabilities, error conditions, map keys)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Symbol({str(self)!r})"


class Array:
    """AMQP array: items all of one type, encoded with a single constructor.

    ``element_type`` is a canonical constructor code (see
    ``constants.ELEMENT_TYPES``: 0x70 uint, 0xB3 symbol, 0xB1 string, 0xD0 list,
    0xF0 array, ...); decoding normalises whatever width the bytes used to it,
    encoding picks the narrowest width that fits every item. ``descriptor`` is
    set for an array of described values; ``items`` then hold the undescribed
    values. Items decode as the same wrapper types as single values.
    """

    __slots__ = ("element_type", "items", "descriptor")
    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self, element_type: int, items: Iterable[Any] = (), descriptor: Any = None
    ) -> None:
        self.element_type = element_type
        self.items = list(items)
        self.descriptor = descriptor

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Array):
            return NotImplemented
        return (
            self.element_type == other.element_type
            and self.descriptor == other.descriptor
            and self.items == other.items
        )

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]

    def __repr__(self) -> str:
        d = f", descriptor={self.descriptor!r}" if self.descriptor is not None else ""
        return f"Array(0x{self.element_type:02x}, {self.items!r}{d})"


class Map(Mapping[Any, Any]):
    """An AMQP map that a dict cannot hold: keys equal in Python but distinct in
    AMQP (UInt(1) and Long(1), "a" and Symbol("a")), a repeated key, or a key
    that is not hashable (a list, map or array).

    ``pairs`` holds the (key, value) entries in wire order and encodes back to
    them exactly. It reads like a mapping: ``m[k]`` and ``m.get(k)`` return the
    value of the first entry whose key equals ``k`` (Python equality), and
    ``items()`` / ``keys()`` / ``values()`` / ``len()`` see every entry.
    Equality compares the entries in order.
    """

    __slots__ = ("pairs",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, pairs: Iterable[tuple[Any, Any]] = ()) -> None:
        self.pairs: list[tuple[Any, Any]] = [(k, v) for k, v in pairs]

    def __getitem__(self, key: Any) -> Any:
        for k, v in self.pairs:
            try:
                if k == key:
                    return v
            except TypeError:  # a key type that refuses comparison
                continue
        raise KeyError(key)

    def __iter__(self) -> Iterator[Any]:
        return (k for k, _ in self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def items(self) -> list[tuple[Any, Any]]:  # type: ignore[override]
        return list(self.pairs)

    def keys(self) -> list[Any]:  # type: ignore[override]
        return [k for k, _ in self.pairs]

    def values(self) -> list[Any]:  # type: ignore[override]
        return [v for _, v in self.pairs]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Map):
            return NotImplemented
        return self.pairs == other.pairs

    def __repr__(self) -> str:
        return f"Map({self.pairs!r})"


def make_map(pairs: Iterable[tuple[Any, Any]]) -> dict[Any, Any] | Map:
    """A dict of ``pairs`` when it keeps every entry, else a ``Map`` of them."""
    pairs = list(pairs)
    result: dict[Any, Any] = {}
    try:
        for k, v in pairs:
            result.setdefault(k, v)
    except TypeError:
        return Map(pairs)
    return result if len(result) == len(pairs) else Map(pairs)


class Described:
    """A described value whose descriptor this library does not interpret.

    ``descriptor`` keeps the type it arrived with (``ULong`` code or ``Symbol``
    name), ``value`` keeps its types, so it re-encodes as it came.
    """

    __slots__ = ("descriptor", "value")

    def __init__(self, descriptor: Any, value: Any) -> None:
        self.descriptor = descriptor
        self.value = value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Described):
            return NotImplemented
        return self.descriptor == other.descriptor and self.value == other.value

    def __hash__(self) -> int:
        return hash((self.descriptor, self.value))

    def __repr__(self) -> str:
        d = self.descriptor
        ds = f"0x{int(d):x}" if isinstance(d, int) and not isinstance(d, bool) else repr(d)
        return f"Described({ds}, {self.value!r})"


class Composite:
    """Base of the spec's composite types (performatives, termini, outcomes,
    message sections): each knows its descriptor and encodes itself."""

    __slots__ = ()
    descriptor_code: ClassVar[int]

    def _amqp_encode(self, buf: bytearray) -> None:
        raise NotImplementedError


def as_symbols(value: Any) -> tuple[Symbol, ...]:
    """Normalise a ``multiple="true"`` symbol field (None, one symbol, an array
    or a list of them) to a tuple of symbols, for reading; the field itself
    keeps what was received."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (Symbol(value),)
    return tuple(Symbol(v) for v in value if isinstance(v, str))
