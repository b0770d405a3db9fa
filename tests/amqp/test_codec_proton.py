"""Type codec cross-checked against python-qpid-proton's codec (proton.Data),
both directions, on hypothesis-generated typed values."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from proton import Data

from gateway.amqp.codec import decode_value, encode_value
from gateway.amqp.types import (
    Array,
    Char,
    Decimal32,
    Decimal128,
    Described,
    Float,
    Int,
    Long,
    Symbol,
    Timestamp,
    UByte,
    UInt,
    ULong,
)

from .test_codec_strategies import (
    proton_decode,
    proton_encode,
    proton_values,
    read_proton_data,
    typed_equal,
)


@given(proton_values)
@settings(max_examples=400, deadline=None)
def test_ours_encode_proton_decodes_same_typed_value(value):
    decoded = proton_decode(encode_value(value))
    assert typed_equal(decoded, value), (decoded, value)


@given(proton_values)
@settings(max_examples=400, deadline=None)
def test_proton_encodes_ours_decodes_same_typed_value(value):
    encoded = proton_encode(value)
    decoded, end = decode_value(encoded)
    assert end == len(encoded)
    assert typed_equal(decoded, value), (decoded, value)


def test_proton_wide_forms_decode_to_the_same_value_as_our_compact_forms():
    # proton writes lists, maps and arrays in their 32-bit forms and array
    # elements at full width; we write the compact forms. Same values.
    value = [
        UInt(0),
        ULong(5),
        Array(0xB3, [Symbol("a"), Symbol("b")]),
        Array(0x70, [UInt(0), UInt(3)]),
        {Symbol("k"): [Long(1)]},
        Described(ULong(0x77), "x"),
    ]
    theirs = proton_encode(value)
    ours = encode_value(value)
    assert len(ours) < len(theirs)
    assert typed_equal(decode_value(theirs)[0], decode_value(ours)[0])


@pytest.mark.parametrize(
    "value",
    [
        Char("\U0001f600"),
        Timestamp(-1),
        Float(-0.0),
        Decimal32(b"\x22\x50\x00\x01"),
        Decimal128(bytes(range(16))),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        Int(-(2**31)),
        UByte(255),
        Array(0x98, [uuid.UUID(int=7)]),
        Array(0x73, [Char("a"), Char("\u00e9")]),
        Array(0xF0, [Array(0x71, [Int(1)]), Array(0xB1, ["x"])]),
        Array(0xD1, [{Symbol("a"): None}]),
        Array(0xB1, ["s"], descriptor=Symbol("com.example:text")),
    ],
    ids=repr,
)
def test_specific_values_both_ways(value):
    assert typed_equal(proton_decode(encode_value(value)), value)
    assert typed_equal(decode_value(proton_encode(value))[0], value)


def test_proton_reads_our_performative_shaped_values():
    # Source with a selector filter, as IoT Hub clients send it.
    value = Described(
        ULong(0x28),
        [
            "amqps://hub/devices/d1/messages/devicebound",
            UInt(0),
            Symbol("session-end"),
            UInt(0),
            False,
            None,
            None,
            {
                Symbol("apache.org:selector-filter:string"): Described(
                    Symbol("apache.org:selector-filter:string"),
                    "amqp.annotation.x-opt-offset > '10'",
                )
            },
        ],
    )
    data = Data()
    data.decode(encode_value(value))
    data.rewind()
    data.next()
    assert typed_equal(read_proton_data(data), value)
    assert isinstance(proton_decode(encode_value(value)), Described)
