"""Fuzz: arbitrary and mutated bytes into every decoder. Only AMQPError
subclasses may escape; whatever decodes must re-encode and decode the same."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.amqp import performatives as P
from gateway.amqp.codec import decode_value, encode_value, skip_value
from gateway.amqp.errors import AMQPError
from gateway.amqp.framing import (
    AMQP_HEADER,
    FrameReader,
    encode_disposition,
    encode_flow,
    encode_frame,
    encode_transfer_frame,
    read_protocol_header,
)
from gateway.amqp.message import (
    AmqpValue,
    Header,
    Message,
    Properties,
    decode_message,
    decode_section,
    encode_message,
    split_sections,
)
from gateway.amqp.types import Array, Described, Symbol, UInt, ULong

from .test_codec_strategies import typed_equal, typed_values

FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_value(data: bytes) -> None:
    try:
        value, end = decode_value(data)
    except AMQPError:
        return
    assert 0 < end <= len(data)
    assert skip_value(data) == end
    again = encode_value(value)  # a decoded value always re-encodes
    decoded, stop = decode_value(again)
    assert stop == len(again) and typed_equal(decoded, value)


def check_frames(data: bytes, chunk: int = 0) -> None:
    reader = FrameReader(max_frame_size=4096)
    try:
        if chunk:
            for i in range(0, len(data), chunk):
                reader.feed(data[i : i + chunk])
                while (frame := reader.next_frame()) is not None:
                    encode_frame(frame.performative, frame.channel, frame.payload, frame.frame_type)
        else:
            reader.feed(data)
            while (frame := reader.next_frame()) is not None:
                encode_frame(frame.performative, frame.channel, frame.payload, frame.frame_type)
    except AMQPError:
        try:
            reader.next_frame()
        except AMQPError:
            return
        raise AssertionError("reader recovered after an error") from None


def check_message(data: bytes) -> None:
    try:
        msg = decode_message(data)
    except AMQPError:
        pass
    else:
        assert decode_message(encode_message(msg)) is not None
    try:
        for _, start, end in split_sections(data):
            try:
                decode_section(data, start, end)
            except AMQPError:
                pass
    except AMQPError:
        pass


def check_header(data: bytes) -> None:
    try:
        read_protocol_header(data)
    except AMQPError:
        pass
    reader = FrameReader()
    reader.feed(data)
    try:
        if reader.read_protocol_header() is not None:
            while reader.next_frame() is not None:
                pass
    except AMQPError:
        pass


@given(st.binary(max_size=200))
@FUZZ
def test_arbitrary_bytes_into_decode_value(data):
    check_value(data)


@given(st.binary(max_size=300), st.integers(0, 17))
@FUZZ
def test_arbitrary_bytes_into_frame_reader(data, chunk):
    check_frames(data, chunk)


@given(st.sampled_from([0, 1]), st.binary(max_size=300))
@FUZZ
def test_arbitrary_frame_bodies(frame_type, body):
    # a well-formed frame header around arbitrary bytes reaches the decoders
    check_frames((8 + len(body)).to_bytes(4, "big") + bytes([2, frame_type, 0, 0]) + body)
    # ... and the transfer fast path
    check_frames((11 + len(body)).to_bytes(4, "big") + b"\x02\x00\x00\x00\x00\x53\x14" + body)


@given(st.binary(max_size=300))
@FUZZ
def test_arbitrary_bytes_into_message_decoders(data):
    check_message(data)
    check_message(b"\x00\x53\x73" + data)


@given(st.binary(max_size=40))
@settings(max_examples=500, deadline=None)
def test_arbitrary_bytes_into_protocol_header(data):
    check_header(data)
    check_header(AMQP_HEADER + data)


# ------------------------------------------------- mutations of valid encodings


def _corpus() -> list[bytes]:
    attach = P.Attach(
        name="sender-link", handle=0, role=False, snd_settle_mode=2,
        source=P.Source(address="src", filter={Symbol("f"): Described(Symbol("f"), "x = 1")},
                        outcomes=Array(0xB3, [Symbol("amqp:accepted:list")])),
        target=P.Target(address="devices/d1/messages/events", capabilities=Symbol("queue")),
        properties={"com.microsoft:api-version": "2020-09-30"}, max_message_size=262144,
    )  # fmt: skip
    frames = b"".join([
        encode_frame(P.Open(container_id="c", max_frame_size=4096, idle_time_out=60000,
                            properties={"k": [1, 2.5, None]})),
        encode_frame(P.Begin(next_outgoing_id=0, incoming_window=2048, outgoing_window=2048), 1),
        encode_frame(attach, 1),
        encode_transfer_frame(1, 0, 0, b"tag", 0, False, False, b"\x00\x53\x75\xa0\x03abc"),
        encode_transfer_frame(1, 0, 1, b"t2", 0, None, True, b"x" * 40, state=P.Received(0, 3)),
        encode_flow(1, 0, 2048, 1, 2048, 0, 2, 98, None, True, True, {"p": 1}),
        encode_disposition(1, True, 0, 9, True, P.Rejected(P.Error("amqp:x", "d", {"i": 1}))),
        encode_frame(P.Detach(handle=0, closed=True, error=P.Error("amqp:link:detach-forced")), 1),
        encode_frame(None),
        encode_frame(P.Close(error=P.Error("amqp:connection:forced", "bye"))),
    ])  # fmt: skip
    message = encode_message(Message(
        header=Header(durable=True), message_annotations={"x": UInt(1)},
        properties=Properties(message_id=ULong(5), to="$cbs", reply_to="cbs"),
        application_properties={"operation": "put-token"}, body=[AmqpValue("token")],
        footer={"f": b"x"},
    ))  # fmt: skip
    values = [
        encode_value([None, True, UInt(7), "str", Symbol("sym"), b"bin", {Symbol("k"): [1, 2]},
                      Array(0x70, [UInt(1), UInt(300)]), Array(0xF0, [Array(0xB1, ["a"])]),
                      Described(ULong(0x77), {"a": 1.5}), Array(0xD1, [{1: 2}], Symbol("d"))]),
    ]  # fmt: skip
    return [frames, message, *values]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1 and b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 2:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        elif op == 3 and b:
            del b[i : i + rng.randint(1, 4)]
        else:
            b = b[:i]
    return bytes(b)


def test_mutated_valid_encodings_never_raise_anything_else():
    rng = random.Random(20240601)
    frames, message, *values = _corpus()
    for _ in range(3000):
        check_frames(_mutate(rng, frames), rng.choice([0, 1, 7, 64]))
        check_message(_mutate(rng, message))
        for v in values:
            check_value(_mutate(rng, v))


@given(typed_values, st.data())
@settings(max_examples=300, deadline=None)
def test_mutated_typed_values(value, data):
    encoded = encode_value(value)
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    for _ in range(5):
        check_value(_mutate(rng, encoded))
