"""Micro-benchmark of the MQTT relay's CPU per message, against a bare forwarder.

    python -m bench.mqtt_relay_micro            # full run (best of 3, ~1 minute)
    python -m bench.mqtt_relay_micro --quick    # smoke run (a few seconds)
    python -m bench.mqtt_relay_micro --profile  # also a cProfile of one gateway run

Scenario 3's traffic in one trio run, without TLS or other processes: a
device (a small client writing raw MQTT 3.1.1 bytes: QoS 1 PUBLISHes of 256
bytes, 100 in flight, a new one for each PUBACK) and a hub (an in-process
fake that answers CONNECT with CONNACK and each PUBLISH with a PUBACK, as
mosquitto does), over loopback TCP, with in between either:

- gateway: `relay_mqtt_connection` with the daemon's metrics observer
  (`Metrics.mqtt_observer`) and frame tracer (off), the hub handed to it as
  a plaintext stream through `open_upstream`;
- forwarder: two tasks copying bytes, one read then one write at a time.

Both relays get their two ends as `gateway.net.plain_stream.PlainStream`s,
the stream the daemon's plaintext listeners hand a relay.

Only the relay's own tasks are timed (thread CPU time per trio task step, by
an instrument); the device, the hub and trio's scheduler are not. The ratio
gateway/forwarder is what matters; absolute figures move with machine load.
Each path runs `--repeat` times, interleaved, and the best run counts. Loops
are bounded in count and each run in time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from gateway.config import parse_config_text
from gateway.mqtt_relay import CloseReason, Opened, relay_mqtt_connection
from gateway.net.ack_batching import AckBatching
from gateway.net.plain_stream import PlainStream
from gateway.ops.metrics import Metrics
from gateway.ops.trace import FrameTracer

WINDOW = 100
PAYLOAD = bytes(range(256))
DEVICE_ID = "bench-dev"
TOPIC = f"devices/{DEVICE_ID}/messages/events/"
USERNAME = f"bench.azure-devices.net/{DEVICE_ID}/?api-version=2021-04-12"
KEEP_ALIVE = 600
RECEIVE_SIZE = 262144
RUN_TIMEOUT = 120.0  # seconds, per run

CONFIG = """\
admin: {enabled: false}
listeners:
  - name: mqtt
    protocol: mqtt
    bind: "127.0.0.1:0"
connectors:
  - name: hub
    protocol: mqtt
    host: 127.0.0.1
    port: 8883
    allow_plaintext: true
mqtt_routes:
  - hub: "*"
    connector: hub
"""


# -- the device's bytes --------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _connect_packet() -> bytes:
    variable = _utf8("MQTT") + bytes([4, 0x80 | 0x40 | 0x02]) + KEEP_ALIVE.to_bytes(2, "big")
    body = variable + _utf8(DEVICE_ID) + _utf8(USERNAME) + _utf8("SharedAccessSignature sr=x")
    return b"\x10" + _varint(len(body)) + body


def _publish_packet(packet_id: int) -> bytes:
    body = _utf8(TOPIC) + packet_id.to_bytes(2, "big") + PAYLOAD
    return b"\x32" + _varint(len(body)) + body


# Packet ids cycle through more than the window, so none is reused while in flight.
ID_CYCLE = 10 * WINDOW
PUBLISHES = [_publish_packet(i + 1) for i in range(ID_CYCLE)]


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of one loopback TCP connection (TCP_NODELAY, as the gateway sets)."""
    listener = trio.socket.socket()
    client = trio.socket.socket()
    try:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        await client.connect(listener.getsockname())
        server, _ = await listener.accept()
    finally:
        listener.close()
    ends = trio.SocketStream(client), trio.SocketStream(server)
    for end in ends:
        end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    return ends


async def _send_chunked(stream: trio.SocketStream, packets: list[bytes], chunk: int) -> None:
    for i in range(0, len(packets), chunk):
        await stream.send_all(b"".join(packets[i : i + chunk]))


async def run_device(stream: trio.SocketStream, count: int, chunk: int) -> None:
    """CONNECT, then `count` QoS 1 PUBLISHes with WINDOW in flight, then DISCONNECT.

    PUBLISHes go `chunk` to a write; each write lets the other tasks run, so the
    relay's reads take what arrived in between, as from a device in its own process.
    """
    await stream.send_all(_connect_packet())
    connack = b""
    while len(connack) < 4:
        data = await stream.receive_some(4 - len(connack))
        if not data:
            raise RuntimeError("closed before CONNACK")
        connack += data
    if connack != b"\x20\x02\x00\x00":
        raise RuntimeError(f"CONNACK refused: {connack.hex()}")
    sent = min(WINDOW, count)
    await _send_chunked(stream, PUBLISHES[:sent], chunk)
    acked = 0
    pending = b""
    while acked < count:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise RuntimeError(f"closed after {acked} of {count} PUBACKs")
        pending += data
        n = len(pending) // 4  # PUBACK: 40 02 id id
        if pending[: 4 * n : 4].strip(b"\x40"):
            raise RuntimeError("the device got something other than a PUBACK")
        pending = pending[4 * n :]
        acked += n
        more = min(n, count - sent)
        if more:
            first = sent % ID_CYCLE
            batch = PUBLISHES[first : first + more]
            if len(batch) < more:
                batch += PUBLISHES[: more - len(batch)]
            await _send_chunked(stream, batch, chunk)
            sent += more
    await stream.send_all(b"\xe0\x00")  # DISCONNECT
    await stream.aclose()


async def run_hub(stream: trio.SocketStream, ack_each: bool) -> int:
    """CONNACK the CONNECT and PUBACK every QoS 1 PUBLISH until EOF; the PUBLISH count."""
    buf = b""
    published = 0
    while True:
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            await stream.aclose()
            return published
        buf += data
        answers = []
        pos, n = 0, len(buf)
        while pos + 2 <= n:
            remaining, shift, i = 0, 0, pos + 1
            while i < n:
                byte = buf[i]
                i += 1
                remaining |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            else:
                break
            end = i + remaining
            if end > n:
                break
            kind = buf[pos] >> 4
            if kind == 3:
                published += 1
                if buf[pos] & 0x06:
                    topic_end = i + 2 + int.from_bytes(buf[i : i + 2], "big")
                    answers.append(b"\x40\x02" + buf[topic_end : topic_end + 2])
            elif kind == 1:
                answers.append(b"\x20\x02\x00\x00")
            elif kind == 12:
                answers.append(b"\xd0\x00")
            pos = end
        buf = buf[pos:]
        if ack_each:  # one write per packet, as mosquitto writes them
            for answer in answers:
                await stream.send_all(answer)
        elif answers:
            await stream.send_all(b"".join(answers))


# -- the two relays ------------------------------------------------------------------


async def forward(device: PlainStream, upstream: PlainStream) -> str:
    """The bare forwarder: two tasks copying bytes, either side's end closes both."""

    async with trio.open_nursery() as nursery:

        async def copy(source: PlainStream, sink: PlainStream) -> None:
            try:
                while data := await source.receive_some(RECEIVE_SIZE):
                    await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(copy, device, upstream)
        nursery.start_soon(copy, upstream, device)
    await trio.aclose_forcefully(upstream)
    await trio.aclose_forcefully(device)
    return CloseReason.DEVICE_DISCONNECT


class Gateway:
    """`relay_mqtt_connection` as the daemon runs it: real metrics, tracer off."""

    def __init__(self) -> None:
        self.config = parse_config_text(CONFIG, "bench.yaml")
        self.metrics = Metrics(gateway_id="bench")
        self.observer = self.metrics.mqtt_observer("mqtt")
        self.tracer = FrameTracer()

    def published(self) -> float:
        value = self.metrics.registry.get_sample_value(
            "iotgw_mqtt_packets_total", {"type": "PUBLISH", "direction": "in"}
        )
        return value or 0.0

    async def relay(self, device: PlainStream, upstream: PlainStream) -> str:
        async def open_upstream(connector: Any, profile: Any) -> Opened:
            return Opened(upstream)

        return await relay_mqtt_connection(
            device,
            ("127.0.0.1", device.socket.getpeername()[1]),
            self.config.listeners[0],
            self.config,
            self.observer,
            open_upstream=open_upstream,
            ack_batching=AckBatching,
            tracer=self.tracer,
        )


# -- measuring -----------------------------------------------------------------------


class RelayCPU(trio.abc.Instrument):
    """Thread CPU time spent in the steps of the relay's tasks (its root and descendants)."""

    def __init__(self) -> None:
        self.tasks: set[trio.lowlevel.Task] = set()
        self.seconds = 0.0
        self.steps = 0
        self._started: float | None = None

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        nursery = task.parent_nursery
        if nursery is not None and nursery.parent_task in self.tasks:
            self.tasks.add(task)

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        self.tasks.discard(task)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task in self.tasks:
            self._started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        # A task joins the set during a step (the root) only from its next step on.
        if self._started is not None:
            self.seconds += time.thread_time() - self._started
            self.steps += 1
            self._started = None


@dataclass
class Run:
    path: str
    chunk: int  # PUBLISHes per device write
    messages: int
    relay_cpu: float  # seconds in the relay's task steps
    steps: int
    process_cpu: float  # the whole process: device, hub, relay, trio
    wall: float

    @property
    def cpu_per_10k(self) -> float:
        return self.relay_cpu / self.messages * 10_000

    @property
    def rate(self) -> float:
        return self.messages / self.wall


Relay = Callable[[PlainStream, PlainStream], Awaitable[str]]


@dataclass(frozen=True)
class Traffic:
    count: int  # PUBLISHes per run
    chunk: int  # PUBLISHes per device write
    ack_each: bool  # the hub writes each PUBACK on its own


async def run_once(path: str, relay: Relay, traffic: Traffic) -> Run:
    count = traffic.count
    device_end, device_side = await tcp_pair()
    upstream_side, hub_end = await tcp_pair()
    # The relay's ends are the streams the daemon hands a relay (the hub's, without TLS).
    relay_device = PlainStream.from_trio(device_side)
    relay_upstream = PlainStream.from_trio(upstream_side)
    meter = RelayCPU()
    reasons: list[str] = []
    published: list[int] = []

    async def measured() -> None:
        meter.tasks.add(trio.lowlevel.current_task())
        reasons.append(await relay(relay_device, relay_upstream))

    async def hub() -> None:
        published.append(await run_hub(hub_end, traffic.ack_each))

    trio.lowlevel.add_instrument(meter)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        with trio.fail_after(RUN_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hub)
                nursery.start_soon(measured)
                await run_device(device_end, count, traffic.chunk)
    finally:
        trio.lowlevel.remove_instrument(meter)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if reasons != [CloseReason.DEVICE_DISCONNECT] or published != [count]:
        raise RuntimeError(f"{path}: ended {reasons}, hub saw {published} of {count} PUBLISHes")
    return Run(path, traffic.chunk, count, meter.seconds, meter.steps, cpu, wall)


async def bench(shapes: list[Traffic], repeat: int, profile: bool) -> list[Run]:
    runs = []
    first = shapes[0]
    await run_once(
        "warm-up", Gateway().relay, Traffic(min(first.count, 5000), first.chunk, first.ack_each)
    )
    for traffic in shapes:
        print(f"{traffic.chunk} PUBLISH(es) per device write:", flush=True)
        for _ in range(repeat):
            for path in ("gateway", "forwarder"):
                gateway = Gateway()
                relay = gateway.relay if path == "gateway" else forward
                run = await run_once(path, relay, traffic)
                if path == "gateway" and gateway.published() != traffic.count:
                    raise RuntimeError(
                        f"metrics counted {gateway.published()} of {traffic.count} PUBLISHes"
                    )
                runs.append(run)
                print(
                    f"  {path:9s} {run.messages:>7,} msgs  {run.rate:>9,.0f} msg/s  "
                    f"relay CPU {run.cpu_per_10k:.4f} s/10k ({run.steps / run.messages:.2f} "
                    f"steps/msg)  process CPU {run.process_cpu / run.messages * 10_000:.4f} s/10k",
                    flush=True,
                )
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for traffic in shapes:
            await run_once("gateway", Gateway().relay, traffic)
        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats("gateway/|prometheus|metrics", 40)
        print(out.getvalue())
    return runs


def report(runs: list[Run]) -> str:
    lines = [
        "",
        "| best of runs, by PUBLISHes per device write | gateway | forwarder | gateway/forwarder |",
        "|---|--:|--:|--:|",
    ]
    for chunk in dict.fromkeys(r.chunk for r in runs):
        of = [r for r in runs if r.chunk == chunk]
        gw, fw = (min((r for r in of if r.path == p), key=lambda r: r.cpu_per_10k)
                  for p in ("gateway", "forwarder"))  # fmt: skip
        gw_rate, fw_rate = (max(r.rate for r in of if r.path == p)
                            for p in ("gateway", "forwarder"))  # fmt: skip
        lines += [
            f"| {chunk}: relay CPU per 10k msgs (s) | {gw.cpu_per_10k:.4f} "
            f"| {fw.cpu_per_10k:.4f} | {gw.cpu_per_10k / fw.cpu_per_10k:.2f} |",
            f"| {chunk}: relay task steps per msg | {gw.steps / gw.messages:.2f} "
            f"| {fw.steps / fw.messages:.2f} | |",
            f"| {chunk}: throughput (msg/s, in process) | {gw_rate:,.0f} | {fw_rate:,.0f} "
            f"| {gw_rate / fw_rate:.2f} |",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mqtt_relay_micro",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small counts, one run per path")
    parser.add_argument("--messages", type=int, help="PUBLISHes per run (default 60,000)")
    parser.add_argument("--repeat", type=int, help="runs per path (default 3)")
    parser.add_argument(
        "--ack-each", action="store_true", help="the hub writes each PUBACK on its own"
    )
    parser.add_argument(
        "--chunk",
        default="1,10",
        help="PUBLISHes per device write, one traffic shape per comma-separated value "
        "(default 1,10: one read per packet, and about ten packets per read)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile one more gateway run")
    args = parser.parse_args(argv)
    count = args.messages or (5_000 if args.quick else 60_000)
    repeat = args.repeat or (1 if args.quick else 3)
    print(
        f"MQTT QoS 1, {len(PAYLOAD)} B payload, {WINDOW} in flight, {count:,} msgs per run, "
        f"{repeat} run(s) per path{', PUBACK per hub write' if args.ack_each else ''}"
    )
    chunks = [max(1, int(c)) for c in args.chunk.split(",")]
    shapes = [Traffic(count, chunk, args.ack_each) for chunk in chunks]
    runs = trio.run(bench, shapes, repeat, args.profile)
    print(report(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
