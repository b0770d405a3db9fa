"""Frames: reader bounds and chunking, transfer fast path, fast encoders,
protocol headers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.amqp import performatives as P
from gateway.amqp.codec import decode_value, encode_value
from gateway.amqp.errors import DecodeError, FramingError
from gateway.amqp.framing import (
    AMQP_HEADER,
    FRAME_AMQP,
    FRAME_SASL,
    HEADER_AMQP,
    HEADER_SASL,
    HEADER_TLS,
    SASL_HEADER,
    TLS_HEADER,
    Frame,
    FrameReader,
    encode_disposition,
    encode_flow,
    encode_frame,
    encode_transfer_frame,
    encode_transfer_frame_into,
    read_protocol_header,
)
from gateway.amqp.types import Described, Symbol, UByte, UInt, ULong

from .test_codec_strategies import proton_encode
from .test_performatives import ALL_CLASSES, _states, instances

SASL_CLASSES = [P.SaslMechanisms, P.SaslInit, P.SaslChallenge, P.SaslResponse, P.SaslOutcome]
AMQP_CLASSES = [
    P.Open,
    P.Begin,
    P.Attach,
    P.Flow,
    P.Transfer,
    P.Disposition,
    P.Detach,
    P.End,
    P.Close,
]


def read_all(reader: FrameReader) -> list[Frame]:
    frames = []
    while (frame := reader.next_frame()) is not None:
        frames.append(frame)
    return frames


@st.composite
def frames(draw):
    cls = draw(st.sampled_from(AMQP_CLASSES + SASL_CLASSES + [None]))
    channel = draw(st.integers(0, 0xFFFF))
    if cls is None:
        return None, channel, b"", FRAME_AMQP
    perf = draw(instances(cls))
    payload = draw(st.binary(max_size=600)) if cls is P.Transfer else b""
    ftype = FRAME_SASL if cls in SASL_CLASSES else FRAME_AMQP
    return perf, channel, payload, ftype


@given(st.lists(frames(), min_size=1, max_size=6), st.data())
@settings(max_examples=300, deadline=None)
def test_frames_round_trip_through_any_chunking(specs, data):
    stream = b"".join(encode_frame(p, c, pl, t) for p, c, pl, t in specs)
    reader = FrameReader(1 << 20)
    got: list[Frame] = []
    pos = 0
    while pos < len(stream):
        n = data.draw(st.integers(1, max(1, len(stream) - pos)))
        reader.feed(stream[pos : pos + n])
        pos += n
        got += read_all(reader)
    assert reader.buffered == 0
    assert len(got) == len(specs)
    for frame, (perf, channel, payload, ftype) in zip(got, specs, strict=True):
        assert (frame.frame_type, frame.channel) == (ftype, channel)
        assert frame.performative == perf
        assert isinstance(frame.payload, memoryview) and bytes(frame.payload) == payload


def test_transfer_payload_is_a_zero_copy_view_of_the_input():
    data = encode_transfer_frame(3, 1, 7, b"t", 0, False, False, b"message bytes") + encode_frame(
        None
    )
    reader = FrameReader()
    reader.feed(data)
    frame = reader.next_frame()
    assert frame.payload.obj is data  # no copy when a read holds whole frames
    assert bytes(frame.payload) == b"message bytes"
    assert frame.performative == P.Transfer(
        handle=1, delivery_id=7, delivery_tag=b"t", message_format=0, settled=False
    )


def test_small_reads_are_joined_once_per_frame():
    data = encode_transfer_frame(0, 0, 0, b"t", 0, True, False, bytes(5000))
    reader = FrameReader()
    for i in range(0, len(data), 7):
        reader.feed(data[i : i + 7])
    frame = reader.next_frame()
    assert bytes(frame.payload) == bytes(5000) and reader.next_frame() is None


# --------------------------------------------------------------------------- bounds


def test_oversized_frame_is_refused_from_its_size_field_alone():
    reader = FrameReader(max_frame_size=512)
    reader.feed(struct.pack(">I", 513))  # nothing else has arrived yet
    with pytest.raises(FramingError, match="513 bytes exceeds the maximum frame size 512") as info:
        reader.next_frame()
    assert info.value.condition == "amqp:connection:framing-error"
    with pytest.raises(FramingError):  # the reader stays failed
        reader.next_frame()


def test_max_frame_size_can_be_changed_after_open():
    big = encode_transfer_frame(0, 0, 0, b"t", 0, True, False, bytes(1000))
    reader = FrameReader(max_frame_size=4294967295)
    reader.max_frame_size = 512
    reader.feed(big)
    with pytest.raises(FramingError):
        reader.next_frame()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack(">IBBH", 4, 2, 0, 0), "below the 8-byte frame header"),
        (struct.pack(">IBBH", 8, 1, 0, 0), "data offset 1 is below the minimum"),
        (struct.pack(">IBBH", 8, 3, 0, 0), "data offset 12 bytes exceeds the frame size 8"),
        (struct.pack(">IBBH", 8, 2, 7, 0), "unknown frame type 0x07"),
        (
            encode_frame(P.Open(container_id="c"), frame_type=FRAME_SASL),
            "Open is not allowed in an SASL frame",
        ),
        (encode_frame(P.SaslOutcome(code=0)), "SaslOutcome is not allowed in an AMQP frame"),
        (
            encode_frame(
                P.Flow(incoming_window=1, next_outgoing_id=0, outgoing_window=1), payload=b"x"
            ),
            "unexpected bytes after its body",
        ),
    ],
)
def test_framing_errors(data, message):
    reader = FrameReader()
    reader.feed(data)
    with pytest.raises(FramingError, match=message):
        reader.next_frame()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x45", "frame body must be a described list"),
        (encode_value(Described(ULong(0x77), [])), "unknown performative descriptor"),
        (encode_value(Described(ULong(0x12), ["x"])), "mandatory field handle is null"),
        (b"\x00\x53\x14\x45", "mandatory field handle is null"),
        (b"\x00\x53\x14\xa1\x00", "transfer body must be a list"),
        (b"\x00\x53\x14\xc0\x05\x02\x43", "overruns the frame"),
        (b"\x00\x53\x14\xc0\x02\x05\x43", "claims 5 fields"),
        (b"\x00\x53\x14\xc0\x03\x01\xa1\x00", "handle must be a uint"),
        (b"\x00\x53\x14\xc0\x03\x02\x43\x52", "truncated smalluint"),
        (b"\x00\x53\x14\xc0\x03\x02\x43\x02", "unknown type constructor 0x02"),
        (b"\x00\x53\x13\xc0\x01\x00", "mandatory field incoming-window is null"),
        (b"\x00\x53\x14\xc0\x26\x03\x43\x43\xa0\x21" + b"t" * 33, "at most 32 bytes"),
    ],
)
def test_bad_frame_bodies_raise_decode_error(body, message):
    frame = struct.pack(">IBBH", 8 + len(body), 2, 0, 0) + body
    reader = FrameReader()
    reader.feed(frame)
    with pytest.raises(DecodeError, match=message):
        reader.next_frame()


def test_extended_header_is_skipped():
    body = encode_value(P.Begin(next_outgoing_id=0, incoming_window=10, outgoing_window=10))
    frame = struct.pack(">IBBH", 16 + len(body), 4, 0, 5) + b"\xee" * 8 + body
    reader = FrameReader()
    reader.feed(frame + struct.pack(">IBBH", 12, 3, 0, 0) + b"ext!")
    begin, empty = read_all(reader)
    assert begin.channel == 5 and begin.performative.incoming_window == 10
    assert empty.performative is None and bytes(empty.payload) == b""


# ------------------------------------------------------------------ transfer fast path


transfer_lists = st.builds(
    lambda handle, did, tag, fmt, settled, more, rsm, state, resume, aborted, batchable, n: [
        handle,
        did,
        tag,
        fmt,
        settled,
        more,
        rsm,
        state,
        resume,
        aborted,
        batchable,
    ][:n],
    st.integers(0, 2**32 - 1).map(UInt),
    st.one_of(st.none(), st.integers(0, 2**32 - 1).map(UInt)),
    st.one_of(st.none(), st.binary(max_size=32)),
    st.one_of(st.none(), st.integers(0, 2**32 - 1).map(UInt)),
    st.one_of(st.none(), st.booleans()),
    st.one_of(st.none(), st.booleans()),
    st.one_of(st.none(), st.sampled_from([UByte(0), UByte(1)])),
    _states,
    st.one_of(st.none(), st.booleans()),
    st.one_of(st.none(), st.booleans()),
    st.one_of(st.none(), st.booleans()),
    st.integers(1, 11),
)


@given(transfer_lists, st.booleans(), st.binary(max_size=40))
@settings(max_examples=400, deadline=None)
def test_fast_transfer_decoder_agrees_with_the_generic_decoder(fields, wide, payload):
    # our compact encoding, and proton's wide one (list32, full-width uints)
    if len(fields) > 7 and isinstance(fields[7], P._CompositeBase):
        fields[7] = fields[7].to_described()  # proton's codec knows only Described
    described = Described(ULong(0x14), fields)
    body = proton_encode(described) if wide else encode_value(described)
    frame = struct.pack(">IBBH", 8 + len(body) + len(payload), 2, 0, 1) + body + payload
    reader = FrameReader()
    reader.feed(frame)
    got = reader.next_frame()
    expected = P.decode_performative(decode_value(body)[0])
    assert got.performative == expected
    assert [type(getattr(got.performative, s.name)) for s in P.Transfer._spec] == [
        type(getattr(expected, s.name)) for s in P.Transfer._spec
    ]
    assert bytes(got.payload) == payload


def _field_lists(*fields):
    return st.tuples(*fields, st.integers(0, len(fields))).map(lambda t: list(t[:-1])[: t[-1]])


_opt_uint = st.one_of(
    st.none(), st.integers(0, 2**32 - 1).map(UInt), st.integers(0, 2**32 - 1).map(ULong)
)
_opt_bool = st.one_of(st.none(), st.booleans())
flow_lists = _field_lists(
    _opt_uint, _opt_uint, _opt_uint, _opt_uint, _opt_uint, _opt_uint, _opt_uint, _opt_uint,
    _opt_bool, _opt_bool, st.one_of(st.none(), st.dictionaries(st.text(alphabet="abc", max_size=3).map(Symbol), st.integers(0, 5), max_size=2)),
)  # fmt: skip
disposition_lists = _field_lists(_opt_bool, _opt_uint, _opt_uint, _opt_bool, _states, _opt_bool)


@given(st.sampled_from([(0x13, "flow"), (0x15, "disposition")]), st.data(), st.booleans())
@settings(max_examples=400, deadline=None)
def test_fast_flow_and_disposition_decoders_agree_with_the_generic_decoder(kind, data, wide):
    code, name = kind
    fields = data.draw(flow_lists if code == 0x13 else disposition_lists)
    if code == 0x15 and len(fields) > 4 and isinstance(fields[4], P._CompositeBase):
        fields[4] = fields[4].to_described()
    described = Described(ULong(code), fields)
    body = proton_encode(described) if wide else encode_value(described)
    reader = FrameReader()
    reader.feed(struct.pack(">IBBH", 8 + len(body), 2, 0, 1) + body)
    try:
        expected = P.decode_performative(decode_value(body)[0])
    except DecodeError as exc:
        with pytest.raises(DecodeError) as info:
            reader.next_frame()
        assert info.value.description.split(":")[0] == exc.description.split(":")[0]
        return
    got = reader.next_frame().performative
    assert got == expected
    assert [type(getattr(got, f.name)) for f in got._spec] == [
        type(getattr(expected, f.name)) for f in got._spec
    ]


def test_transfer_with_extra_fields_keeps_them():
    body = encode_value(
        Described(
            ULong(0x14),
            [UInt(0), None, None, None, None, None, None, None, None, None, None, Symbol("x")],
        )
    )
    reader = FrameReader()
    reader.feed(struct.pack(">IBBH", 8 + len(body), 2, 0, 0) + body)
    assert reader.next_frame().performative._extra == (Symbol("x"),)


# ------------------------------------------------------------------------ fast encoders

uints = st.integers(0, 2**32 - 1)


@given(
    st.integers(0, 0xFFFF), uints, st.one_of(st.none(), uints), st.one_of(st.none(), st.binary(max_size=32)),
    st.one_of(st.none(), uints), st.one_of(st.none(), st.booleans()), st.booleans(),
    st.one_of(st.none(), st.sampled_from([0, 1])), _states, st.booleans(), st.booleans(), st.booleans(),
    st.binary(max_size=100),
)  # fmt: skip
@settings(max_examples=400, deadline=None)
def test_encode_transfer_frame_matches_generic_encoding(
    channel, handle, did, tag, fmt, settled, more, rsm, state, resume, aborted, batchable, payload
):
    kwargs = dict(
        rcv_settle_mode=rsm, state=state, resume=resume, aborted=aborted, batchable=batchable
    )
    fast = encode_transfer_frame(channel, handle, did, tag, fmt, settled, more, payload, **kwargs)
    out = bytearray(b"prefix")
    encode_transfer_frame_into(
        out, channel, handle, did, tag, fmt, settled, more, payload, **kwargs
    )
    assert bytes(out[6:]) == fast
    generic = encode_frame(
        P.Transfer(handle, did, tag, fmt, settled, more, rsm, state, resume, aborted, batchable),
        channel,
        payload,
    )
    assert fast == generic
    reader = FrameReader()
    reader.feed(fast)
    frame = reader.next_frame()
    assert frame.performative == P.Transfer(
        handle, did, tag, fmt, settled, more, rsm, state, resume, aborted, batchable
    )
    assert bytes(frame.payload) == payload


@given(
    st.integers(0, 0xFFFF), st.one_of(st.none(), uints), uints, uints, uints,
    st.one_of(st.none(), uints), st.one_of(st.none(), uints), st.one_of(st.none(), uints),
    st.one_of(st.none(), uints), st.booleans(), st.booleans(),
    st.one_of(st.none(), st.dictionaries(st.text(alphabet="abc", max_size=3).map(Symbol), st.integers(0, 9), max_size=2)),
)  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_encode_flow_matches_generic_encoding(
    channel, nid, iw, noid, ow, h, dc, lc, av, drain, echo, props
):
    fast = encode_flow(channel, nid, iw, noid, ow, h, dc, lc, av, drain, echo, props)
    assert fast == encode_frame(
        P.Flow(nid, iw, noid, ow, h, dc, lc, av, drain, echo, props), channel
    )


@given(
    st.integers(0, 0xFFFF),
    st.booleans(),
    uints,
    st.one_of(st.none(), uints),
    st.booleans(),
    _states,
    st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_encode_disposition_matches_generic_encoding(
    channel, role, first, last, settled, state, batchable
):
    fast = encode_disposition(channel, role, first, last, settled, state, batchable)
    assert fast == encode_frame(
        P.Disposition(role, first, last, settled, state, batchable), channel
    )


def test_empty_frame_is_eight_bytes():
    assert encode_frame(None) == b"\x00\x00\x00\x08\x02\x00\x00\x00"
    assert encode_frame(None, channel=3) == b"\x00\x00\x00\x08\x02\x00\x00\x03"


def test_continuation_transfer_frames_may_omit_delivery_fields():
    frame = encode_transfer_frame(0, 2, None, None, None, None, True, b"part")
    reader = FrameReader()
    reader.feed(frame)
    t = reader.next_frame().performative
    assert (t.handle, t.delivery_id, t.delivery_tag, t.more) == (2, None, None, True)


# ----------------------------------------------------------------------- protocol header


def test_read_protocol_header():
    assert read_protocol_header(AMQP_HEADER + b"rest") == (HEADER_AMQP, b"rest")
    assert read_protocol_header(SASL_HEADER) == (HEADER_SASL, b"")
    assert read_protocol_header(TLS_HEADER) == (HEADER_TLS, b"")
    assert read_protocol_header(b"AMQP\x03") == (None, b"AMQP\x03")
    assert read_protocol_header(b"") == (None, b"")
    for bad, message in [
        (b"GET / HTTP/1.1", "not an AMQP protocol header"),
        (b"AM\x00", "not an AMQP protocol header"),
        (b"AMQP\x01\x01\x00\x00", "unknown AMQP protocol id 1"),
        (b"AMQP\x00\x00\x09\x00", "unsupported AMQP version 0.9.0"),
        (b"AMQP\x00\x01\x00\x01", "unsupported AMQP version 1.0.1"),
    ]:
        with pytest.raises(FramingError, match=message):
            read_protocol_header(bad)


def test_reader_reads_a_header_that_follows_sasl_frames():
    stream = (
        encode_frame(P.SaslOutcome(code=0), frame_type=FRAME_SASL)
        + AMQP_HEADER
        + encode_frame(P.Open(container_id="hub"))
    )
    reader = FrameReader()
    reader.feed(SASL_HEADER[:3])
    assert reader.read_protocol_header() is None
    reader.feed(SASL_HEADER[3:] + stream[:5])
    assert reader.read_protocol_header() == HEADER_SASL
    reader.feed(stream[5:])
    assert isinstance(reader.next_frame().performative, P.SaslOutcome)
    assert reader.read_protocol_header() == HEADER_AMQP
    assert reader.next_frame().performative == P.Open(container_id="hub")
    bad = FrameReader()
    bad.feed(b"HTTP")
    with pytest.raises(FramingError):
        bad.read_protocol_header()


def test_every_class_is_a_frame_body_or_a_field_type():
    bodies = set(P.AMQP_PERFORMATIVES.values()) | set(P.SASL_PERFORMATIVES.values())
    assert bodies == set(AMQP_CLASSES + SASL_CLASSES)
    assert set(ALL_CLASSES) >= bodies
