"""Message sections: round trips, proton.Message both ways, split and replace."""

from __future__ import annotations

import dataclasses
import uuid

import proton
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.amqp.codec import encode_value
from gateway.amqp.errors import DecodeError, EncodeError
from gateway.amqp.message import (
    AmqpSequence,
    AmqpValue,
    ApplicationProperties,
    Data,
    Footer,
    Header,
    Message,
    MessageAnnotations,
    Properties,
    decode_message,
    decode_section,
    encode_message,
    replace_section,
    split_sections,
)
from gateway.amqp.types import Array, Described, Long, Symbol, Timestamp, UByte, UInt, ULong

from .test_codec_strategies import proton_values, typed_equal

_sym = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_.:", min_size=1, max_size=20).map(Symbol)
_annotations = st.dictionaries(_sym, proton_values, max_size=3)
_message_ids = st.one_of(
    st.none(),
    st.integers(0, 2**64 - 1).map(ULong),
    st.uuids(),
    st.binary(max_size=16),
    st.text(max_size=30),
)
_simple = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1).map(Long), st.text(max_size=20),
    st.binary(max_size=20), st.integers(0, 2**32 - 1).map(UInt),
)  # fmt: skip

headers = st.builds(
    Header,
    st.booleans(),
    st.integers(0, 255).map(UByte),
    st.one_of(st.none(), st.integers(0, 2**32 - 1).map(UInt)),
    st.booleans(),
    st.integers(0, 2**32 - 1).map(UInt),
)
properties = st.builds(
    Properties,
    _message_ids,
    st.one_of(st.none(), st.binary(max_size=20)),
    st.one_of(st.none(), st.text(max_size=40)),
    st.one_of(st.none(), st.text(max_size=40)),
    st.one_of(st.none(), st.text(max_size=40)),
    _message_ids,
    st.one_of(st.none(), _sym),
    st.one_of(st.none(), _sym),
    st.one_of(st.none(), st.integers(0, 2**50).map(Timestamp)),
    st.one_of(st.none(), st.integers(0, 2**50).map(Timestamp)),
    st.one_of(st.none(), st.text(max_size=10)),
    st.one_of(st.none(), st.integers(0, 2**32 - 1).map(UInt)),
    st.one_of(st.none(), st.text(max_size=10)),
)
bodies = st.one_of(
    st.just([]),
    st.lists(st.binary(max_size=300).map(Data), min_size=1, max_size=3),
    st.lists(st.lists(proton_values, max_size=3).map(AmqpSequence), min_size=1, max_size=2),
    proton_values.map(lambda v: [AmqpValue(v)]),
)
messages = st.builds(
    Message,
    st.one_of(st.none(), headers),
    st.one_of(st.none(), _annotations),
    st.one_of(st.none(), _annotations),
    st.one_of(st.none(), properties),
    st.one_of(st.none(), st.dictionaries(st.text(max_size=10), _simple, max_size=4)),
    bodies,
    st.one_of(st.none(), _annotations),
)


def assert_same_message(a: Message, b: Message) -> None:
    assert a.header == b.header
    assert a.properties == b.properties
    for name in ("delivery_annotations", "message_annotations", "application_properties", "footer"):
        assert typed_equal(getattr(a, name), getattr(b, name)), name
    assert [type(s) for s in a.body] == [type(s) for s in b.body]
    for x, y in zip(a.body, b.body, strict=True):
        assert typed_equal(x.value, y.value)


@given(messages)
@settings(max_examples=300, deadline=None)
def test_round_trip(msg):
    raw = encode_message(msg)
    decoded = decode_message(raw)
    assert_same_message(decoded, msg)
    assert encode_message(decoded) == raw
    sections = split_sections(raw)
    assert [c for c, _, _ in sections] == sorted(c for c, _, _ in sections)
    assert b"".join(raw[s:e] for _, s, e in sections) == raw


# --------------------------------------------------------------- against proton.Message


def test_proton_message_decodes_with_our_code():
    pm = proton.Message(
        id=ulong_(7),
        user_id=b"user",
        address="amqps://hub/devices/d1/messages/events",
        subject="telemetry",
        reply_to="cbs",
        correlation_id=uuid.UUID(int=5),
        content_type="application/json",
        content_encoding="utf-8",
        expiry_time=1700000000.5,
        creation_time=1600000000.25,
        group_id="g",
        group_sequence=3,
        reply_to_group_id="rg",
        durable=True,
        priority=9,
        ttl=1.5,
        first_acquirer=True,
        delivery_count=2,
        instructions={proton.symbol("x-opt-lock"): "l"},
        annotations={proton.symbol("iothub-connection-device-id"): "d1"},
        properties={"temperature": 21, "unit": "C"},
        body=b'{"t": 21}',
        inferred=True,
    )
    msg = decode_message(pm.encode())
    assert msg.header == Header(
        durable=True, priority=9, ttl=1500, first_acquirer=True, delivery_count=2
    )
    p = msg.properties
    assert typed_equal(p.message_id, ULong(7))
    assert p.user_id == b"user" and p.to == pm.address and p.subject == "telemetry"
    assert p.reply_to == "cbs" and p.correlation_id == uuid.UUID(int=5)
    assert type(p.content_type) is Symbol and p.content_type == "application/json"
    assert p.absolute_expiry_time == 1700000000500 and p.creation_time == 1600000000250
    assert (p.group_id, p.group_sequence, p.reply_to_group_id) == ("g", 3, "rg")
    assert typed_equal(msg.delivery_annotations, {Symbol("x-opt-lock"): "l"})
    assert typed_equal(msg.message_annotations, {Symbol("iothub-connection-device-id"): "d1"})
    assert typed_equal(msg.application_properties, {"temperature": Long(21), "unit": "C"})
    assert msg.body == [Data(b'{"t": 21}')]


def ulong_(v: int) -> proton.ulong:
    return proton.ulong(v)


def test_our_message_decodes_with_proton():
    msg = Message(
        header=Header(durable=True, priority=UByte(3), ttl=UInt(60000)),
        message_annotations={"x-opt-partition-key": "p"},
        properties=Properties(
            message_id="req-1",
            to="$cbs",
            reply_to="cbs",
            correlation_id=ULong(0),
            content_type="text/plain",
            creation_time=Timestamp(1_600_000_000_000),
        ),  # fmt: skip
        application_properties={
            "operation": "put-token",
            "type": "servicebus.windows.net:sastoken",
            "name": "myhub.azure-devices.net/devices/d1",
            "expiration": Timestamp(1_700_000_000_000),
        },
        body=[AmqpValue("SharedAccessSignature sr=x&sig=y&se=1")],
    )
    pm = proton.Message()
    pm.decode(encode_message(msg))
    assert pm.durable and pm.priority == 3 and pm.ttl == 60.0
    assert pm.annotations == {proton.symbol("x-opt-partition-key"): "p"}
    assert pm.id == "req-1" and pm.address == "$cbs" and pm.reply_to == "cbs"
    assert pm.correlation_id == 0
    assert pm.content_type == "text/plain" and pm.creation_time == 1_600_000_000.0
    assert pm.properties["operation"] == "put-token"
    assert pm.properties["expiration"] == 1_700_000_000_000
    assert type(pm.properties["expiration"]) is proton.timestamp
    assert pm.body == "SharedAccessSignature sr=x&sig=y&se=1"


def _has_binary_map_key(v) -> bool:
    # proton.Message builds Python dicts from the body; binary keys come back
    # as memoryviews, which do not hash (a limit of the peer's binding)
    if isinstance(v, dict):
        return any(
            isinstance(k, bytes) or _has_binary_map_key(k) or _has_binary_map_key(x)
            for k, x in v.items()
        )
    if isinstance(v, list | Array):
        return any(_has_binary_map_key(x) for x in v)
    if isinstance(v, Described):
        return _has_binary_map_key(v.value)
    return False


def _proton_safe_message(m: Message) -> bool:
    return not any(
        _has_binary_map_key(s.value) for s in m.body if not isinstance(s, Data)
    ) and not (len(m.body) > 1 and isinstance(m.body[0], AmqpSequence))


def _unset_as_none(props: Properties | None) -> list:
    # pn_message has no null for numbers and strings: 0, "" and b"" mean unset
    if props is None:
        return [None] * 13
    return [None if (v is not None and not isinstance(v, uuid.UUID) and not v) else v
            for v in dataclasses.astuple(props)[:13]]  # fmt: skip


# proton.Message turns sections into Python dicts of its own types, where
# decimal32(0) == False == 0 collide as keys: the message-level check uses the
# values real messages carry; full type coverage is in test_codec_proton.
_plain = st.recursive(
    _simple | _sym | st.uuids() | st.integers(0, 2**50).map(Timestamp),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_sym, inner, max_size=3),
    max_leaves=10,
)
_plain_annotations = st.dictionaries(_sym, _plain, max_size=3)
proton_messages = st.builds(
    Message,
    st.one_of(st.none(), headers),
    st.one_of(st.none(), _plain_annotations),
    st.one_of(st.none(), _plain_annotations),
    st.one_of(st.none(), properties),
    st.one_of(st.none(), st.dictionaries(st.text(max_size=10), _simple, max_size=4)),
    st.one_of(
        st.just([]),
        st.binary(max_size=300).map(lambda b: [Data(b)]),
        st.lists(_plain, max_size=3).map(lambda v: [AmqpSequence(v)]),
        _plain.map(lambda v: [AmqpValue(v)]),
    ),
    st.none(),
)


@given(proton_messages.filter(_proton_safe_message))
@settings(max_examples=200, deadline=None)
def test_proton_re_encodes_our_messages_to_the_same_sections(msg):
    # proton decodes our bytes and encodes them again; we decode its bytes
    pm = proton.Message()
    pm.decode(encode_message(msg))
    back = decode_message(pm.encode())
    # proton always writes a body (null amqp-value when there is none), drops
    # the footer, and writes header/properties only when something is set
    assert _unset_as_none(back.properties) == _unset_as_none(msg.properties)
    assert typed_equal(back.application_properties or {}, msg.application_properties or {})
    assert typed_equal(back.message_annotations or {}, msg.message_annotations or {})
    assert typed_equal(back.delivery_annotations or {}, msg.delivery_annotations or {})
    if msg.body and isinstance(msg.body[0], AmqpValue):
        if msg.body[0].value is None:
            assert back.body in ([], [AmqpValue(None)])  # proton drops a null body
        else:
            assert typed_equal(back.body[0].value, msg.body[0].value)
    if msg.body and isinstance(msg.body[0], Data) and len(msg.body) == 1:
        assert back.body == msg.body


# ---------------------------------------------------------------- split and replace


def _cbs_request() -> bytes:
    return encode_message(Message(
        header=Header(durable=False),
        message_annotations={"x-opt-a": 1},
        properties=Properties(message_id=ULong(0), to="$cbs", reply_to="cbs"),
        application_properties={"operation": "put-token"},
        body=[AmqpValue("token")],
        footer={"x-f": b"h"},
    ))  # fmt: skip


def test_split_sections_reports_codes_and_bounds():
    raw = _cbs_request()
    codes = [c for c, _, _ in split_sections(raw)]
    assert codes == [0x70, 0x72, 0x73, 0x74, 0x77, 0x78]
    for code, start, end in split_sections(raw):
        section = decode_section(raw, start, end)
        assert section.descriptor_code == code


def test_replace_properties_keeps_other_sections_byte_for_byte():
    raw = _cbs_request()
    before = {c: raw[s:e] for c, s, e in split_sections(raw)}
    props = decode_section(raw, *[(s, e) for c, s, e in split_sections(raw) if c == 0x73][0])
    new_props = dataclasses.replace(props, message_id=uuid.UUID(int=99), reply_to="gw-cbs-1")
    out = replace_section(raw, 0x73, new_props)
    after = {c: out[s:e] for c, s, e in split_sections(out)}
    assert after.keys() == before.keys()
    for code in before:
        if code != 0x73:
            assert after[code] == before[code]
    msg = decode_message(out)
    assert msg.properties.message_id == uuid.UUID(int=99) and msg.properties.to == "$cbs"
    # remove and insert at the right place
    without = replace_section(raw, 0x73, None)
    assert [c for c, _, _ in split_sections(without)] == [0x70, 0x72, 0x74, 0x77, 0x78]
    again = replace_section(without, 0x73, encode_value(new_props))
    assert again == out
    only_body = encode_message(Message(body=[Data(b"x")]))
    assert decode_message(replace_section(only_body, 0x70, Header(durable=True))).header.durable
    assert [c for c, _, _ in split_sections(replace_section(only_body, 0x78, Footer({})))] == [
        0x75,
        0x78,
    ]
    with pytest.raises(ValueError):
        replace_section(raw, 0x77, AmqpValue("no"))


def test_symbolic_section_descriptors():
    raw = encode_value(Described(Symbol("amqp:properties:list"), ["id"])) + encode_value(
        Described(Symbol("amqp:data:binary"), b"x")
    )
    assert [c for c, _, _ in split_sections(raw)] == [0x73, 0x75]
    msg = decode_message(raw)
    assert msg.properties.message_id == "id" and msg.body == [Data(b"x")]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x45", "must be a described value"),
        (encode_value(Described(ULong(0x24), [])), "unknown message section"),
        (encode_value(Described(Symbol("x:y"), [])), "not a message section descriptor"),
        (encode_value(Data(b"a")) + encode_value(AmqpValue(1)), "mixes body section kinds"),
        (encode_value(AmqpValue(1)) + encode_value(AmqpValue(2)), "more than one amqp-value"),
        (encode_value(Properties()) + encode_value(Header()), "out of order"),
        (encode_value(Header()) + encode_value(Header()), "out of order or repeated"),
        (encode_value(Footer({})) + encode_value(Data(b"")), "body section after"),
        (encode_value(Described(ULong(0x75), "text")), "data section must be binary"),
        (encode_value(Described(ULong(0x74), [1])), "must be a map"),
        (encode_value(Described(ULong(0x73), {})), "Properties section must be a list"),
        (encode_value(Described(ULong(0x73), [None, "not binary"])), "user-id must be binary"),
        (b"\x00\x53", "truncated"),
        (b"\x00\x53\x75\xa0\x05ab", "needs"),
    ],
)
def test_malformed_messages_raise_decode_error(raw, message):
    with pytest.raises(DecodeError, match=message):
        decode_message(raw)


def test_encoding_rejects_mixed_bodies():
    with pytest.raises(EncodeError):
        encode_message(Message(body=[Data(b"a"), AmqpValue(1)]))
    with pytest.raises(EncodeError):
        encode_message(Message(body=[AmqpValue(1), AmqpValue(2)]))


def test_section_objects_encode_on_their_own():
    assert encode_value(Data(b"ab")).hex() == "005375a0026162"
    assert encode_value(AmqpValue(None)).hex() == "00537740"
    assert encode_value(ApplicationProperties({"k": "v"})).hex() == "005374c10702a1016ba10176"
    assert encode_value(MessageAnnotations({"k": "v"})).hex() == "005372c10702a3016ba10176"
    assert encode_value(AmqpSequence([1])).hex() == "005376c003015501"
