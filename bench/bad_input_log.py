"""Log volume under bad input: what unauthenticated devices can make the daemon write.

    python -m bench.bad_input_log [--count 1000] [--concurrency 50]

Starts the real daemon at log level INFO with trace off (`python -m gateway run
-c <generated yaml>`, an MQTT and an AMQP listener, connectors to a closed
loopback port), then sends `--count` bad inputs, each on a connection of its
own, cycling through the kinds below, and reads until the daemon closes. Then
it stops the daemon (so counts of suppressed lines are written too) and
reports the log's size in bytes and its longest line.

MQTT: CONNECTs with 65,535-byte client id, user name and password; CONNECTs
under the size limit with a 5,000-character client id, user name or password;
a CONNECT with a 60,000-character protocol name; garbage first bytes; a
remaining length longer than 4 bytes; a second CONNECT; CONNECTs with long
Will topics; valid CONNECTs with 128-character client ids (the hub is
unreachable: refused with "server unavailable").
AMQP: a bad protocol header; garbage after the header; a SASL-INIT with a
60 KB response and one with an 8,000-character mechanism name; an oversized
open; an open with long container id and host name followed by attaches with
long link names and addresses (no route for them).

Exits 1 if the log is over `--limit-mb` (5) or a line is over `--max-line`
(4,000) characters.
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from gateway.amqp.framing import FRAME_SASL, encode_frame
from gateway.amqp.performatives import Attach, Begin, Open, SaslInit, Source, Target
from gateway.amqp.types import Symbol

from .preauth_memory import _field, _varint, config_text, huge_connect, huge_sasl_init, one_round
from .procs import Child, free_port, wait_for_port

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"


def mqtt_connect(client_id: bytes, username: bytes | None = None, password: bytes | None = None,
                 will: tuple[bytes, bytes] | None = None, name: bytes = b"MQTT",
                 level: int = 4) -> bytes:  # fmt: skip
    flags = 0x02
    payload = _field(client_id)
    if will is not None:
        flags |= 0x04
        payload += _field(will[0]) + _field(will[1])
    if username is not None:
        flags |= 0x80
        payload += _field(username)
    if password is not None:
        flags |= 0x40
        payload += _field(password)
    body = _field(name) + bytes([level, flags]) + struct.pack(">H", 30) + payload
    return b"\x10" + _varint(len(body)) + body


def user(n: int) -> bytes:
    return (b"hub.example/dev/?api-version=2021-04-12&x=" + b"u" * n)[: max(n, 40)]


def amqp_open_and_attaches(n: int) -> bytes:
    out = AMQP_HEADER
    out += encode_frame(Open("c" * 3000, hostname="h" * 3000))
    out += encode_frame(Begin(None, 0, 100, 100))
    for handle in range(n):
        name = f"link-{handle}-" + "n" * 3000
        address = f"nowhere/{handle}/" + "a" * 3000
        out += encode_frame(Attach(name, handle, False, source=Source(address),
                                   target=Target(address)))  # fmt: skip
    return out


KINDS: list[tuple[str, str, Callable[[int], bytes]]] = [
    ("mqtt", "huge CONNECT", huge_connect),
    ("mqtt", "long client id", lambda i: mqtt_connect(b"c" * 5000, user(60), b"p")),
    ("mqtt", "long user name", lambda i: mqtt_connect(f"d{i}".encode(), user(5000), b"p")),
    ("mqtt", "long password", lambda i: mqtt_connect(f"d{i}".encode(), user(60), b"p" * 5000)),
    ("mqtt", "long protocol name", lambda i: mqtt_connect(b"d", name=b"X" * 60000)),
    ("mqtt", "garbage", lambda i: b"\xff" * 1000),
    ("mqtt", "bad remaining length", lambda i: b"\x10\xff\xff\xff\xff\xff"),
    ("mqtt", "long Will topic", lambda i: mqtt_connect(f"d{i}".encode(), user(60), b"p",
                                                      will=(b"t" * 10000, b"x"))),  # fmt: skip
    ("mqtt", "valid, hub down", lambda i: mqtt_connect(b"%03d" % (i % 1000) + b"d" * 125,
                                                      user(200), b"p")),  # fmt: skip
    ("amqp", "bad header", lambda i: b"HTTP/1.1 200 OK\r\n" * 100),
    ("amqp", "garbage frames", lambda i: AMQP_HEADER + b"\x00\x00\x10\x00" + b"\xee" * 4092),
    ("amqp", "huge SASL-INIT", lambda i: huge_sasl_init()),
    ("amqp", "long SASL mechanism", lambda i: SASL_HEADER + encode_frame(
        SaslInit(Symbol("M" * 8000)), frame_type=FRAME_SASL)),  # fmt: skip
    ("amqp", "oversized open", lambda i: AMQP_HEADER + encode_frame(Open("c" * 60000))),
    ("amqp", "long attach names", lambda i: amqp_open_and_attaches(3)),
]


async def run_inputs(ports: dict[str, int], count: int, concurrency: int) -> dict[str, int]:
    totals: dict[str, int] = {}
    sent = 0
    while sent < count:
        batch = min(concurrency, count - sent)
        by_port: dict[int, list[bytes]] = {}
        for i in range(sent, sent + batch):
            protocol, _, make = KINDS[i % len(KINDS)]
            by_port.setdefault(ports[protocol], []).append(make(i))
        async with trio.open_nursery() as nursery:
            for port, payloads in by_port.items():

                async def one(port: int = port, payloads: list[bytes] = payloads) -> None:
                    for k, v in (await one_round(port, payloads, 60.0, 3.0)).items():
                        totals[k] = totals.get(k, 0) + v

                nursery.start_soon(one)
        sent += batch
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bad_input_log", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--limit-mb", type=float, default=5.0)
    parser.add_argument("--max-line", type=int, default=4000)
    parser.add_argument("--keep-log", type=Path, help="copy the daemon's log here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bad-input-log-") as tmp:
        log_dir = Path(tmp)
        mqtt_port, amqp_port, hub_port = free_port(), free_port(), free_port()
        config = log_dir / "gateway.yaml"
        config.write_text(config_text(mqtt_port, amqp_port, hub_port, "info"))
        child = Child("gateway", [sys.executable, "-m", "gateway", "run", "-c", str(config)],
                      log_dir)  # fmt: skip
        try:
            wait_for_port(mqtt_port, child, 30.0)
            wait_for_port(amqp_port, child, 30.0)
            start = child.log_path.stat().st_size
            t0 = time.monotonic()
            totals = trio.run(run_inputs, {"mqtt": mqtt_port, "amqp": amqp_port}, args.count,
                              args.concurrency)  # fmt: skip
            elapsed = time.monotonic() - t0
            alive = child.alive()
        finally:
            child.stop()  # SIGTERM: the daemon writes its last counts of suppressed lines
        data = child.log_path.read_bytes()[start:]
        if args.keep_log is not None:
            args.keep_log.write_bytes(data)
        lines = data.split(b"\n")
        longest = max((len(line.decode("utf-8", "replace")) for line in lines), default=0)
        over = sum(1 for line in lines if len(line.decode("utf-8", "replace")) > args.max_line)
        suppressed = sum(1 for line in lines if b"more like this" in line)
        print(f"{args.count} bad inputs ({len(KINDS)} kinds) in {elapsed:.1f} s, devices {totals}")
        print(f"log: {len(data)} bytes ({len(data) / 2**20:.2f} MB) in {len(lines) - 1} lines, "
              f"longest {longest} characters, {over} over {args.max_line}, "
              f"{suppressed} 'suppressed' lines; daemon {'alive' if alive else 'DEAD'}")  # fmt: skip
        ok = alive and len(data) <= args.limit_mb * 2**20 and over == 0
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
