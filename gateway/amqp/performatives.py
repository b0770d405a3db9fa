"""AMQP 1.0 composite types: performatives, SASL frames, termini, delivery states, error.

Each class is a slotted dataclass whose fields are the spec's fields in order
(snake_case names, spec defaults). A field left at None (or at its default)
at the end of the list is omitted on the wire, as proton does. Encoding uses
each field's declared AMQP type, so ``Flow(link_credit=100)`` sends a uint.

Decoding accepts any list length: missing trailing fields take their
defaults, and fields beyond the ones this version of the spec defines are kept
in ``_extra`` and re-encoded, so relaying a performative loses nothing.
Fields declared ``multiple="true"`` (capabilities, locales, SASL mechanisms)
keep what was received (one Symbol or an Array); read them with
``types.as_symbols``.

Treat instances as values: build new ones with ``dataclasses.replace``.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from .codec import TYPED_ENCODERS, encode_into
from .constants import DESCRIPTOR_CODES
from .errors import DecodeError, EncodeError
from .types import Array, Composite, Described, Map, Symbol, UByte, UInt, ULong, UShort

__all__ = [
    "Performative",
    "Open",
    "Begin",
    "Attach",
    "Flow",
    "Transfer",
    "Disposition",
    "Detach",
    "End",
    "Close",
    "SaslMechanisms",
    "SaslInit",
    "SaslChallenge",
    "SaslResponse",
    "SaslOutcome",
    "Error",
    "Source",
    "Target",
    "Received",
    "Accepted",
    "Rejected",
    "Released",
    "Modified",
    "DeliveryState",
    "AMQP_PERFORMATIVES",
    "SASL_PERFORMATIVES",
    "decode_performative",
    "decode_composite",
    "decode_state",
    "composite_class",
]


# ----------------------------------------------------------------- field declarations


def _f(kind: str, default: Any = None, *, mandatory: bool = False) -> Any:
    return field(default=default, metadata={"kind": kind, "mandatory": mandatory})


_EXTRA = field(default=(), repr=False, metadata={"kind": "extra"})


_REGISTRY: dict[Any, type[_CompositeBase]] = {}


class _FieldSpec:
    __slots__ = ("name", "kind", "default", "mandatory", "encode", "convert")

    def __init__(self, name: str, kind: str, default: Any, mandatory: bool) -> None:
        self.name = name
        self.kind = kind
        self.default = default
        self.mandatory = mandatory
        self.encode = _FIELD_ENCODERS[kind]
        self.convert = _FIELD_CONVERTERS[kind]


class _CompositeBase(Composite):
    """Encoding and decoding shared by every composite dataclass below."""

    __slots__ = ()
    descriptor_code: ClassVar[int]
    _spec: ClassVar[tuple[_FieldSpec, ...]]
    _extra: tuple[Any, ...]

    def _amqp_encode(self, buf: bytearray) -> None:
        spec = self._spec
        values = [getattr(self, s.name) for s in spec]
        extra = self._extra
        n = len(spec)
        if not extra:
            # Omit trailing fields that are null or at their spec default.
            while n:
                s = spec[n - 1]
                v = values[n - 1]
                if v is None or (
                    not s.mandatory
                    and s.default is not None
                    and v == s.default
                    and type(v) is not Described
                ):
                    n -= 1
                else:
                    break
        buf += b"\x00\x53"
        buf.append(self.descriptor_code)
        start = len(buf)
        buf += b"\xc0\x00\x00"
        for i in range(n):
            s = spec[i]
            v = values[i]
            if v is None and s.mandatory:
                raise EncodeError(f"{type(self).__name__}.{s.name} is mandatory")
            s.encode(buf, v)
        for v in extra:
            encode_into(buf, v)
        count = n + len(extra)
        body = len(buf) - start - 3
        if count == 0:
            del buf[start:]
            buf.append(0x45)
        elif body < 255 and count < 256:
            buf[start + 1] = body + 1
            buf[start + 2] = count
        else:
            buf[start : start + 3] = (
                b"\xd0" + (body + 4).to_bytes(4, "big") + count.to_bytes(4, "big")
            )

    def to_described(self) -> Described:
        """The generic described-list form (numeric descriptor)."""
        from .codec import decode_value

        buf = bytearray()
        self._amqp_encode(buf)
        value, _ = decode_value(buf)
        return value

    @classmethod
    def _from_list(cls, items: list[Any]) -> Any:
        spec = cls._spec
        name = cls.__name__
        args = []
        for i, s in enumerate(spec):
            v = items[i] if i < len(items) else None
            if v is None:
                if s.mandatory:
                    raise DecodeError(f"{name}: mandatory field {s.name.replace('_', '-')} is null")
                args.append(s.default)
            else:
                args.append(s.convert(v, name, s.name))
        extra = tuple(items[len(spec) :])
        return cls(*args, extra) if extra else cls(*args)


def _composite(code: int):  # type: ignore[no-untyped-def]
    def register(cls: type[_CompositeBase]) -> type[_CompositeBase]:
        cls.descriptor_code = code
        spec = []
        for f in fields(cls):  # type: ignore[arg-type]
            kind = f.metadata.get("kind")
            if kind == "extra":
                continue
            default = None if f.default is MISSING else f.default
            spec.append(_FieldSpec(f.name, kind, default, f.metadata.get("mandatory", False)))
        cls._spec = tuple(spec)
        _REGISTRY[code] = cls
        _REGISTRY[ULong(code)] = cls
        for sym, c in DESCRIPTOR_CODES.items():
            if c == code:
                _REGISTRY[Symbol(sym)] = cls
        return cls

    return register


# ------------------------------------------------------------------- field conversion


def _bad(owner: str, name: str, what: str, v: Any) -> DecodeError:
    return DecodeError(
        f"{owner}: field {name.replace('_', '-')} must be {what}, got {type(v).__name__} {v!r:.60}"
    )


def _int_conv(wrapper: type[int], lo: int, hi: int, what: str):  # type: ignore[no-untyped-def]
    def convert(v: Any, owner: str, name: str) -> Any:
        if type(v) is wrapper:
            return v
        if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi:
            return wrapper(v)
        raise _bad(owner, name, what, v)

    return convert


def _bool_conv(v: Any, owner: str, name: str) -> Any:
    if isinstance(v, bool):
        return v
    raise _bad(owner, name, "a boolean", v)


def _str_conv(v: Any, owner: str, name: str) -> Any:
    if isinstance(v, str):
        return v
    raise _bad(owner, name, "a string", v)


def _sym_conv(v: Any, owner: str, name: str) -> Any:
    if isinstance(v, str):
        return v if type(v) is Symbol else Symbol(v)
    raise _bad(owner, name, "a symbol", v)


def _bin_conv(v: Any, owner: str, name: str) -> Any:
    if isinstance(v, bytes):
        return v
    raise _bad(owner, name, "binary", v)


def _tag_conv(v: Any, owner: str, name: str) -> Any:
    if isinstance(v, bytes) and len(v) <= 32:
        return v
    raise _bad(owner, name, "binary of at most 32 bytes", v)


def _e_tag(buf: bytearray, v: Any) -> None:
    if v is not None and len(v) > 32:
        raise EncodeError(f"delivery tag of {len(v)} bytes exceeds the 32-byte limit")
    TYPED_ENCODERS["binary"](buf, v)


def _map_conv(v: Any, owner: str, name: str) -> Any:
    if isinstance(v, dict | Map):
        return v
    raise _bad(owner, name, "a map", v)


def _symbols_conv(v: Any, owner: str, name: str) -> Any:
    if isinstance(v, str):
        return v if type(v) is Symbol else Symbol(v)
    if isinstance(v, Array) and all(isinstance(x, str) for x in v.items):
        return v
    raise _bad(owner, name, "a symbol or an array of symbols", v)


def _any_conv(v: Any, owner: str, name: str) -> Any:
    return v


def _ts_conv(v: Any, owner: str, name: str) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    raise _bad(owner, name, "a timestamp", v)


def _typed_composite_conv(expected: tuple[int, ...], what: str, keep_unknown: bool):  # type: ignore[no-untyped-def]
    def convert(v: Any, owner: str, name: str) -> Any:
        if isinstance(v, _CompositeBase):
            return v
        if not isinstance(v, Described):
            raise _bad(owner, name, what, v)
        cls = _REGISTRY.get(v.descriptor) if _hashable(v.descriptor) else None
        if cls is not None and cls.descriptor_code in expected:
            if not isinstance(v.value, list):
                raise _bad(owner, name, f"{what} (a described list)", v.value)
            return cls._from_list(v.value)
        if keep_unknown:
            return v
        raise _bad(owner, name, what, v)

    return convert


def _hashable(v: Any) -> bool:
    try:
        hash(v)
    except TypeError:
        return False
    return True


_STATE_CODES = (0x23, 0x24, 0x25, 0x26, 0x27)
_OUTCOME_CODES = (0x24, 0x25, 0x26, 0x27)

_FIELD_CONVERTERS = {
    "uint": _int_conv(UInt, 0, 0xFFFFFFFF, "a uint"),
    "ulong": _int_conv(ULong, 0, 0xFFFFFFFFFFFFFFFF, "a ulong"),
    "ushort": _int_conv(UShort, 0, 0xFFFF, "a ushort"),
    "ubyte": _int_conv(UByte, 0, 0xFF, "a ubyte"),
    "bool": _bool_conv,
    "string": _str_conv,
    "symbol": _sym_conv,
    "binary": _bin_conv,
    "delivery-tag": _tag_conv,
    "map": _map_conv,
    "fields": _map_conv,
    "symbols": _symbols_conv,
    "timestamp": _ts_conv,
    "any": _any_conv,
    # delivery-state: known states become classes; others (transactional) stay Described
    "state": _typed_composite_conv(_STATE_CODES, "a delivery state", True),
    "outcome": _typed_composite_conv(_OUTCOME_CODES, "an outcome", True),
    "error": _typed_composite_conv((0x1D,), "an error", False),
    "source": _typed_composite_conv((0x28,), "a source", False),
    # a target may also be a transaction coordinator: kept as Described
    "target": _typed_composite_conv((0x29,), "a target", True),
}

_FIELD_ENCODERS = dict(TYPED_ENCODERS)
_FIELD_ENCODERS["delivery-tag"] = _e_tag
for _kind in ("state", "outcome", "error", "source", "target"):
    _FIELD_ENCODERS[_kind] = TYPED_ENCODERS["any"]


# --------------------------------------------------------------------------- base types


class Performative(_CompositeBase):
    """A frame body: one of the nine transport performatives or the five SASL frames."""

    __slots__ = ()


@_composite(0x1D)
@dataclass(slots=True)
class Error(_CompositeBase):
    condition: Symbol | str | None = _f("symbol", mandatory=True)
    description: str | None = _f("string")
    info: dict[Any, Any] | None = _f("fields")
    _extra: tuple[Any, ...] = _EXTRA


# ----------------------------------------------------------------------- delivery states


@_composite(0x23)
@dataclass(slots=True)
class Received(_CompositeBase):
    section_number: int | None = _f("uint", mandatory=True)
    section_offset: int | None = _f("ulong", mandatory=True)
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x24)
@dataclass(slots=True)
class Accepted(_CompositeBase):
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x25)
@dataclass(slots=True)
class Rejected(_CompositeBase):
    error: Error | None = _f("error")
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x26)
@dataclass(slots=True)
class Released(_CompositeBase):
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x27)
@dataclass(slots=True)
class Modified(_CompositeBase):
    delivery_failed: bool = _f("bool", False)
    undeliverable_here: bool = _f("bool", False)
    message_annotations: dict[Any, Any] | None = _f("fields")
    _extra: tuple[Any, ...] = _EXTRA


DeliveryState = Received | Accepted | Rejected | Released | Modified | Described


# -------------------------------------------------------------------------------- termini


@_composite(0x28)
@dataclass(slots=True)
class Source(_CompositeBase):
    address: Any = _f("any")
    durable: int = _f("uint", UInt(0))
    expiry_policy: Symbol | str = _f("symbol", Symbol("session-end"))
    timeout: int = _f("uint", UInt(0))
    dynamic: bool = _f("bool", False)
    dynamic_node_properties: dict[Any, Any] | None = _f("fields")
    distribution_mode: Symbol | str | None = _f("symbol")
    filter: dict[Any, Any] | None = _f("map")
    default_outcome: Any = _f("outcome")
    outcomes: Symbol | Array | None = _f("symbols")
    capabilities: Symbol | Array | None = _f("symbols")
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x29)
@dataclass(slots=True)
class Target(_CompositeBase):
    address: Any = _f("any")
    durable: int = _f("uint", UInt(0))
    expiry_policy: Symbol | str = _f("symbol", Symbol("session-end"))
    timeout: int = _f("uint", UInt(0))
    dynamic: bool = _f("bool", False)
    dynamic_node_properties: dict[Any, Any] | None = _f("fields")
    capabilities: Symbol | Array | None = _f("symbols")
    _extra: tuple[Any, ...] = _EXTRA


# ------------------------------------------------------------------- transport (2.7)


@_composite(0x10)
@dataclass(slots=True)
class Open(Performative):
    container_id: str | None = _f("string", mandatory=True)
    hostname: str | None = _f("string")
    max_frame_size: int = _f("uint", UInt(4294967295))
    channel_max: int = _f("ushort", UShort(65535))
    idle_time_out: int | None = _f("uint")
    outgoing_locales: Symbol | Array | None = _f("symbols")
    incoming_locales: Symbol | Array | None = _f("symbols")
    offered_capabilities: Symbol | Array | None = _f("symbols")
    desired_capabilities: Symbol | Array | None = _f("symbols")
    properties: dict[Any, Any] | None = _f("fields")
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x11)
@dataclass(slots=True)
class Begin(Performative):
    remote_channel: int | None = _f("ushort")
    next_outgoing_id: int | None = _f("uint", mandatory=True)
    incoming_window: int | None = _f("uint", mandatory=True)
    outgoing_window: int | None = _f("uint", mandatory=True)
    handle_max: int = _f("uint", UInt(4294967295))
    offered_capabilities: Symbol | Array | None = _f("symbols")
    desired_capabilities: Symbol | Array | None = _f("symbols")
    properties: dict[Any, Any] | None = _f("fields")
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x12)
@dataclass(slots=True)
class Attach(Performative):
    name: str | None = _f("string", mandatory=True)
    handle: int | None = _f("uint", mandatory=True)
    role: bool | None = _f("bool", mandatory=True)
    snd_settle_mode: int = _f("ubyte", UByte(2))
    rcv_settle_mode: int = _f("ubyte", UByte(0))
    source: Source | Described | None = _f("source")
    target: Target | Described | None = _f("target")
    unsettled: dict[Any, Any] | None = _f("map")
    incomplete_unsettled: bool = _f("bool", False)
    initial_delivery_count: int | None = _f("uint")
    max_message_size: int | None = _f("ulong")
    offered_capabilities: Symbol | Array | None = _f("symbols")
    desired_capabilities: Symbol | Array | None = _f("symbols")
    properties: dict[Any, Any] | None = _f("fields")
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x13)
@dataclass(slots=True)
class Flow(Performative):
    next_incoming_id: int | None = _f("uint")
    incoming_window: int | None = _f("uint", mandatory=True)
    next_outgoing_id: int | None = _f("uint", mandatory=True)
    outgoing_window: int | None = _f("uint", mandatory=True)
    handle: int | None = _f("uint")
    delivery_count: int | None = _f("uint")
    link_credit: int | None = _f("uint")
    available: int | None = _f("uint")
    drain: bool = _f("bool", False)
    echo: bool = _f("bool", False)
    properties: dict[Any, Any] | None = _f("fields")
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x14)
@dataclass(slots=True)
class Transfer(Performative):
    handle: int | None = _f("uint", mandatory=True)
    delivery_id: int | None = _f("uint")
    delivery_tag: bytes | None = _f("delivery-tag")
    message_format: int | None = _f("uint")
    settled: bool | None = _f("bool")
    more: bool = _f("bool", False)
    rcv_settle_mode: int | None = _f("ubyte")
    state: Any = _f("state")
    resume: bool = _f("bool", False)
    aborted: bool = _f("bool", False)
    batchable: bool = _f("bool", False)
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x15)
@dataclass(slots=True)
class Disposition(Performative):
    role: bool | None = _f("bool", mandatory=True)
    first: int | None = _f("uint", mandatory=True)
    last: int | None = _f("uint")
    settled: bool = _f("bool", False)
    state: Any = _f("state")
    batchable: bool = _f("bool", False)
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x16)
@dataclass(slots=True)
class Detach(Performative):
    handle: int | None = _f("uint", mandatory=True)
    closed: bool = _f("bool", False)
    error: Error | None = _f("error")
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x17)
@dataclass(slots=True)
class End(Performative):
    error: Error | None = _f("error")
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x18)
@dataclass(slots=True)
class Close(Performative):
    error: Error | None = _f("error")
    _extra: tuple[Any, ...] = _EXTRA


# ------------------------------------------------------------------------- SASL (5.3.3)


@_composite(0x40)
@dataclass(slots=True)
class SaslMechanisms(Performative):
    sasl_server_mechanisms: Symbol | Array | None = _f("symbols", mandatory=True)
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x41)
@dataclass(slots=True)
class SaslInit(Performative):
    mechanism: Symbol | str | None = _f("symbol", mandatory=True)
    initial_response: bytes | None = field(
        default=None, repr=False, metadata={"kind": "binary", "mandatory": False}
    )  # holds the PLAIN password: kept out of repr
    hostname: str | None = _f("string")
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x42)
@dataclass(slots=True)
class SaslChallenge(Performative):
    challenge: bytes | None = _f("binary", mandatory=True)
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x43)
@dataclass(slots=True)
class SaslResponse(Performative):
    response: bytes | None = field(
        default=None, repr=False, metadata={"kind": "binary", "mandatory": True}
    )
    _extra: tuple[Any, ...] = _EXTRA


@_composite(0x44)
@dataclass(slots=True)
class SaslOutcome(Performative):
    code: int | None = _f("ubyte", mandatory=True)
    additional_data: bytes | None = _f("binary")
    _extra: tuple[Any, ...] = _EXTRA


AMQP_PERFORMATIVES: dict[int, type[Performative]] = {
    c: _REGISTRY[c]
    for c in range(0x10, 0x19)  # type: ignore[misc]
}
SASL_PERFORMATIVES: dict[int, type[Performative]] = {
    c: _REGISTRY[c]
    for c in range(0x40, 0x45)  # type: ignore[misc]
}


# ------------------------------------------------------------------------------ decoding


def composite_class(descriptor: Any) -> type[_CompositeBase] | None:
    """The class for a descriptor (int code, ULong or Symbol name), or None."""
    try:
        return _REGISTRY.get(descriptor)
    except TypeError:
        return None


def decode_composite(value: Any) -> Any:
    """Turn a Described of a type this module knows into its class; return
    anything else unchanged."""
    if type(value) is not Described:
        return value
    cls = composite_class(value.descriptor)
    if cls is None:
        return value
    if not isinstance(value.value, list):
        raise DecodeError(
            f"{cls.__name__}: expected a described list, got {type(value.value).__name__}"
        )
    return cls._from_list(value.value)


def decode_state(value: Any) -> Any:
    """A delivery-state field value: Received/Accepted/... or Described as received."""
    if value is None:
        return None
    return _FIELD_CONVERTERS["state"](value, "delivery", "state")


def decode_performative(described: Any) -> Performative:
    """Decode a frame body (a Described from ``codec.decode_value``) into a
    Performative. Unknown descriptors and non-performatives raise DecodeError."""
    if type(described) is not Described:
        raise DecodeError(f"frame body must be a described list, got {type(described).__name__}")
    cls = composite_class(described.descriptor)
    if cls is None or not issubclass(cls, Performative):
        raise DecodeError(f"unknown performative descriptor {described.descriptor!r:.60}")
    if not isinstance(described.value, list):
        raise DecodeError(
            f"{cls.__name__}: expected a described list, got {type(described.value).__name__}"
        )
    return cls._from_list(described.value)  # type: ignore[no-any-return]
