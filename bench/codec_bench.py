"""Micro-benchmark of the AMQP codec hot paths (the per-message work of the relay).

    python bench/codec_bench.py            # full run (a few seconds)
    python bench/codec_bench.py --quick    # smoke run for CI

Each case runs a fixed number of iterations, repeated; the best repeat is
reported as operations per second. Loops are bounded in count, never in time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.amqp.codec import decode_value  # noqa: E402
from gateway.amqp.framing import (  # noqa: E402
    FrameReader,
    encode_disposition,
    encode_flow,
    encode_frame,
    encode_transfer_frame,
)
from gateway.amqp.performatives import (  # noqa: E402
    Accepted,
    Disposition,
    Flow,
    Transfer,
    decode_performative,
)

PAYLOAD = bytes(1024)  # a 1 KiB message, as in the relay benchmarks
TAG = b"\x00\x00\x00\x00\x00\x00\x30\x39"  # 8-byte tags, as proton and the SDKs use
ACCEPTED = Accepted()


def cases() -> list[tuple[str, Callable[[], object]]]:
    transfer = encode_transfer_frame(1, 0, 123456, TAG, 0, False, False, PAYLOAD)
    batch = transfer * 100

    def decode_transfer() -> object:
        reader = FrameReader(65536)
        reader.feed(transfer)
        return reader.next_frame()

    def decode_transfer_batch() -> object:
        # one read holding 100 frames: the per-frame cost without reader setup
        reader = FrameReader(65536)
        reader.feed(batch)
        next_frame = reader.next_frame
        for _ in range(100):
            next_frame()
        return reader

    body = memoryview(transfer)[8:]

    def decode_transfer_generic() -> object:
        value, end = decode_value(body)
        return decode_performative(value), body[end:]

    flow = encode_flow(1, 123457, 2048, 5000, 2048, 0, 123457, 100)
    disposition = encode_disposition(1, True, 123456, None, True, ACCEPTED)

    def decode_flow() -> object:
        reader = FrameReader(65536)
        reader.feed(flow)
        return reader.next_frame()

    def decode_disposition() -> object:
        reader = FrameReader(65536)
        reader.feed(disposition)
        return reader.next_frame()

    def encode_transfer() -> object:
        return encode_transfer_frame(1, 0, 123456, TAG, 0, False, False, PAYLOAD)

    def encode_transfer_generic() -> object:
        return encode_frame(
            Transfer(
                handle=0, delivery_id=123456, delivery_tag=TAG, message_format=0, settled=False
            ),
            1,
            PAYLOAD,
        )

    def encode_flow_fast() -> object:
        return encode_flow(1, 123457, 2048, 5000, 2048, 0, 123457, 100)

    def encode_flow_generic() -> object:
        return encode_frame(Flow(123457, 2048, 5000, 2048, 0, 123457, 100), 1)

    def encode_disposition_fast() -> object:
        return encode_disposition(1, True, 123456, None, True, ACCEPTED)

    def encode_disposition_generic() -> object:
        return encode_frame(Disposition(True, 123456, None, True, ACCEPTED), 1)

    return [
        ("decode transfer frame (1 KiB payload, new reader)", decode_transfer),
        ("decode transfer frame (100 per read), per frame", decode_transfer_batch),
        ("  generic decode_value + decode_performative", decode_transfer_generic),
        ("decode flow frame (link flow)", decode_flow),
        ("decode disposition frame (settled, accepted)", decode_disposition),
        ("encode transfer frame (1 KiB payload)", encode_transfer),
        ("  generic encode_frame(Transfer(...))", encode_transfer_generic),
        ("encode flow frame (link flow)", encode_flow_fast),
        ("  generic encode_frame(Flow(...))", encode_flow_generic),
        ("encode disposition frame (settled, accepted)", encode_disposition_fast),
        ("  generic encode_frame(Disposition(...))", encode_disposition_generic),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    args = parser.parse_args(argv)
    number, repeat = (200, 2) if args.quick else (20000, 5)
    cpu = platform.processor() or platform.machine()
    print(
        f"# codec micro-benchmark: python {platform.python_version()}, {os.cpu_count()} CPUs, {cpu}"
    )
    print(f"# best of {repeat} x {number} iterations")
    for name, fn in cases():
        per_call = 100 if "100 per read" in name else 1
        n = max(1, number // per_call)
        best = min(timeit.Timer(fn).repeat(repeat=repeat, number=n))
        ops = n * per_call / best
        print(f"{name:<52} {ops:>12,.0f} ops/s  {1e6 / ops:8.2f} us/op")
    return 0


if __name__ == "__main__":
    sys.exit(main())
