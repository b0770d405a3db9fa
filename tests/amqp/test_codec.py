"""Type codec: exact encodings, every decodable form, round trips, errors."""

from __future__ import annotations

import math
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.amqp.codec import MAX_DEPTH, decode_value, encode_into, encode_value, skip_value
from gateway.amqp.errors import AMQPError, DecodeError, EncodeError
from gateway.amqp.types import (
    Array,
    Byte,
    Char,
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
    as_symbols,
    make_map,
)

from .test_codec_strategies import typed_equal, typed_values

H = bytes.fromhex


def dec(data: bytes):
    value, end = decode_value(data)
    assert end == len(data)
    return value


# ---------------------------------------------------------------- compact encodings

ENCODINGS = [
    (None, "40"),
    (True, "41"),
    (False, "42"),
    (UByte(7), "5007"),
    (UShort(0x1234), "601234"),
    (UInt(0), "43"),
    (UInt(255), "52ff"),
    (UInt(256), "7000000100"),
    (ULong(0), "44"),
    (ULong(1), "5301"),
    (ULong(2**64 - 1), "80ffffffffffffffff"),
    (Byte(-1), "51ff"),
    (Short(-2), "61fffe"),
    (Int(-128), "5480"),
    (Int(128), "7100000080"),
    (Long(127), "557f"),
    (5, "5505"),
    (-(2**63), "818000000000000000"),
    (Float(1.5), "723fc00000"),
    (1.5, "823ff8000000000000"),
    (Decimal32(b"\x01\x02\x03\x04"), "7401020304"),
    (Decimal64(bytes(range(8))), "840001020304050607"),
    (Decimal128(bytes(range(16))), "94000102030405060708090a0b0c0d0e0f"),
    (Char("€"), "73000020ac"),
    (Timestamp(1), "830000000000000001"),
    (uuid.UUID(int=1), "98" + "00" * 15 + "01"),
    (b"ab", "a0026162"),
    (b"x" * 256, "b000000100" + "78" * 256),
    ("é", "a102c3a9"),
    ("y" * 300, "b10000012c" + "79" * 300),
    (Symbol("ab"), "a3026162"),
    (Symbol("z" * 256), "b300000100" + "7a" * 256),
    ([], "45"),
    ([None, True], "c003024041"),
    ({}, "c10100"),
    ({Symbol("k"): UInt(1)}, "c10602a3016b5201"),
    (Described(ULong(0x77), "v"), "005377a10176"),
    (Described(Symbol("x:y"), None), "00a303783a7940"),
    (Array(0xB3, [Symbol("a"), Symbol("bc")]), "e00702a3016102" + "6263"),
    (Array(0x70, [UInt(1), UInt(2)]), "e004025201" + "02"),
    (Array(0x70, [UInt(1), UInt(256)]), "e00a02700000000100000100"),
    (Array(0x56, [True, False]), "e004025601" + "00"),
    (Array(0x40, [None, None]), "e0020240"),
    (Array(0xB3, []), "e00200a3"),
    (Array(0x80, [ULong(9)], descriptor=ULong(3)), "e006010053035309"),
]


@pytest.mark.parametrize(("value", "hexbytes"), ENCODINGS, ids=lambda x: repr(x)[:40])
def test_compact_encoding_and_round_trip(value, hexbytes):
    assert encode_value(value).hex() == hexbytes
    assert typed_equal(dec(H(hexbytes)), value if type(value) is not int else Long(value))


def test_list_and_map_switch_to_32_bit_forms():
    big = ["x" * 100, "y" * 100, "z" * 100]
    enc = encode_value(big)
    assert enc[0] == 0xD0 and dec(enc) == big
    many = [UInt(1)] * 300  # > 255 elements even though small
    enc = encode_value(many)
    assert enc[0] == 0xD0 and dec(enc) == many
    m = {Symbol(f"k{i}"): i for i in range(200)}
    enc = encode_value(m)
    assert enc[0] == 0xD1 and dec(enc) == m
    arr = Array(0xB1, ["q" * 300])
    enc = encode_value(arr)
    assert enc[0] == 0xF0 and enc[9] == 0xB1 and dec(enc) == arr


# ------------------------------------------------------ every valid encoding decodes

WIDE_FORMS = [
    ("7000000005", UInt(5)),
    ("5205", UInt(5)),
    ("43", UInt(0)),
    ("800000000000000005", ULong(5)),
    ("5305", ULong(5)),
    ("44", ULong(0)),
    ("7100000005", Int(5)),
    ("5405", Int(5)),
    ("810000000000000005", Long(5)),
    ("5505", Long(5)),
    ("5601", True),
    ("5600", False),
    ("b00000000161", b"a"),
    ("b10000000161", "a"),
    ("b30000000161", Symbol("a")),
    ("d0000000060000000155" + "05", [Long(5)]),
    ("d00000000400000000", []),
    ("c00100", []),
    ("d1000000080000000255015502", {Long(1): Long(2)}),
    ("f0000000050000000140", Array(0x40, [None])),
    ("e0020243", Array(0x70, [UInt(0), UInt(0)])),
    ("e00202" + "41", Array(0x56, [True, True])),
    ("e00202" + "42", Array(0x56, [False, False])),
    ("e00201" + "45", Array(0xD0, [[]])),
    # array of arrays (inner arrays use the array8 body form)
    (
        "e00b02e0" + "0301" + "5201" + "0401" + "a10178",
        Array(0xF0, [Array(0x70, [UInt(1)]), Array(0xB1, ["x"])]),
    ),
    # array of described values (descriptor once, then the element constructor)
    ("e00801" + "00a30178" + "a10161", Array(0xB1, ["a"], descriptor=Symbol("x"))),
    # array of lists in list8 form
    ("e00501c0" + "0201" + "40", Array(0xD0, [[None]])),
    # array of maps in map8 form
    ("e00401c1" + "0100", Array(0xD1, [{}])),
]


@pytest.mark.parametrize(("hexbytes", "expected"), WIDE_FORMS, ids=lambda x: str(x)[:40])
def test_every_encoding_decodes(hexbytes, expected):
    assert typed_equal(dec(H(hexbytes)), expected)


def test_decoding_returns_wrapper_types_for_narrow_forms():
    assert type(dec(H("52ff"))) is UInt
    assert type(dec(H("5401"))) is Int
    assert type(dec(H("5501"))) is Long
    assert type(dec(H("44"))) is ULong
    assert type(dec(H("a30161"))) is Symbol
    assert type(dec(H("73" + "00000041"))) is Char


def test_unknown_described_value_re_encodes_to_same_bytes():
    samples = [
        "00a30d636f6d2e6578616d706c653a78" + "c00502a1016141",  # symbol descriptor
        "005329" + "c00903a10361646443" + "5505",  # smallulong descriptor
        "0080" + "0000000000012345" + "5207",  # descriptor above 255: 8-byte ulong
        "0053fe" + "c10602" + "5301" + "a30161",  # map value
    ]
    for hexbytes in samples:
        value = dec(H(hexbytes))
        assert isinstance(value, Described)
        assert encode_value(value).hex() == hexbytes
    # the descriptor keeps the type it arrived with
    assert type(dec(H(samples[0])).descriptor) is Symbol
    assert type(dec(H(samples[1])).descriptor) is ULong
    # a small code sent in the wide 8-byte form comes back as the same ulong,
    # re-encoded in the compact form (the value and its type are kept)
    wide = dec(H("0080" + "0000000000000029" + "45"))
    assert typed_equal(wide, Described(ULong(0x29), []))
    assert encode_value(wide).hex() == "00532945"


@given(typed_values)
@settings(max_examples=400, deadline=None)
def test_round_trip_is_type_exact(value):
    encoded = encode_value(value)
    decoded, end = decode_value(encoded)
    assert end == len(encoded)
    assert typed_equal(decoded, value), (decoded, value)
    # compact encoding is canonical: decoding and re-encoding is the identity
    assert encode_value(decoded) == encoded
    assert skip_value(encoded) == len(encoded)


@given(typed_values, st.binary(max_size=8), st.binary(max_size=8))
@settings(max_examples=100, deadline=None)
def test_decode_at_offset_and_encode_into_appends(value, before, after):
    buf = bytearray(before)
    encode_into(buf, value)
    end = len(buf)
    buf += after
    decoded, stop = decode_value(memoryview(bytes(buf)), len(before))
    assert stop == end and typed_equal(decoded, value)


def test_plain_python_values_map_to_their_amqp_types():
    assert encode_value(7) == encode_value(Long(7))
    # a Python float is an AMQP double (1.0 section 1.6.11): 0x82, then IEEE 754 binary64
    # big-endian (2.0 = sign 0, exponent 0x400, mantissa 0)
    assert encode_value(2.0) == b"\x82\x40\x00\x00\x00\x00\x00\x00\x00"
    assert encode_value(bytearray(b"ab")) == encode_value(b"ab")
    assert encode_value(memoryview(b"ab")) == encode_value(b"ab")
    assert encode_value((1, 2)) == encode_value([1, 2])

    class Sub(str):
        pass

    assert encode_value(Sub("q")) == encode_value("q")


def test_float32_and_nan():
    assert Float(0.1) == dec(encode_value(Float(0.1)))
    assert math.isnan(dec(encode_value(float("nan"))))
    assert math.isnan(dec(encode_value(Float("nan"))))
    assert dec(encode_value(Float(1e300))) == float("inf")


def test_as_symbols():
    assert as_symbols(None) == ()
    assert as_symbols(Symbol("a")) == (Symbol("a"),)
    assert as_symbols(Array(0xB3, [Symbol("a"), Symbol("b")])) == ("a", "b")


# ---------------------------------------------------------------------- encode errors


@pytest.mark.parametrize(
    "value",
    [
        UInt(-1),
        UInt(2**32),
        UByte(256),
        ULong(-1),
        Byte(200),
        Int(2**31),
        2**63,
        Timestamp(2**63),
        "\ud800",
        Symbol("é"),
        Array(0x70, [UInt(1), "x"]),
        Array(0x12, []),
        Array(0x40, [1]),
        object(),
    ],
    ids=repr,
)
def test_unencodable_values_raise_encode_error(value):
    with pytest.raises(EncodeError):
        encode_value(value)


def test_encode_error_is_a_value_error_and_amqp_error():
    with pytest.raises(ValueError):
        encode_value(UInt(-5))
    assert issubclass(EncodeError, AMQPError)


# ---------------------------------------------------------------------- decode errors

BAD = [
    ("", "end of data"),
    ("01", "unknown type constructor 0x01"),
    ("70000001", "uint needs 4 bytes"),
    ("a005616263", "vbin8 needs 5 bytes"),
    ("b1ffffffff41", "str32 needs"),
    ("a102c328", "not valid UTF-8"),
    ("a301ff", "symbol is not ASCII"),
    ("5602", "boolean byte"),
    ("73ffffffff", "beyond Unicode"),
    ("c00302", "list8"),
    ("c00305" + "4040", "claims 5 elements"),
    ("c0030140" + "40", "elements used"),
    ("c10301" + "4040", "odd element count"),
    ("c10402404040", "size says"),
    ("d000000002", "list32 size and count"),
    ("d00000000100000000", "smaller than its count field"),
    ("00", "descriptor needs 1 bytes"),
    ("0053", "smallulong needs 1 bytes"),
    ("005301", "described value needs"),
    ("f0ffffffff00000001", "array32 needs"),
    ("e0020040", None),  # no elements: fine
    ("f000000005ffffffff40", "4294967295 zero-width elements exceeds the limit of 64"),
    ("e0024140", "65 zero-width elements exceeds"),
    ("f0000000050fffffff52", "claims 268435455 elements"),
    ("e0050100" + "5301" + "00", "nested described array"),
    ("e00201" + "02", "unknown array element constructor"),
]


@pytest.mark.parametrize(("hexbytes", "message"), BAD, ids=lambda x: str(x)[:30])
def test_malformed_input_raises_decode_error_with_description(hexbytes, message):
    if message is None:
        assert dec(H(hexbytes)) == Array(0x40, [])
        return
    with pytest.raises(DecodeError) as info:
        decode_value(H(hexbytes))
    assert info.value.condition == "amqp:decode-error"
    assert message in info.value.description, info.value.description


def test_zero_width_arrays_are_capped_the_same_both_ways():
    # found by atheris: 86 nulls decoded from a longer input must still
    # re-encode to bytes that decode again
    assert dec(encode_value(Array(0x40, [None] * 64))) == Array(0x40, [None] * 64)
    with pytest.raises(EncodeError, match="exceeds the limit of 64"):
        encode_value(Array(0x40, [None] * 65))
    assert dec(H("e0024041")) == Array(0x56, [True] * 64)
    assert dec(H("e0024043")) == Array(0x70, [UInt(0)] * 64)


def test_decode_error_names_the_offset():
    with pytest.raises(DecodeError, match="offset 4: uint needs 4 bytes, only 2 left"):
        # the list's own size bounds its elements, not the buffer
        decode_value(H("c00401" + "70" + "0000" + "0000"))


def test_nesting_is_bounded():
    value: list = []
    for _ in range(MAX_DEPTH + 5):
        value = [value]
    deep = encode_value(value)
    with pytest.raises(DecodeError, match="nested deeper"):
        decode_value(deep)
    shallow: list = []
    for _ in range(MAX_DEPTH - 1):
        shallow = [shallow]
    assert dec(encode_value(shallow)) == shallow


def test_skip_value_checks_bounds():
    assert skip_value(H("c003024041" + "99"), 0) == 5
    assert skip_value(H("005377a10176")) == 6
    with pytest.raises(DecodeError):
        skip_value(H("a005616263"))
    with pytest.raises(DecodeError):
        skip_value(H("02"))


# ------------------------------------------------------------------ maps a dict cannot hold


@pytest.mark.parametrize(
    ("hexbytes", "pairs"),
    [
        # uint 1 and ulong 1: one key to a dict, two to AMQP
        ("c10704" + "5201" + "40" + "5301" + "40", [(UInt(1), None), (ULong(1), None)]),
        # string "a" and symbol "a"
        ("c10904" + "a10161" + "41" + "a30161" + "42", [("a", True), (Symbol("a"), False)]),
        # false and smalllong 0, binary and decimal32 of the same 4 bytes
        ("c10704" + "42" + "40" + "5500" + "5301", [(False, None), (Long(0), ULong(1))]),
        ("c10e04" + "a00400000000" + "40" + "7400000000" + "40",
         [(b"\0\0\0\0", None), (Decimal32(b"\0\0\0\0"), None)]),
        # a repeated key
        ("c10b04" + "a3016b" + "5201" + "a3016b" + "5202", [(Symbol("k"), UInt(1)),
                                                       (Symbol("k"), UInt(2))]),
        # unhashable keys: a described list, a list, a map
        ("c10602" + "00530c45" + "41", [(Described(ULong(0x0C), []), True)]),
        ("c10602" + "c0020140" + "41", [([None], True)]),
    ],
    ids=lambda x: str(x)[:24],
)  # fmt: skip
def test_map_entries_are_never_lost(hexbytes, pairs):
    value = dec(H(hexbytes))
    assert type(value) is Map
    assert typed_equal(value, Map(pairs))
    assert encode_value(value) == H(hexbytes)


def test_a_map_a_dict_can_hold_decodes_to_a_dict():
    value = dec(encode_value({Symbol("a"): UInt(1), "b": Long(1), UInt(1): None}))
    assert type(value) is dict and list(value) == [Symbol("a"), "b", UInt(1)]


def test_map_reads_like_a_mapping():
    m = Map([(UInt(1), "first"), (Long(1), "second"), ([1], "list key")])
    assert m[1] == "first" and m.get(Long(1)) == "first" and m.get(7) is None
    assert len(m) == 3 and m.keys() == [UInt(1), Long(1), [1]]
    assert m.values() == ["first", "second", "list key"]
    assert Map(m.items()) == m and m != Map(m.items()[::-1])
    assert make_map([(UInt(1), 1), (Symbol("a"), 2)]) == {UInt(1): 1, "a": 2}
    assert type(make_map([(UInt(1), 1), (ULong(1), 2)])) is Map
    assert type(make_map([([], 1)])) is Map
