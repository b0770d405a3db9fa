"""Coverage-guided fuzzing of the AMQP codec with atheris (run by hand).

    pip install atheris
    python fuzz/atheris_amqp_codec.py -max_total_time=600 [corpus_dir]

The first input byte picks the target (type decoder, frame reader in several
chunkings, message decoder, protocol header); the rest is the input. Only
errors.AMQPError subclasses may escape; anything else is a crash to report.
atheris is not a project dependency.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import atheris
except ImportError:  # pragma: no cover - manual tool
    sys.exit("atheris is not installed: pip install atheris")

with atheris.instrument_imports():
    from gateway.amqp.codec import decode_value, encode_value, skip_value
    from gateway.amqp.errors import AMQPError
    from gateway.amqp.framing import FrameReader, encode_frame, read_protocol_header
    from gateway.amqp.message import decode_message, encode_message, split_sections


def _value(data: bytes) -> None:
    try:
        value, end = decode_value(data)
    except AMQPError:
        return
    if skip_value(data) != end:
        raise AssertionError("skip_value disagrees with decode_value")
    again = encode_value(value)
    if decode_value(again)[1] != len(again):
        raise AssertionError("re-encoded value does not decode to its own length")


def _frames(data: bytes, chunk: int) -> None:
    reader = FrameReader(max_frame_size=8192)
    try:
        step = chunk or len(data) or 1
        for i in range(0, len(data), step):
            reader.feed(data[i : i + step])
            while (frame := reader.next_frame()) is not None:
                encode_frame(frame.performative, frame.channel, frame.payload, frame.frame_type)
    except AMQPError:
        pass


def _message(data: bytes) -> None:
    try:
        encode_message(decode_message(data))
    except AMQPError:
        pass
    try:
        split_sections(data)
    except AMQPError:
        pass


def _header(data: bytes) -> None:
    try:
        read_protocol_header(data)
    except AMQPError:
        pass


def test_one_input(raw: bytes) -> None:
    if not raw:
        return
    selector, data = raw[0], raw[1:]
    target = selector % 6
    if target == 0:
        _value(data)
    elif target == 1:
        _frames(data, 0)
    elif target == 2:
        _frames(data, 1 + selector // 6 % 16)
    elif target == 3:
        # a valid frame header around the input: reaches the performative decoders
        _frames((8 + len(data)).to_bytes(4, "big") + b"\x02\x00\x00\x00" + data, 0)
    elif target == 4:
        _message(data)
    else:
        _header(data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
