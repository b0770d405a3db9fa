"""Micro-benchmark of the whole AMQP router path per relayed message, without I/O.

    python -m bench.amqp_router_micro              # full run (a few seconds)
    python -m bench.amqp_router_micro --quick      # smoke run
    python -m bench.amqp_router_micro --batch 5    # ~5 messages per read, as scenario 1 runs
    python -m bench.amqp_router_micro --profile /tmp/router.prof   # cProfile of the gateway calls

A real `gateway.router.Router`, wired as the daemon wires it (`Metrics`,
`Registry`, `OpsObserver`, relay latency through `timed_handler`), relays
scenario 1's traffic between a device and a hub played by
python-qpid-proton's engine (``proton.Connection`` + ``proton.Transport``, no
sockets): one device sender, 1 KiB messages sent unsettled with up to 100 in
flight, the hub granting credit and settling each message with accepted as
hubsim does. The device's identity is authorised on its binding as a CBS
put-token would leave it; everything after that is the production path.

Each side of the gateway is driven the way `gateway.net.amqp_connector.EngineDriver`
drives it: the reader feeds the received bytes to the engine, ticks it and
dispatches the events (through the driver's own `_dispatch`, so wake batching
is the real one); the writer takes ``data_to_send()`` and ticks. Only those
calls are timed: the result is the gateway's CPU per relayed message above
the socket and TLS layer. Loops are bounded in count.

By default the device writes as much as its credit allows before the gateway
reads, so each read carries tens of messages. ``--batch N`` has the device
write at most N messages per round trip through the gateway (the device's
chunk, the hub's dispositions for it, the relay back), which is the shape of
the real run over sockets (about 5 messages per read and write). The gateway's
work per message does not depend on how many are in flight, only on how many
share a read, a write and a disposition range.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import time
from typing import Any

from proton import Delivery, Event

from bench.amqp_relay_micro import ProtonPeer
from gateway.config import parse_config_text
from gateway.net.amqp_connector import EngineDriver, client_engine_for
from gateway.net.upstream_io import AmqpConnectorIO
from gateway.ops.metrics import Metrics
from gateway.ops.registry import Registry
from gateway.ops.router_observer import OpsObserver
from gateway.ops.trace import FrameTracer
from gateway.router.core import Binding, Router
from gateway.router.linkpair import timed_handler
from gateway.router.upstream import UpstreamConn

HUB_HOST = "myhub.azure-devices.net"
DEVICE_ID = "d1"
PAYLOAD = bytes(1024)
IN_FLIGHT = 100
HUB_CREDIT = 100  # hubsim's CREDIT_WINDOW: topped up when below half

CONFIG = f"""
gateway: {{id: bench-gateway}}
admin: {{enabled: false}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "127.0.0.1:0", sasl: [anonymous]}}
connectors:
  - name: hub-amqp
    protocol: amqp
    host: {HUB_HOST}
    port: 5671
    allow_plaintext: true
    pool: {{max_connections: 4, max_devices_per_connection: 200}}
link_routes:
  - {{prefix: "$cbs", connector: hub-amqp}}
  - {{prefix: "devices/", connector: hub-amqp}}
"""


class Side:
    """One gateway connection and its driver, pumped as EngineDriver's two tasks do."""

    def __init__(self, engine: Any, handler: Any, name: str, timer: Timer) -> None:
        self.engine = engine
        self.driver = EngineDriver(None, engine, handler, name=name)  # type: ignore[arg-type]
        self.timer = timer

    def read(self, data: bytes) -> None:
        """The reader task: one received chunk."""
        t = self.timer
        t.start()
        engine = self.engine
        events = engine.receive_data(data)
        late = engine.tick(time.monotonic())
        if late:
            events = events + late
        if events:
            self.driver._dispatch(events)
        t.stop()

    def write(self) -> bytes:
        """The writer task: everything queued, in one write."""
        t = self.timer
        t.start()
        engine = self.engine
        data = engine.data_to_send()
        if data:
            late = engine.tick(time.monotonic())
            if late:
                self.driver._dispatch(late)
        t.stop()
        return data


class Timer:
    """Accumulates the time spent in the gateway's calls (and profiles only those)."""

    def __init__(self, profiler: cProfile.Profile | None) -> None:
        self.total = 0.0
        self._started = 0.0
        self._profiler = profiler

    def start(self) -> None:
        if self._profiler is not None:
            self._profiler.enable()
        self._started = time.perf_counter()

    def stop(self) -> None:
        self.total += time.perf_counter() - self._started
        if self._profiler is not None:
            self._profiler.disable()


class RouterBench:
    """device (proton) -> gateway router (device conn, link pair, upstream conn) -> hub (proton)."""

    def __init__(self, profiler: cProfile.Profile | None = None, batch: int = 0) -> None:
        self.timer = Timer(profiler)
        self.batch = batch  # messages the device writes per round trip (0: all it may)
        config = parse_config_text(CONFIG, "bench.yaml")
        self.metrics = Metrics(gateway_id="bench-gateway")
        self.registry = Registry()
        self.observer = OpsObserver(self.metrics, self.registry)
        self.router = Router(config, connector_io=AmqpConnectorIO(), observer=self.observer,
                             tracer=FrameTracer(protocols=()))
        connector = config.connectors[0]
        report = self.observer.on_relay_latency

        device = self.router.new_device(config.listeners[0], ("127.0.0.1", 40000))
        self.dev_side = Side(device.engine, timed_handler(device.handle, report), device.id,
                             self.timer)  # fmt: skip
        device.driver = self.dev_side.driver

        engine = client_engine_for(connector, None, self.router.container_id)
        upstream = UpstreamConn(self.router, connector.name, 0, engine)
        self.up_side = Side(engine, timed_handler(upstream.handle, report), upstream.id,
                            self.timer)  # fmt: skip
        upstream.set_driver(self.up_side.driver)
        engine.open()
        self.router.upstreams.add(upstream)
        self.observer.on_upstream_open(upstream, f"{connector.host}:{connector.port}")

        # The device's binding to the upstream connection, its put-token accepted.
        binding = Binding(self.router, device, connector.name, self.router.pools[connector.name])
        binding.upstream = upstream
        upstream.bindings.add(binding)
        binding.authorise(f"{HUB_HOST}/devices/{DEVICE_ID}")
        binding.ready.set()
        device.bindings[connector.name] = binding
        self.device_conn = device
        self.upstream = upstream

        self.hub = ProtonPeer(server=True, sasl_anonymous=True)
        self.hub.conn.container = "hub"
        for _ in range(20):  # the upstream connection is open before devices come
            if engine.is_open:
                break
            self.hub.feed(self.up_side.write())
            self._hub_events()
            self.up_side.read(self.hub.take())
        else:
            raise RuntimeError("the upstream connection did not open")

        self.device = ProtonPeer(server=False, sasl_anonymous=True)
        dc = self.device.conn
        dc.container = "device"
        dc.hostname = HUB_HOST
        dc.open()
        ds = dc.session()
        ds.open()
        self.sender = ds.sender("events-sender")
        self.sender.target.address = f"/devices/{DEVICE_ID}/messages/events"
        self.sender.open()
        self.tags = 0
        self.in_flight = 0
        self.settled = 0
        self._handshake()

    # ------------------------------------------------------------------ pumping

    def _pump_once(self) -> bool:
        moved = False
        data = self.device.take()
        if data:
            moved = True
            self.dev_side.read(data)
        data = self.up_side.write()
        if data:
            moved = True
            self.hub.feed(data)
            self._hub_events()
        data = self.hub.take()
        if data:
            moved = True
            self.up_side.read(data)
        data = self.dev_side.write()
        if data:
            moved = True
            self.device.feed(data)
            self._device_events()
        return moved

    def _handshake(self) -> None:
        for _ in range(50):
            self._pump_once()
            if self.sender.credit > 0:
                return
        raise RuntimeError("the device link did not get credit through the router")

    def _hub_events(self) -> None:
        for ev in self.hub.events():
            t = ev.type
            if t == Event.DELIVERY:
                d = ev.delivery
                link = d.link
                if not link.is_receiver or not d.readable or d.partial:
                    continue
                link.recv(d.pending)
                if link.credit < HUB_CREDIT // 2:
                    link.flow(HUB_CREDIT - link.credit)
                d.update(Delivery.ACCEPTED)
                d.settle()
            elif t == Event.CONNECTION_REMOTE_OPEN:
                ev.connection.open()
            elif t == Event.SESSION_REMOTE_OPEN:
                ev.session.open()
            elif t == Event.LINK_REMOTE_OPEN:
                link = ev.link
                link.source.copy(link.remote_source)
                link.target.copy(link.remote_target)
                link.open()
                if link.is_receiver:
                    link.flow(HUB_CREDIT)

    def _device_events(self) -> None:
        for ev in self.device.events():
            if ev.type == Event.DELIVERY:
                d = ev.delivery
                # proton's ``settled`` is the hub's (remote) settlement
                if d.remote_state and d.settled and not getattr(d, "bench_done", False):
                    d.bench_done = True
                    d.settle()
                    self.in_flight -= 1
                    self.settled += 1

    def _send(self) -> None:
        sender = self.sender
        limit = IN_FLIGHT if not self.batch else min(IN_FLIGHT, self.in_flight + self.batch)
        while self.in_flight < limit and sender.credit > 0:
            self.tags += 1
            sender.delivery(str(self.tags).encode())
            sender.send(PAYLOAD)
            sender.advance()
            self.in_flight += 1

    def run(self, messages: int) -> tuple[float, int]:
        """Relay `messages` more messages end to end: (gateway seconds, messages settled)."""
        target = self.settled + messages
        before_t, before_n = self.timer.total, self.settled
        for _ in range(messages * 4 + 100):
            if self.settled >= target:
                break
            self._send()
            if self.batch:
                self._pump_once()  # one round trip per batch; the rest stays in flight
                continue
            for _ in range(50):
                if not self._pump_once():
                    break
        else:
            raise RuntimeError("relay stalled")
        return self.timer.total - before_t, self.settled - before_n


def _metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def check_counts(bench: RouterBench) -> None:
    """The metrics must count every relayed message and outcome exactly."""
    m = bench.metrics
    got = _metric(m, "iotgw_messages_total", route="devices/", direction="in")
    outcomes = _metric(m, "iotgw_dispositions_total", outcome="accepted", direction="in")
    latency = _metric(m, "iotgw_relay_latency_seconds_count", protocol="amqp")
    # Every transfer relayed counts once; hub -> device relays no transfers here.
    if not (got == bench.tags and outcomes == bench.settled and latency == bench.tags):
        raise RuntimeError(f"metrics disagree: messages {got}, accepted {outcomes}, "
                           f"latency {latency}; sent {bench.tags}, settled {bench.settled}")  # fmt: skip
    conn = bench.registry.connection(bench.device_conn.id)
    if conn is not None and getattr(conn, "messages_in", bench.tags) != bench.tags:
        raise RuntimeError(f"registry counts {conn.messages_in} messages, sent {bench.tags}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.amqp_router_micro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds; best is reported")
    parser.add_argument("--profile", metavar="FILE", help="write cProfile stats of the gateway calls")
    parser.add_argument("--batch", type=int, default=0, metavar="N",
                        help="messages the device writes per round trip (default: all its "
                             "credit allows; 5 is scenario 1's shape)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.batch < 0:
        parser.error("--batch must not be negative")
    messages = 2000 if args.quick else 20000
    profiler = cProfile.Profile() if args.profile else None
    bench = RouterBench(profiler, args.batch)
    bench.run(messages // 10)  # warm up: every cache and label child exists
    results = []
    for _ in range(max(1, args.rounds)):
        seconds, n = bench.run(messages)
        results.append(seconds / n * 1e6)
        print(f"round: {results[-1]:6.2f} us of gateway work per relayed message ({n} msgs)")
    check_counts(bench)
    shape = (f"{args.batch} per round trip" if args.batch
             else f"up to {IN_FLIGHT} in flight, as credit allows")  # fmt: skip
    print(f"best:  {min(results):6.2f} us per message (1 KiB, unsettled, {shape}; "
          f"{bench.settled} settled in all, metrics exact)")  # fmt: skip
    if profiler is not None:
        profiler.dump_stats(args.profile)
        print(f"profile of the gateway calls written to {args.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
