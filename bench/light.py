"""Scenario 7: many devices at a light aggregate load, the load a Raspberry Pi carries.

200 AMQP devices (1 KiB, at least once) and then 200 MQTT devices (256 B, QoS 1)
send 400 msg/s in total, 2 msg/s each, open loop, through stunnel (client
mode) and through the gateway, to hubsim; the paths take turns, round after
round, the order rotated each round so neither always runs first on a
machine that warms up or gets busier. Per path and round:

- CPU of the hop per 10k messages (the CPU window, nothing else attached);
- then, the same traffic going on, a `perf record` window of the hop's
  syscalls (`bench.syscalls`): syscalls, wake-ups (`epoll_wait`/`poll` returns
  with ready descriptors) and socket reads/writes per message on each side;
  writes towards the hub are TLS records. Skipped, with the reason in the
  notes, when perf is missing or not allowed.

Also the idle daemon's RSS with no device (configured for both protocols).
Targets (issue 20): hop CPU per message <= 1.3x stunnel for AMQP and for
MQTT; idle RSS <= 30 MB. Figures are medians over the rounds; the ratios are
medians of each round's ratio.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from .gateway_proc import AmqpRoute, MqttRoute, gateway_config, start_gateway
from .harness import Bench, Hop
from .procs import BenchError
from .results import PATHS, Metric, ScenarioResult
from .stunnel import start_stunnel
from .syscalls import SyscallProbe, Trace, perf_binary, socket_sides
from .upstreams import Upstream, hub_stats

TITLE = "Light load: {devices} devices, {rate} msg/s in total ({each:g} msg/s each)"
LIGHT_PATHS = ("stunnel", "gateway")
PROTOCOLS = (("AMQP", "amqp", 1024), ("MQTT", "mqtt", 256))
PROBE_SETTLE = 0.3  # seconds between perf attached and the first hub count
TRACE_FIELDS = (
    ("syscalls", "syscalls per msg"),
    ("wakeups", "wake-ups per msg"),
    ("empty_waits", "empty polls per msg"),
    ("hub_writes", "TLS writes (records) to hub per msg"),
    ("hub_reads", "TLS reads from hub per msg"),
    ("device_reads", "device-side reads per msg"),
    ("device_writes", "device-side writes per msg"),
)


def _rotated(paths: tuple[str, ...], round_index: int) -> tuple[str, ...]:
    k = round_index % len(paths)
    return paths[k:] + paths[:k]


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def light_traffic(bench: Bench, tag: str, protocol: str, hop: Hop, upstream: Upstream,
                  upstream_port: int, *, size: int, probe: bool) -> dict[str, Any]:  # fmt: skip
    """One rate run: CPU per message in the measured window, then a syscall trace."""
    params = bench.params
    linger = params.s7_probe + 2.0 if probe and hop.child is not None else 0.0
    spec = bench.spec(hop, mode="rate", devices=params.s7_devices, rate=params.s7_rate,
                      window=params.s7_window, size=size, duration=params.s7_duration,
                      linger=linger, batch=50)  # fmt: skip
    hub_before = hub_stats(upstream)
    child = bench.devices(f"{tag}-{hop.path}-devices", protocol, spec)
    report: dict[str, Any]
    try:
        child.expect("connected", params.connect_timeout + 10)
        child.expect("start", spec["warmup"] + 30)
        before = bench._usage(hop, child, upstream)
        report = child.expect("result", spec["duration"] + 30)
        after = bench._usage(hop, child, upstream)
        if linger:
            report["trace"] = _trace(bench, tag, hop, upstream, upstream_port)
        child.wait(linger + 30)
    finally:
        child.stop()
    report["cpu_s"] = {name: round(after[name].cpu - before[name].cpu, 3) for name in after}
    hub_after = hub_stats(upstream)
    d2c = int(hub_after["d2c"]) - int(hub_before["d2c"])  # type: ignore[call-overload]
    if d2c < report["acked_total"]:
        raise BenchError(f"{tag} {hop.path}: {report['acked_total']} messages settled but the "
                         f"hub recorded only {d2c}")  # fmt: skip
    messages = report["messages"]
    if messages <= 0:
        raise BenchError(f"{tag} {hop.path}: no message settled in the measurement window")
    report["cpu_per_10k_s"] = {
        name: round(cpu / messages * 10_000, 4) for name, cpu in report["cpu_s"].items()
    }
    trace = report.get("trace") or {}
    bench.progress(
        f"  {hop.path}: {report['msgs_per_s']:.0f} msg/s, p50 {report['latency']['p50_ms']} ms, "
        f"p99 {report['latency']['p99_ms']} ms, hop CPU s per 10k "
        f"{report['cpu_per_10k_s'].get('hop')}"
        + (f", per msg {trace.get('per_message')}" if trace.get("per_message") else "")
        + (f", trace: {trace['error']}" if trace.get("error") else "")
    )
    return report


def _trace(bench: Bench, tag: str, hop: Hop, upstream: Upstream, upstream_port: int) -> dict[str, Any]:
    assert hop.child is not None
    try:
        sides = socket_sides(hop.child.pid, hop.port, upstream_port)
        probe = SyscallProbe(hop.child.pid, bench.work / f"{tag}-{hop.path}.perf.data")
    except (OSError, RuntimeError) as exc:
        return {"error": str(exc)}
    try:
        time.sleep(PROBE_SETTLE)
        first = int(hub_stats(upstream)["d2c"])  # type: ignore[call-overload]
        time.sleep(bench.params.s7_probe)
        last = int(hub_stats(upstream)["d2c"])  # type: ignore[call-overload]
    finally:
        trace: Trace = probe.stop(sides)
    messages = last - first
    # The trace spans the two hub counts plus perf's start and stop (PROBE_SETTLE and a
    # few ms): scale the count to the traced time so per-message figures are not inflated.
    scale = (bench.params.s7_probe + PROBE_SETTLE) / bench.params.s7_probe
    return {
        "messages": messages,
        "sockets": {side: sum(1 for s in sides.values() if s == side) for side in ("device", "hub")},
        "counts": {"syscalls": trace.syscalls, "waits": trace.waits, "wakeups": trace.wakeups,
                   **dict(trace.io), "by_name": dict(trace.by_name)},
        "per_message": trace.per_message(round(messages * scale)),
    }  # fmt: skip


def idle_rss(bench: Bench, amqp_port: int, mqtt_port: int) -> dict[str, Any]:
    """RSS of each hop configured for both protocols, started, no device connected."""
    out: dict[str, Any] = {}
    for path in LIGHT_PATHS:
        if bench.skip_reason(path):
            continue
        if path == "stunnel":
            tunnel = start_stunnel({"amqp": amqp_port, "mqtt": mqtt_port}, bench.certs.ca_file,
                                   bench.work, name="s7-idle-stunnel")  # fmt: skip
            child, stop = tunnel.child, tunnel.stop
        else:
            text, ports = gateway_config(bench.certs.ca_file, amqp=AmqpRoute(amqp_port),
                                         mqtt=MqttRoute(mqtt_port))  # fmt: skip
            gateway = start_gateway(text, ports, bench.work, runner=bench.runner,
                                    name="s7-idle-gateway")  # fmt: skip
            child, stop = gateway.child, gateway.stop
        try:
            time.sleep(bench.params.settle)
            out[path] = child.usage().rss
        finally:
            stop()
    return out


def scenario_7(bench: Bench) -> ScenarioResult:
    params = bench.params
    result = ScenarioResult(7, TITLE.format(devices=params.s7_devices, rate=params.s7_rate,
                                            each=params.s7_rate / params.s7_devices))  # fmt: skip
    result.skipped["direct"] = "not run: the question is the hop's cost"
    paths = tuple(p for p in LIGHT_PATHS if not bench.skip_reason(p))
    for p in LIGHT_PATHS:
        if p not in paths:
            result.skipped[p] = bench.skip_reason(p) or ""
    probe = perf_binary() is not None
    if not probe:
        result.skipped["syscall trace"] = "perf is not installed (Debian package linux-perf)"
    with bench.hub(params.s7_devices, amqp=True, mqtt=True) as hub:
        assert hub.amqp_port is not None and hub.mqtt_port is not None
        for label, protocol, size in PROTOCOLS:
            port = hub.amqp_port if protocol == "amqp" else hub.mqtt_port
            bench.progress(f" {label}: {params.s7_devices} devices, {params.s7_rate} msg/s")
            rounds: list[dict[str, Any]] = []
            for index in range(params.s7_rounds):
                reports: dict[str, Any] = {}
                for path in _rotated(paths, index):
                    try:
                        with bench.hop(path, protocol, port, f"s7-{protocol}-r{index}") as hop:
                            reports[path] = light_traffic(bench, f"s7-{protocol}-r{index}",
                                                          protocol, hop, hub, port, size=size,
                                                          probe=probe)  # fmt: skip
                    except (BenchError, OSError) as exc:
                        result.errors[f"{protocol} {path}"] = str(exc)
                        bench.progress(f"  {path}: FAILED: {exc}")
                rounds.append(reports)
            result.details[protocol] = rounds
            result.metrics += _metrics(label, rounds)
        rss = idle_rss(bench, hub.amqp_port, hub.mqtt_port)
    result.details["idle_rss_bytes"] = rss
    result.metrics.append(Metric(
        "idle RSS, no device (AMQP + MQTT configured)", "MB",
        {p: (round(rss[p] / 2**20, 1) if p in rss else None) for p in PATHS},
        ("gateway_max", 30.0)))  # fmt: skip
    return result


def _metrics(label: str, rounds: list[dict[str, Any]]) -> list[Metric]:
    def median_of(get: Any) -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        for path in PATHS:
            got = []
            for reports in rounds:
                try:
                    got.append(float(get(reports[path])))
                except (KeyError, TypeError):
                    pass
            values[path] = _median(got)
        return values

    cpu = median_of(lambda r: r["cpu_per_10k_s"]["hop"])
    ratios = [r["gateway"]["cpu_per_10k_s"]["hop"] / r["stunnel"]["cpu_per_10k_s"]["hop"]
              for r in rounds if "gateway" in r and "stunnel" in r
              and r["stunnel"]["cpu_per_10k_s"]["hop"]]  # fmt: skip
    metrics = [
        Metric(f"[{label}] throughput", "msg/s", median_of(lambda r: r["msgs_per_s"])),
        Metric(f"[{label}] latency p50", "ms", median_of(lambda r: r["latency"]["p50_ms"])),
        Metric(f"[{label}] latency p99", "ms", median_of(lambda r: r["latency"]["p99_ms"])),
        Metric(f"[{label}] hop CPU per 10k msgs (median of rounds)", "s", cpu),
        # The target is judged on the median of each round's own ratio (the values
        # columns hold the median ratio for the gateway and 1 for stunnel).
        Metric(f"[{label}] hop CPU ratio, median of the rounds' ratios "
               f"({', '.join(f'{x:.2f}' for x in ratios)})", "x",
               {"stunnel": 1.0 if ratios else None, "gateway": _median(ratios)},
               ("ratio_max", 1.3)),
    ]  # fmt: skip
    for key, name in TRACE_FIELDS:
        metrics.append(Metric(f"[{label}] {name}", "n",
                              median_of(lambda r, key=key: r["trace"]["per_message"][key])))
    return metrics
