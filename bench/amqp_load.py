"""AMQP bench devices: python-qpid-proton, many device connections in one Container.

    python -m bench.amqp_load SPEC_FILE

Each device opens its own connection (TLS when `tls`, else plaintext), puts its
SAS token over `$cbs` (no reply-to, as the C SDK does), attaches a sender to
`/devices/{id}/messages/events` and then, by `mode`:

- `throughput`: keeps `window` unsettled 1-delivery messages in flight per
  device (at least once: sent unsettled, the hub's disposition settles them);
  after `warmup` seconds measures `duration` seconds of accepted deliveries and
  their send-to-settle latency.
- `rate`: sends `rate` messages per second in total (open loop, 1 ms ticks).
  With `linger` seconds in the spec, traffic goes on that long after the
  result, unmeasured (the harness traces the hop's syscalls meanwhile).
- `idle`: connects, reports, then holds the connections until SIGTERM.
- `storm`: connects all devices at once and reports how long until each and
  all had their telemetry link attached (CBS + attach), then exits.

Reports go to stdout as JSON lines (`bench.procs.emit`): `connected`, then
`start` and `result` (traffic modes), or `error`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from proton import Message, SSLDomain
from proton.handlers import MessagingHandler
from proton.reactor import Container

from . import proton_epoll
from .devices import CBS_TOKEN_TYPE, HUB_HOST, device_id, device_uri, sas_token, telemetry_address
from .loadstats import summary_ms
from .procs import emit, raise_fd_limit

TICK = 0.001
DRAIN_TIMEOUT = 5.0


class Device:
    __slots__ = ("id", "conn", "cbs_tx", "cbs_rx", "sender", "state", "ready_at", "inflight",
                 "sent_at", "seq", "token_sent")  # fmt: skip

    def __init__(self, index: int) -> None:
        self.id = device_id(index)
        self.conn: Any = None
        self.cbs_tx: Any = None
        self.cbs_rx: Any = None
        self.sender: Any = None
        self.state = "connecting"
        self.ready_at = 0.0
        self.inflight = 0
        self.sent_at: dict[str, float] = {}
        self.seq = 0
        self.token_sent = False


def encoded_message(size: int) -> bytes:
    """One telemetry message as the SDKs send it: a data section of `size` bytes."""
    msg = Message(body=os.urandom(size // 2).hex().encode()[:size])
    msg.inferred = True
    msg.content_type = "application/octet-stream"
    return bytes(msg.encode())


class Load(MessagingHandler):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(prefetch=10, auto_accept=True, auto_settle=True)
        self.spec = spec
        self.mode: str = spec["mode"]
        self.window = int(spec.get("window", 1))
        self.payload = encoded_message(int(spec.get("size", 1024)))
        self.devices = [Device(spec["first"] + i) for i in range(spec["devices"])]
        self.container: Any = None
        self.t0 = 0.0
        self.ready = 0
        self.failed: list[str] = []
        self.sending = False
        self.measuring = False
        self.window_start = 0.0
        self.window_end = 0.0
        self.acked_in_window = 0
        self.acked_total = 0
        self.sent_total = 0
        self.latencies: list[float] = []
        self.errors = 0
        self.rate_begin = 0.0
        self.rate_sent = 0
        self.rate_missed = 0
        self.done = False
        self.result_sent = False

    # -- connecting -------------------------------------------------------------------

    def on_start(self, event: Any) -> None:
        self.container = event.container
        spec = self.spec
        scheme = "amqps" if spec.get("tls") else "amqp"
        url = f"{scheme}://{spec['host']}:{spec['port']}"
        domain = None
        if spec.get("tls"):
            domain = SSLDomain(SSLDomain.MODE_CLIENT)
            domain.set_trusted_ca_db(spec["ca_file"])
            domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
        self.t0 = time.perf_counter()
        for dev in self.devices:
            dev.conn = self.container.connect(
                url, ssl_domain=domain, virtual_host=HUB_HOST, allowed_mechs="ANONYMOUS",
                reconnect=False, sasl_enabled=True,
            )  # fmt: skip
            dev.conn.bench_device = dev
            dev.cbs_rx = self.container.create_receiver(dev.conn, "$cbs", name=f"cbs-rx-{dev.id}")
            dev.cbs_tx = self.container.create_sender(dev.conn, "$cbs", name=f"cbs-tx-{dev.id}")
        self.container.schedule(float(spec.get("timeout", 60)), _Call(self.on_connect_deadline))

    def device_of(self, event: Any) -> Device | None:
        conn = event.connection
        return None if conn is None else getattr(conn, "bench_device", None)

    def on_sendable(self, event: Any) -> None:
        dev = self.device_of(event)
        if dev is None:
            return
        if event.link == dev.cbs_tx:
            if not dev.token_sent:
                dev.token_sent = True
                audience = device_uri(dev.id)
                request = Message(
                    id=0,
                    properties={"operation": "put-token", "type": CBS_TOKEN_TYPE, "name": audience},
                    body=sas_token(audience, self.spec["key"]),
                )
                dev.cbs_tx.send(request)
        elif event.link == dev.sender:
            self.pump(dev)

    def on_message(self, event: Any) -> None:
        dev = self.device_of(event)
        if dev is None or dev.state != "connecting":
            return
        status = (event.message.properties or {}).get("status-code")
        if status != 200:
            self.fail(dev, f"CBS put-token answered {status}")
            return
        dev.state = "attaching"
        dev.sender = self.container.create_sender(
            dev.conn, telemetry_address(dev.id), name=f"telemetry-{dev.id}"
        )

    def on_link_opened(self, event: Any) -> None:
        dev = self.device_of(event)
        if dev is None or event.link != dev.sender or dev.state != "attaching":
            return
        if event.link.remote_target.address is None:
            return  # refused: the detach with the error follows
        dev.state = "ready"
        dev.ready_at = time.perf_counter() - self.t0
        self.ready += 1
        self.check_connected()

    def fail(self, dev: Device, why: str) -> None:
        if dev.state == "failed":
            return
        if dev.state == "ready":
            self.ready -= 1
        dev.state = "failed"
        self.failed.append(f"{dev.id}: {why}")
        if self.mode in ("throughput", "rate"):
            self.abort(f"{dev.id}: {why}")
            return
        self.check_connected()

    def on_link_error(self, event: Any) -> None:
        dev = self.device_of(event)
        if dev is not None and not self.done:
            self.fail(dev, f"link {event.link.name}: {event.link.remote_condition}")

    def on_connection_error(self, event: Any) -> None:
        dev = self.device_of(event)
        if dev is not None and not self.done:
            self.fail(dev, f"connection: {event.connection.remote_condition}")

    def on_transport_error(self, event: Any) -> None:
        dev = self.device_of(event)
        if dev is not None and not self.done:
            self.fail(dev, f"transport: {event.transport.condition}")

    def on_disconnected(self, event: Any) -> None:
        dev = self.device_of(event)
        if dev is not None and not self.done and dev.state != "failed":
            self.fail(dev, "disconnected")

    def check_connected(self) -> None:
        if self.ready + len(self.failed) < len(self.devices) or self.result_sent:
            return
        times = sorted(d.ready_at for d in self.devices if d.state == "ready")
        stats = summary_ms(times)
        emit("connected", devices=self.ready, failed=len(self.failed),
             failures=self.failed[:5], elapsed_s=round(times[-1], 4) if times else None,
             ready_ms=stats)  # fmt: skip
        if self.mode == "storm":
            self.result_sent = True
            self.finish()
        elif self.mode == "idle":
            self.result_sent = True
        elif self.failed:
            self.abort(self.failed[0])
        else:
            self.begin_traffic()

    def on_connect_deadline(self) -> None:
        if self.ready + len(self.failed) < len(self.devices):
            self.abort(f"only {self.ready} of {len(self.devices)} devices attached in time")

    # -- traffic ------------------------------------------------------------------------

    def begin_traffic(self) -> None:
        spec = self.spec
        now = time.perf_counter()
        self.sending = True
        self.window_start = now + float(spec.get("warmup", 1.0))
        self.window_end = self.window_start + float(spec["duration"])
        self.container.schedule(self.window_start - now, _Call(self.on_window_start))
        self.container.schedule(self.window_end - now, _Call(self.on_window_end))
        if self.mode == "rate":
            self.rate_begin = now
            self.container.schedule(TICK, _Call(self.on_tick))
        else:
            for dev in self.devices:
                self.pump(dev)

    def on_window_start(self) -> None:
        self.measuring = True
        emit("start")

    def on_window_end(self) -> None:
        self.measuring = False
        elapsed = time.perf_counter() - self.window_start
        emit("result", messages=self.acked_in_window, elapsed_s=round(elapsed, 4),
             msgs_per_s=round(self.acked_in_window / elapsed, 2), latency=summary_ms(self.latencies),
             errors=self.errors, sent_total=self.sent_total, acked_total=self.acked_total,
             rate_missed=self.rate_missed)  # fmt: skip
        linger = float(self.spec.get("linger", 0))
        if linger > 0:  # the same traffic on, unmeasured, while the harness traces syscalls
            self.container.schedule(linger, _Call(self.end_sending))
        else:
            self.end_sending()

    def end_sending(self) -> None:
        self.sending = False
        self.result_sent = True
        self.container.schedule(DRAIN_TIMEOUT, _Call(self.finish))
        self.maybe_finish()

    def pump(self, dev: Device) -> None:
        sender = dev.sender
        if sender is None or not self.sending or self.mode == "rate":
            return
        window = self.window
        payload = self.payload
        while dev.inflight < window and sender.credit > 0:
            self.send_one(dev, sender, payload)

    def send_one(self, dev: Device, sender: Any, payload: bytes) -> None:
        dev.seq += 1
        tag = str(dev.seq)
        sender.delivery(tag)
        sender.stream(payload)
        sender.advance()
        dev.sent_at[tag] = time.perf_counter()
        dev.inflight += 1
        self.sent_total += 1

    def on_tick(self) -> None:
        if not self.sending:
            return
        due = int((time.perf_counter() - self.rate_begin) * float(self.spec["rate"]))
        devices = self.devices
        while self.rate_sent < due:
            dev = devices[self.rate_sent % len(devices)]
            self.rate_sent += 1
            if dev.sender is None or dev.sender.credit <= 0 or dev.inflight >= self.window:
                self.rate_missed += 1
                continue
            self.send_one(dev, dev.sender, self.payload)
        self.container.schedule(TICK, _Call(self.on_tick))

    def on_accepted(self, event: Any) -> None:
        self.settled(event, ok=True)

    def on_rejected(self, event: Any) -> None:
        self.settled(event, ok=False)

    def on_released(self, event: Any) -> None:
        self.settled(event, ok=False)

    def settled(self, event: Any, ok: bool) -> None:
        dev = self.device_of(event)
        if dev is None or event.link != dev.sender:
            return
        sent = dev.sent_at.pop(event.delivery.tag, None)
        if sent is None:
            return
        now = time.perf_counter()
        dev.inflight -= 1
        if not ok:
            self.errors += 1
        else:
            self.acked_total += 1
            if self.measuring:
                self.acked_in_window += 1
                self.latencies.append(now - sent)
        if self.sending:
            self.pump(dev)
        else:
            self.maybe_finish()

    # -- ending -------------------------------------------------------------------------

    def maybe_finish(self) -> None:
        if self.result_sent and all(d.inflight == 0 for d in self.devices):
            self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        for dev in self.devices:
            if dev.conn is not None:
                dev.conn.close()
        self.container.schedule(DRAIN_TIMEOUT, _Call(self.container.stop))

    def abort(self, why: str) -> None:
        if not self.done:
            emit("error", error=why)
            self.result_sent = True
            self.finish()

    def on_connection_closed(self, event: Any) -> None:
        if self.done and all(d.conn is None or d.conn.state & d.conn.REMOTE_CLOSED
                             for d in self.devices):  # fmt: skip
            self.container.stop()


class _Call:
    """A Container timer handler that calls `fn`."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def on_timer_task(self, event: Any) -> None:
        self.fn()


def _exit_on_term(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with open(args[0], encoding="utf-8") as f:
        spec = json.load(f)  # a file, not argv: it holds the device key
    raise_fd_limit()
    signal.signal(signal.SIGTERM, _exit_on_term)
    proton_epoll.install()
    try:
        Container(Load(spec)).run()
    except SystemExit:
        os._exit(0)  # SIGTERM: leave at once; the kernel closes the sockets
    return 0


if __name__ == "__main__":
    sys.exit(main())
