"""Performatives, SASL frames, termini, delivery states, error: round trips,
declared field types, defaults, extra fields, and proton's view of our bytes."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.amqp import performatives as P
from gateway.amqp.codec import decode_value, encode_value
from gateway.amqp.errors import DecodeError, EncodeError
from gateway.amqp.types import Array, Described, Long, Symbol, Timestamp, UByte, UInt, ULong, UShort

from .test_codec_strategies import proton_decode, proton_values, typed_equal, typed_values

ALL_CLASSES = [
    P.Open, P.Begin, P.Attach, P.Flow, P.Transfer, P.Disposition, P.Detach, P.End, P.Close,
    P.SaslMechanisms, P.SaslInit, P.SaslChallenge, P.SaslResponse, P.SaslOutcome,
    P.Error, P.Source, P.Target, P.Received, P.Accepted, P.Rejected, P.Released, P.Modified,
]  # fmt: skip

DESCRIPTORS = {
    P.Open: 0x10, P.Begin: 0x11, P.Attach: 0x12, P.Flow: 0x13, P.Transfer: 0x14,
    P.Disposition: 0x15, P.Detach: 0x16, P.End: 0x17, P.Close: 0x18, P.Error: 0x1D,
    P.Received: 0x23, P.Accepted: 0x24, P.Rejected: 0x25, P.Released: 0x26, P.Modified: 0x27,
    P.Source: 0x28, P.Target: 0x29, P.SaslMechanisms: 0x40, P.SaslInit: 0x41,
    P.SaslChallenge: 0x42, P.SaslResponse: 0x43, P.SaslOutcome: 0x44,
}  # fmt: skip

# Declared AMQP type of each field kind, as it must come back from the wire.
KIND_TYPES = {"uint": UInt, "ulong": ULong, "ushort": UShort, "ubyte": UByte, "bool": bool,
              "binary": bytes, "delivery-tag": bytes, "timestamp": Timestamp}  # fmt: skip

# ------------------------------------------------------------------------ strategies

_sym = st.text(alphabet="abcdefghijklmnopqrstuvwxyz:-._", min_size=1, max_size=30)
_symbols_field = st.one_of(
    st.none(),
    _sym.map(Symbol),
    st.lists(_sym.map(Symbol), max_size=4).map(lambda xs: Array(0xB3, xs)),
)
_fields_map = st.one_of(st.none(), st.dictionaries(_sym.map(Symbol), proton_values, max_size=3))
_errors = st.builds(
    P.Error,
    _sym.map(Symbol),
    st.one_of(st.none(), st.text(max_size=50)),
    _fields_map,
)
_outcomes = st.one_of(
    st.builds(P.Accepted),
    st.builds(P.Released),
    st.builds(P.Rejected, st.one_of(st.none(), _errors)),
    st.builds(P.Modified, st.booleans(), st.booleans(), _fields_map),
)
_states = st.one_of(
    st.none(),
    _outcomes,
    st.builds(P.Received, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
    # transactional-state: not interpreted, kept as Described
    st.builds(
        lambda txn: Described(ULong(0x34), [txn, Described(ULong(0x24), [])]), st.binary(max_size=8)
    ),
)

STRATEGIES: dict[str, st.SearchStrategy] = {
    "uint": st.integers(0, 2**32 - 1),
    "ulong": st.integers(0, 2**64 - 1),
    "ushort": st.integers(0, 2**16 - 1),
    "ubyte": st.integers(0, 255),
    "bool": st.booleans(),
    "string": st.text(max_size=40),
    "symbol": _sym.map(Symbol),
    "binary": st.binary(max_size=40),
    "delivery-tag": st.binary(max_size=32),
    "timestamp": st.integers(-(2**63), 2**63 - 1),
    "map": st.one_of(st.none(), st.dictionaries(st.binary(max_size=4), proton_values, max_size=3)),
    "fields": _fields_map,
    "symbols": _symbols_field,
    "any": st.one_of(st.none(), st.text(max_size=40)),
    "state": _states,
    "outcome": st.one_of(st.none(), _outcomes),
    "error": st.one_of(st.none(), _errors),
}


def _terminus(cls):
    return st.builds(
        cls, **{s.name: _field_strategy(s) for s in cls._spec if s.kind not in ("source", "target")}
    )


def _field_strategy(spec):
    if spec.kind == "source":
        return st.one_of(st.none(), _terminus(P.Source))
    if spec.kind == "target":
        return st.one_of(
            st.none(),
            _terminus(P.Target),
            st.just(Described(ULong(0x30), [Array(0xB3, [Symbol("amqp:local-transactions")])])),
        )
    base = STRATEGIES[spec.kind]
    if spec.mandatory:
        return base.filter(lambda v: v is not None)
    return st.one_of(st.none(), base) if spec.default is None else base


def instances(cls):
    return st.builds(cls, **{s.name: _field_strategy(s) for s in cls._spec})


any_composite = st.one_of(*(instances(c) for c in ALL_CLASSES))


def _assert_declared_types(obj):
    for s in obj._spec:
        v = getattr(obj, s.name)
        if v is None:
            continue
        if s.kind in KIND_TYPES:
            assert type(v) is KIND_TYPES[s.kind], (type(obj).__name__, s.name, v)
        elif s.kind == "symbol":
            assert type(v) is Symbol
        elif s.kind in ("source", "target", "error", "state", "outcome"):
            assert isinstance(v, P._CompositeBase | Described)
            if isinstance(v, P._CompositeBase):
                _assert_declared_types(v)


# ------------------------------------------------------------------------------ tests


@given(any_composite)
@settings(max_examples=500, deadline=None)
def test_round_trip_every_composite(obj):
    encoded = encode_value(obj)
    described, end = decode_value(encoded)
    assert end == len(encoded)
    decoded = P.decode_composite(described)
    assert type(decoded) is type(obj)
    assert decoded == obj
    _assert_declared_types(decoded)
    # canonical: re-encoding what we decoded gives the same bytes
    assert encode_value(decoded) == encoded
    if isinstance(obj, P.Performative):
        assert P.decode_performative(described) == obj


@given(any_composite)
@settings(max_examples=300, deadline=None)
def test_proton_reads_the_declared_types(obj):
    # proton's codec sees every field with the spec's declared AMQP type
    encoded = encode_value(obj)
    theirs = proton_decode(encoded)
    ours = decode_value(encoded)[0]
    assert typed_equal(theirs, ours)
    assert theirs.descriptor == DESCRIPTORS[type(obj)]
    for s, v in zip(obj._spec, theirs.value, strict=False):
        if v is not None and s.kind in KIND_TYPES:
            assert type(v) is KIND_TYPES[s.kind], (type(obj).__name__, s.name, v)
        if v is not None and s.kind == "symbol":
            assert type(v) is Symbol


def test_plain_ints_encode_as_declared_types():
    flow = P.Flow(next_incoming_id=1, incoming_window=2048, next_outgoing_id=0,
                  outgoing_window=2048, handle=0, delivery_count=0, link_credit=100)  # fmt: skip
    assert (
        encode_value(flow).hex()
        == "005313c01207" + "5201" + "7000000800" + "43" + "7000000800" + "43" + "43" + "5264"
    )
    attach = P.Attach(name="l", handle=3, role=True, snd_settle_mode=1, max_message_size=1024)
    fields = decode_value(encode_value(attach))[0].value
    assert [type(x) for x in fields[:5]] == [str, UInt, bool, UByte, UByte]
    assert type(fields[10]) is ULong
    assert (
        type(decode_value(encode_value(P.Open(container_id="c", channel_max=9)))[0].value[3])
        is UShort
    )


def test_trailing_nulls_and_defaults_are_omitted_like_proton():
    assert encode_value(P.Accepted()).hex() == "00532445"
    assert encode_value(P.Close()).hex() == "00531845"
    assert encode_value(P.Detach(handle=0, closed=True)).hex() == "005316c0030243" + "41"
    assert encode_value(P.Detach(handle=0)).hex() == "005316c0020143"
    # defaults before a set field are written out explicitly
    src = P.Source(address="a", dynamic=True)
    assert decode_value(encode_value(src))[0].value == ["a", 0, "session-end", 0, True]
    assert encode_value(P.Begin(next_outgoing_id=0, incoming_window=5, outgoing_window=5,
                                handle_max=4294967295)).hex() == "005311c00704" + "40435205" + "5205"  # fmt: skip


def test_missing_trailing_fields_take_spec_defaults():
    attach = P.decode_performative(Described(ULong(0x12), ["x", UInt(1), False]))
    assert attach.snd_settle_mode == 2 and attach.rcv_settle_mode == 0
    assert attach.source is None and attach.incomplete_unsettled is False
    opened = P.decode_performative(Described(ULong(0x10), ["c"]))
    assert opened.max_frame_size == 4294967295 and opened.channel_max == 65535
    begin = P.decode_performative(Described(ULong(0x11), [None, UInt(0), UInt(1), UInt(1)]))
    assert begin.handle_max == 4294967295 and begin.remote_channel is None
    # explicit nulls mean the default too
    flow = P.decode_performative(
        Described(
            ULong(0x13), [None, UInt(1), UInt(0), UInt(1), None, None, None, None, None, None]
        )
    )
    assert flow.drain is False and flow.echo is False
    src = P.decode_composite(Described(ULong(0x28), []))
    assert src.expiry_policy == "session-end" and type(src.expiry_policy) is Symbol


def test_extra_trailing_fields_are_kept_and_re_encoded():
    raw = Described(ULong(0x18), [None, Symbol("future-field"), UInt(7)])
    close = P.decode_performative(raw)
    assert close.error is None and close._extra == (Symbol("future-field"), UInt(7))
    assert typed_equal(decode_value(encode_value(close))[0], raw)
    accepted = P.decode_composite(Described(ULong(0x24), ["x"]))
    assert accepted == P.Accepted(_extra=("x",)) and accepted != P.Accepted()


def test_multiple_symbol_fields_keep_what_was_received():
    one = P.decode_performative(
        Described(ULong(0x10), ["c", None, None, None, None, None, None, Symbol("ANONYMOUS-RELAY")])
    )
    assert type(one.offered_capabilities) is Symbol
    assert encode_value(one) == encode_value(
        Described(
            ULong(0x10),
            [
                "c",
                None,
                UInt(4294967295),
                UShort(65535),
                None,
                None,
                None,
                Symbol("ANONYMOUS-RELAY"),
            ],
        )
    )
    arr = Array(0xB3, [Symbol("a"), Symbol("b")])
    many = P.decode_performative(Described(ULong(0x40), [arr]))
    assert many.sasl_server_mechanisms == arr
    assert encode_value(many) == encode_value(Described(ULong(0x40), [arr]))
    # a plain list or a str given by the caller becomes an array / a symbol
    listed = P.SaslMechanisms(sasl_server_mechanisms=["PLAIN", "ANONYMOUS"])
    assert decode_value(encode_value(listed))[0].value[0] == Array(0xB3, ["PLAIN", "ANONYMOUS"])
    assert type(decode_value(encode_value(P.SaslMechanisms("PLAIN")))[0].value[0]) is Symbol
    with pytest.raises(DecodeError, match="symbol or an array of symbols"):
        P.decode_performative(Described(ULong(0x40), [[Symbol("PLAIN")]]))


def test_fields_maps_promote_plain_string_keys_to_symbols():
    attach = P.Attach(
        name="n", handle=0, role=False, properties={"com.microsoft:client-version": "x"}
    )
    props = decode_value(encode_value(attach))[0].value[13]
    assert typed_equal(props, {Symbol("com.microsoft:client-version"): "x"})


def test_symbolic_descriptors_are_accepted():
    described = Described(Symbol("amqp:detach:list"), [UInt(4), True])
    assert P.decode_performative(described) == P.Detach(handle=4, closed=True)
    assert P.decode_composite(Described(Symbol("amqp:accepted:list"), [])) == P.Accepted()


def test_delivery_states_and_nested_composites_decode_to_classes():
    d = P.decode_performative(
        decode_value(
            encode_value(
                P.Disposition(
                    role=True,
                    first=0,
                    last=9,
                    settled=True,
                    state=P.Rejected(P.Error("amqp:not-allowed", "no", {"k": 1})),
                )
            )  # fmt: skip
        )[0]
    )
    assert isinstance(d.state, P.Rejected) and isinstance(d.state.error, P.Error)
    assert d.state.error.condition == "amqp:not-allowed"
    txn = Described(ULong(0x34), [b"t", None])
    t = P.decode_performative(
        Described(ULong(0x14), [UInt(0), None, None, None, None, None, None, txn])
    )
    assert t.state == txn
    assert P.decode_state(Described(Symbol("amqp:released:list"), [])) == P.Released()


@pytest.mark.parametrize(
    ("described", "message"),
    [
        (Described(ULong(0x12), ["x", None, False]), "mandatory field handle is null"),
        (Described(ULong(0x12), ["x", Symbol("h"), False]), "handle must be a uint"),
        (Described(ULong(0x12), ["x", UInt(0), UInt(1)]), "role must be a boolean"),
        (Described(ULong(0x12), ["x", Long(-1), True]), "handle must be a uint"),
        (Described(ULong(0x16), [UInt(0), False, "oops"]), "error must be an error"),
        (
            Described(ULong(0x16), [UInt(0), False, Described(ULong(0x24), [])]),
            "error must be an error",
        ),
        (Described(ULong(0x10), "not a list"), "expected a described list"),
        (Described(ULong(0x99), []), "unknown performative descriptor"),
        (
            Described(ULong(0x28), []),
            "unknown performative descriptor",
        ),  # a source is not a frame body
        (
            Described(ULong(0x12), ["x", UInt(0), True, None, None, Described(ULong(0x29), [])]),
            "source must be a source",
        ),
        ([1, 2], "frame body must be a described list"),
        (
            Described(ULong(0x14), [UInt(0), None, None, None, None, None, None, 5]),
            "state must be a delivery state",
        ),
    ],
)
def test_malformed_performatives_raise_decode_error(described, message):
    with pytest.raises(DecodeError, match=message):
        P.decode_performative(described)


def test_delivery_tags_over_32_bytes_are_refused_both_ways():
    with pytest.raises(DecodeError, match="delivery-tag must be binary of at most 32 bytes"):
        P.decode_performative(Described(ULong(0x14), [UInt(0), UInt(0), b"x" * 33]))
    with pytest.raises(EncodeError, match="32-byte limit"):
        encode_value(P.Transfer(handle=0, delivery_id=0, delivery_tag=b"x" * 33))


def test_lenient_integer_widths_are_normalised_to_the_declared_type():
    # a peer sending a ulong where a uint is declared: accepted if it fits
    flow = P.decode_performative(Described(ULong(0x13), [ULong(0), ULong(10), ULong(0), ULong(10)]))
    assert type(flow.incoming_window) is UInt
    with pytest.raises(DecodeError, match="must be a uint"):
        P.decode_performative(Described(ULong(0x13), [ULong(0), ULong(2**40), ULong(0), ULong(10)]))


def test_encoding_checks_mandatory_fields_and_types():
    with pytest.raises(EncodeError, match="Attach.handle is mandatory"):
        encode_value(P.Attach(name="x", role=False, source=P.Source()))
    with pytest.raises(EncodeError, match="expected uint"):
        encode_value(P.Flow(incoming_window="10", next_outgoing_id=0, outgoing_window=1))
    with pytest.raises(EncodeError, match="out of range"):
        encode_value(P.Flow(incoming_window=2**32, next_outgoing_id=0, outgoing_window=1))


def test_sasl_secrets_stay_out_of_repr():
    assert "hunter2" not in repr(P.SaslInit(mechanism="PLAIN", initial_response=b"\0dev\0hunter2"))
    assert "hunter2" not in repr(P.SaslResponse(response=b"hunter2"))


def test_replace_builds_a_new_value():
    a = P.Attach(
        name="sender-link",
        handle=0,
        role=False,
        target=P.Target(address="devices/d1/messages/events"),
    )
    b = dataclasses.replace(a, name="sender-link@gw", handle=5)
    assert b.target is a.target and b.handle == 5 and a.handle == 0


@given(typed_values)
@settings(max_examples=100, deadline=None)
def test_decode_performative_never_raises_anything_but_decode_error(value):
    for descriptor in (0x10, 0x12, 0x13, 0x14, 0x15, 0x16, 0x41, 0x44):
        for body in (value, [value], [value] * 3, ["x", UInt(0), value, value]):
            try:
                P.decode_performative(Described(ULong(descriptor), body))
            except DecodeError:
                pass
