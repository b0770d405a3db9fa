"""MQTT bench devices: a small asyncio MQTT 3.1.1 client, many devices per process.

    python -m bench.mqtt_load SPEC_FILE

paho-mqtt runs one network loop per client and costs more per message than
the relay under test, which would make the client the bottleneck at 100 QoS 1
publishes in flight; this client encodes the few packets it needs itself
(independently of gateway/mqtt) and handles every device on one event loop.

Each device connects (TLS when `tls`, verifying the bench CA and the hub host
name), sends an IoT Hub CONNECT (client id = device id, user name
`{hub}/{id}/?api-version=...`, password = SAS token), waits for CONNACK 0 and,
by `mode`:

- `throughput`: keeps `window` QoS 1 PUBLISHes in flight per device; after
  `warmup` seconds measures `duration` seconds of PUBACKs and the
  PUBLISH-to-PUBACK latency.
- `rate`: `rate` publishes per second in total (open loop, 1 ms ticks).
- `idle`: connects (`batch` at a time), reports, holds until SIGTERM.

Reports are JSON lines as in `bench.amqp_load`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import struct
import sys
import time
from typing import Any

from .devices import HUB_HOST, device_id, device_uri, mqtt_username, sas_token, telemetry_topic
from .loadstats import summary_ms
from .procs import emit, raise_fd_limit

KEEP_ALIVE = 600
TICK = 0.001
DRAIN_TIMEOUT = 5.0


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, username: str, password: str, keep_alive: int) -> bytes:
    variable = _utf8("MQTT") + bytes([4, 0x80 | 0x40 | 0x02]) + struct.pack("!H", keep_alive)
    payload = _utf8(client_id) + _utf8(username) + _utf8(password)
    body = variable + payload
    return b"\x10" + _varint(len(body)) + body


class PublishTemplate:
    """A QoS 1 PUBLISH with the packet id spliced in per message."""

    def __init__(self, topic: str, payload: bytes) -> None:
        topic_bytes = _utf8(topic)
        self.head = b"\x32" + _varint(len(topic_bytes) + 2 + len(payload)) + topic_bytes
        self.payload = payload

    def packet(self, packet_id: int) -> bytes:
        return b"".join((self.head, packet_id.to_bytes(2, "big"), self.payload))


class MqttDevice(asyncio.Protocol):
    def __init__(self, load: Load, index: int) -> None:
        self.load = load
        self.id = device_id(index)
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.state = "connecting"
        self.ready_at = 0.0
        self.connack = asyncio.get_running_loop().create_future()
        self.sent_at: dict[int, float] = {}
        self.next_id = 0
        self.template = PublishTemplate(telemetry_topic(self.id), load.payload)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        password = sas_token(device_uri(self.id), self.load.spec["key"])
        transport.write(connect_packet(self.id, mqtt_username(self.id), password, KEEP_ALIVE))

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            length, multiplier, i, complete = 0, 1, pos + 1, False
            for _ in range(4):  # remaining length: at most 4 bytes
                if i >= end:
                    break
                byte = buf[i]
                i += 1
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                if not byte & 0x80:
                    complete = True
                    break
            if not complete or end - i < length:
                break
            kind = buf[pos] >> 4
            if kind == 4 and length >= 2:  # PUBACK
                self.load.on_puback(self, int.from_bytes(buf[i : i + 2], "big"))
            elif kind == 2 and length >= 2:  # CONNACK
                if not self.connack.done():
                    self.connack.set_result(buf[i + 1])
            pos = i + length
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"closed before CONNACK: {exc}"))
        self.load.on_lost(self, exc)

    def publish(self) -> None:
        self.next_id = self.next_id % 65535 + 1
        packet_id = self.next_id
        assert self.transport is not None
        self.transport.write(self.template.packet(packet_id))
        self.sent_at[packet_id] = time.perf_counter()


class Load:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.mode: str = spec["mode"]
        self.window = int(spec.get("window", 1))
        self.payload = os.urandom(int(spec.get("size", 256)))
        self.devices: list[MqttDevice] = []
        self.failed: list[str] = []
        self.sending = False
        self.measuring = False
        self.closing = False
        self.acked_in_window = 0
        self.acked_total = 0
        self.sent_total = 0
        self.latencies: list[float] = []
        self.rate_missed = 0
        self.ssl_context: ssl.SSLContext | None = None
        if spec.get("tls"):
            self.ssl_context = ssl.create_default_context(cafile=spec["ca_file"])

    async def connect(self, index: int, t0: float, gate: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        async with gate:
            device: MqttDevice | None = None

            def factory() -> MqttDevice:
                nonlocal device
                device = MqttDevice(self, index)
                return device

            try:
                await loop.create_connection(
                    factory, self.spec["host"], self.spec["port"], ssl=self.ssl_context,
                    server_hostname=HUB_HOST if self.ssl_context else None,
                )  # fmt: skip
                assert device is not None
                code = await device.connack
            except (OSError, ConnectionError, ssl.SSLError) as exc:
                self.failed.append(f"{device_id(index)}: {exc}")
                return
            if code != 0:
                self.failed.append(f"{device.id}: CONNACK {code}")
                return
            device.state = "ready"
            device.ready_at = time.perf_counter() - t0
            self.devices.append(device)

    async def run(self) -> None:
        spec = self.spec
        count = int(spec["devices"])
        gate = asyncio.Semaphore(int(spec.get("batch", count)))
        t0 = time.perf_counter()
        tasks = [self.connect(spec["first"] + i, t0, gate) for i in range(count)]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), float(spec.get("timeout", 60)))
        except TimeoutError:
            emit("error", error=f"only {len(self.devices)} of {count} devices connected in time")
            return
        times = sorted(d.ready_at for d in self.devices)
        emit("connected", devices=len(self.devices), failed=len(self.failed),
             failures=self.failed[:5], elapsed_s=round(times[-1], 4) if times else None,
             ready_ms=summary_ms(times))  # fmt: skip
        if self.mode == "idle":
            await asyncio.Event().wait()  # until SIGTERM
        if self.failed:
            emit("error", error=self.failed[0])
            return
        await self.traffic()

    async def traffic(self) -> None:
        spec = self.spec
        self.sending = True
        loop = asyncio.get_running_loop()
        if self.mode == "rate":
            ticker = loop.create_task(self.tick())
        else:
            for device in self.devices:
                self.pump(device)
        await asyncio.sleep(float(spec.get("warmup", 1.0)))
        self.measuring = True
        emit("start")
        start = time.perf_counter()
        await asyncio.sleep(float(spec["duration"]))
        self.measuring = False
        elapsed = time.perf_counter() - start
        emit("result", messages=self.acked_in_window, elapsed_s=round(elapsed, 4),
             msgs_per_s=round(self.acked_in_window / elapsed, 2), latency=summary_ms(self.latencies),
             errors=0, sent_total=self.sent_total, acked_total=self.acked_total,
             rate_missed=self.rate_missed)  # fmt: skip
        # With `linger`, the same traffic goes on unmeasured while the harness traces syscalls.
        await asyncio.sleep(float(spec.get("linger", 0)))
        self.sending = False
        if self.mode == "rate":
            ticker.cancel()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while any(d.sent_at for d in self.devices) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # bounded drain of the last PUBACKs
        self.closing = True
        for device in self.devices:
            if device.transport is not None:
                device.transport.write(b"\xe0\x00")  # DISCONNECT
                device.transport.close()

    def pump(self, device: MqttDevice) -> None:
        window = self.window
        while self.sending and len(device.sent_at) < window:
            device.publish()
            self.sent_total += 1

    async def tick(self) -> None:
        rate = float(self.spec["rate"])
        begin = time.perf_counter()
        sent = 0
        devices = self.devices
        while self.sending:
            due = int((time.perf_counter() - begin) * rate)
            while sent < due:
                device = devices[sent % len(devices)]
                sent += 1
                if len(device.sent_at) >= self.window:
                    self.rate_missed += 1
                    continue
                device.publish()
                self.sent_total += 1
            await asyncio.sleep(TICK)

    def on_puback(self, device: MqttDevice, packet_id: int) -> None:
        sent = device.sent_at.pop(packet_id, None)
        if sent is None:
            return
        self.acked_total += 1
        if self.measuring:
            self.acked_in_window += 1
            self.latencies.append(time.perf_counter() - sent)
        if self.sending and self.mode != "rate":
            self.pump(device)

    def on_lost(self, device: MqttDevice, exc: Exception | None) -> None:
        if device.state == "ready" and not self.closing:
            device.state = "lost"
            emit("error", error=f"{device.id}: connection lost ({exc})")
            os._exit(1)


def _exit_on_term(signum: int, frame: Any) -> None:
    os._exit(0)  # idle holders: the kernel closes the sockets


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with open(args[0], encoding="utf-8") as f:
        spec = json.load(f)  # a file, not argv: it holds the device key
    raise_fd_limit()
    signal.signal(signal.SIGTERM, _exit_on_term)
    asyncio.run(Load(spec).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
