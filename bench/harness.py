"""Running one scenario's traffic three ways: direct, through stunnel, through the gateway.

`Bench` owns the run's certificates, device key and work directory; `hop()`
starts what sits between the devices and the upstream for one path (nothing,
stunnel, or the gateway) and stops it afterwards; `traffic()` and
`idle_memory()` run a device process against a hop and measure the hop's CPU
and memory from /proc.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .devices import new_key
from .gateway_proc import AmqpRoute, MqttRoute, gateway_config, start_gateway
from .procs import BenchError, Child, Usage
from .results import PATHS, WS_PATH, ScenarioResult
from .stunnel import start_stunnel, stunnel_binary
from .upstreams import (
    Certs,
    Upstream,
    hub_stats,
    mosquitto_binary,
    start_hub,
    start_mosquitto,
    write_secret,
)

LOAD_MODULES = {"amqp": "bench.amqp_load", "mqtt": "bench.mqtt_load"}
EXIT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Params:
    """Scenario sizes: the full run, or tiny ones for the smoke run."""

    warmup: float = 2.0
    duration: float = 10.0
    s1_window: int = 100
    s2_devices: int = 200
    s2_window: int = 10
    s2_pool: tuple[int, int] = (2, 100)  # max_connections, max_devices_per_connection
    s3_window: int = 100
    s4_steps: tuple[int, ...] = (1000, 5000)
    s4_batch: int = 100  # devices connecting at a time while filling up
    s4_pool: tuple[int, int] = (8, 1000)
    s5_devices: int = 1000
    s5_pool: tuple[int, int] = (2, 500)
    s6_rate: int = 1000
    s7_devices: int = 200
    s7_rate: int = 400  # msg/s in total: 2 msg/s per device
    s7_window: int = 10
    s7_duration: float = 20.0
    s7_probe: float = 5.0  # seconds of syscall trace after the CPU window
    s7_rounds: int = 3
    connect_timeout: float = 180.0
    settle: float = 1.0  # seconds between "all connected" and reading RSS


FULL = Params()
SMOKE = Params(
    warmup=0.1,
    duration=0.4,
    s2_devices=4,
    s2_window=5,
    s2_pool=(2, 2),
    s4_steps=(10, 30),
    s4_batch=10,
    s5_devices=20,
    s5_pool=(2, 10),
    s6_rate=200,
    s7_devices=10,
    s7_rate=50,
    s7_duration=1.0,
    s7_probe=0.5,
    s7_rounds=2,
    connect_timeout=30.0,
    settle=0.2,
)


@dataclass
class Hop:
    """Where the devices connect for one path, and the process to measure there."""

    path: str
    port: int
    tls: bool
    child: Child | None  # stunnel or gateway; None when devices go direct


@dataclass
class Bench:
    work: Path
    params: Params
    runner: str = "daemon"
    paths: tuple[str, ...] = PATHS
    progress: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)
    profile_dir: Path | None = None  # run the gateway under cProfile, stats here
    ack_batching: str | None = None  # the connectors' ack_batching; None: the default
    # "websockets": scenarios 1 and 3 also run the gateway with its connectors over
    # WebSockets (path gateway-ws), beside the gateway over TCP.
    transport: str = "tcp"
    runners_used: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.certs = Certs.create(self.work)
        self.key = new_key()

    # -- what exists ---------------------------------------------------------------------

    def skip_reason(self, path: str) -> str | None:
        if path == WS_PATH:
            return None if self.websockets else "not selected"
        if path not in self.paths:
            return "not selected"
        if path == "stunnel" and stunnel_binary() is None:
            return "stunnel4 is not installed"
        return None

    @staticmethod
    def mosquitto_available() -> bool:
        return mosquitto_binary() is not None

    # -- upstreams and hops ----------------------------------------------------------------

    @property
    def websockets(self) -> bool:
        return self.transport == "websockets" and "gateway" in self.paths

    def throughput_paths(self) -> tuple[str, ...]:
        return PATHS + ((WS_PATH,) if self.websockets else ())

    @contextmanager
    def hub(self, devices: int, *, amqp: bool = False, mqtt: bool = False) -> Iterator[Upstream]:
        upstream = start_hub(self.certs, self.key, devices, self.work, amqp=amqp, mqtt=mqtt,
                             ws=self.websockets)  # fmt: skip
        try:
            yield upstream
        finally:
            upstream.stop()

    @contextmanager
    def mosquitto(self) -> Iterator[Upstream]:
        upstream = start_mosquitto(self.certs, self.work)
        try:
            yield upstream
        finally:
            upstream.stop()

    @contextmanager
    def hop(self, path: str, protocol: str, upstream_port: int, tag: str, *,
            pool: tuple[int, int] = (4, 200), max_connections: int = 1000) -> Iterator[Hop]:  # fmt: skip
        if path == "direct":
            yield Hop(path, upstream_port, True, None)
            return
        if path == "stunnel":
            tunnel = start_stunnel({protocol: upstream_port}, self.certs.ca_file, self.work,
                                   name=f"{tag}-stunnel")  # fmt: skip
            try:
                yield Hop(path, tunnel.ports[protocol], False, tunnel.child)
            finally:
                tunnel.stop()
            return
        amqp = AmqpRoute(upstream_port, *pool) if protocol == "amqp" else None
        mqtt = MqttRoute(upstream_port) if protocol == "mqtt" else None
        transport = "websockets" if path == WS_PATH else "tcp"
        text, ports = gateway_config(self.certs.ca_file, amqp=amqp, mqtt=mqtt,
                                     max_connections=max_connections,
                                     ack_batching=self.ack_batching,
                                     transport=transport)  # fmt: skip
        gateway = start_gateway(text, ports, self.work, runner=self.runner, name=f"{tag}-{path}",
                                profile_dir=self.profile_dir)  # fmt: skip
        self.runners_used.add(gateway.runner)
        try:
            yield Hop(path, ports[protocol], False, gateway.child)
        finally:
            gateway.stop()

    def each_path(self, result: ScenarioResult, run: Callable[[str], Any],
                  paths: tuple[str, ...] = PATHS) -> dict[str, Any]:  # fmt: skip
        """`run(path)` for every path that can run; failures are recorded, not raised."""
        reports: dict[str, Any] = {}
        for path in paths:
            reason = self.skip_reason(path)
            if reason:
                result.skipped[path] = reason
                continue
            try:
                reports[path] = run(path)
            except (BenchError, OSError) as exc:
                result.errors[path] = str(exc)
                self.progress(f"  {path}: FAILED: {exc}")
        return reports

    # -- device processes ----------------------------------------------------------------

    def spec(self, hop: Hop, **fields: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": hop.port,
            "tls": hop.tls,
            "ca_file": str(self.certs.ca_file),
            "key": self.key,
            "first": 0,
            "timeout": self.params.connect_timeout,
            "warmup": self.params.warmup,
            "duration": self.params.duration,
        }
        spec.update(fields)
        return spec

    def devices(self, name: str, protocol: str, spec: dict[str, Any]) -> Child:
        spec_file = write_secret(self.work / f"{name}.spec.json", json.dumps(spec))
        argv = [sys.executable, "-m", LOAD_MODULES[protocol], str(spec_file)]
        return Child(name, argv, self.work, json_lines=True)

    def traffic(self, tag: str, protocol: str, hop: Hop, upstream: Upstream,
                **fields: Any) -> dict[str, Any]:  # fmt: skip
        """Run a `throughput` or `rate` device process; its report plus CPU used per process."""
        spec = self.spec(hop, **fields)
        hub_before = hub_stats(upstream) if upstream.name == "hubsim" else None
        child = self.devices(f"{tag}-{hop.path}-devices", protocol, spec)
        try:
            connected = child.expect("connected", self.params.connect_timeout + 10)
            child.expect("start", spec["warmup"] + 30)
            before = self._usage(hop, child, upstream)
            report = child.expect("result", spec["duration"] + 30)
            after = self._usage(hop, child, upstream)
            child.wait(EXIT_TIMEOUT)
        finally:
            child.stop()
        report["connected"] = connected
        report["cpu_s"] = {name: round(after[name].cpu - before[name].cpu, 3) for name in after}
        report["rss_bytes"] = {name: after[name].rss for name in after}
        if hub_before is not None:
            hub_after = hub_stats(upstream)
            report["hub_d2c"] = int(hub_after["d2c"]) - int(hub_before["d2c"])  # type: ignore[call-overload]
            if report["hub_d2c"] < report["acked_total"]:
                raise BenchError(f"{tag} {hop.path}: {report['acked_total']} messages settled but "
                                 f"the hub recorded only {report['hub_d2c']}")  # fmt: skip
        messages = report["messages"]
        if messages <= 0:
            raise BenchError(f"{tag} {hop.path}: no message settled in the measurement window")
        report["cpu_per_10k_s"] = {
            name: round(cpu / messages * 10_000, 4) for name, cpu in report["cpu_s"].items()
        }
        self.progress(
            f"  {hop.path}: {report['msgs_per_s']:.0f} msg/s, p50 {report['latency']['p50_ms']} ms, "
            f"p99 {report['latency']['p99_ms']} ms, CPU s per 10k {report['cpu_per_10k_s']}"
        )
        return report

    def storm(self, tag: str, hop: Hop, upstream: Upstream, devices: int) -> dict[str, Any]:
        """Connect `devices` AMQP devices at once; time until all completed CBS + attach."""
        spec = self.spec(hop, mode="storm", devices=devices)
        child = self.devices(f"{tag}-{hop.path}-devices", "amqp", spec)
        try:
            before = self._usage(hop, child, upstream)
            report = child.expect("connected", self.params.connect_timeout + 10)
            after = self._usage(hop, child, upstream)
            child.wait(EXIT_TIMEOUT)
        finally:
            child.stop()
        report["cpu_s"] = {name: round(after[name].cpu - before[name].cpu, 3) for name in after}
        if report["failed"]:
            raise BenchError(f"{tag} {hop.path}: {report['failed']} devices failed: "
                             f"{report['failures']}")  # fmt: skip
        self.progress(f"  {hop.path}: {devices} devices attached in {report['elapsed_s']} s "
                      f"(CPU s: {report['cpu_s']})")  # fmt: skip
        return report

    def idle_memory(self, tag: str, protocol: str, hop: Hop) -> dict[str, Any]:
        """RSS of the hop with `s4_steps` idle devices connected (cumulative)."""
        assert hop.child is not None
        params = self.params
        baseline = hop.child.usage().rss
        report: dict[str, Any] = {"baseline_rss": baseline, "steps": {}}
        holders: list[Child] = []
        try:
            first = 0
            for total in params.s4_steps:
                spec = self.spec(hop, mode="idle", first=first, devices=total - first,
                                 batch=params.s4_batch)  # fmt: skip
                holder = self.devices(f"{tag}-{hop.path}-idle{total}", protocol, spec)
                holders.append(holder)
                connected = holder.expect("connected", params.connect_timeout + 10)
                if connected["failed"]:
                    raise BenchError(f"{tag} {hop.path}: {connected['failed']} devices failed: "
                                     f"{connected['failures']}")  # fmt: skip
                time.sleep(params.settle)  # let buffers of the last handshakes be released
                usage: Usage = hop.child.usage()
                report["steps"][str(total)] = {
                    "rss": usage.rss,
                    "bytes_per_device": round((usage.rss - baseline) / total),
                    "connect_s": connected["elapsed_s"],
                }
                self.progress(
                    f"  {hop.path}: {total} idle {protocol} devices: RSS {usage.rss / 2**20:.1f} MB, "
                    f"{(usage.rss - baseline) / total / 1024:.1f} KB/device"
                )
                first = total
        finally:
            for holder in holders:
                holder.stop()
        return report

    @staticmethod
    def _usage(hop: Hop, devices: Child, upstream: Upstream) -> dict[str, Usage]:
        usage = {"devices": devices.usage(), "upstream": upstream.child.usage()}
        if hop.child is not None:
            usage["hop"] = hop.child.usage()
        return usage
