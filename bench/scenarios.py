"""The six scenarios of the benchmark (issue 8), each run direct, via stunnel and via the gateway.

Targets (ratios gateway/stunnel from the same run, so machine noise cancels):
1 and 3 throughput >= 0.9x stunnel; 3 gateway CPU per 10k messages <= 1.5x
stunnel's; 5 at least 3x faster than stunnel; 4 idle MQTT device <= 1.5x
stunnel's bytes per connection, idle pooled AMQP device <= 40 KB; 6 added p99
latency at light load <= 1 ms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .harness import Bench
from .light import TITLE as LIGHT_TITLE
from .light import scenario_7
from .results import PATHS, WS_PATH, Metric, ScenarioResult
from .upstreams import Upstream

TITLES = {
    1: "AMQP at-least-once, 1 device, 1 KiB, 100 in flight",
    2: "AMQP, {devices} devices over a pool of {pool} upstream connections, 1 KiB",
    3: "MQTT QoS 1, 1 device, 256 B, 100 in flight",
    4: "Idle memory: {steps} idle devices",
    5: "Connect storm: {devices} AMQP devices at once (CBS + attach)",
    6: "Added latency at light load ({rate} msg/s)",
    7: LIGHT_TITLE,
}


def _values(reports: dict[str, Any], get: Callable[[dict[str, Any]], Any]) -> dict[str, float | None]:
    values: dict[str, float | None] = {}
    for path in PATHS:
        report = reports.get(path)
        try:
            values[path] = None if report is None else get(report)
        except (KeyError, TypeError):
            values[path] = None
    return values


def throughput_metrics(reports: dict[str, Any], label: str = "", *, throughput_target: float | None,
                       cpu_target: float | None) -> list[Metric]:  # fmt: skip
    prefix = f"{label} " if label else ""
    return [
        Metric(f"{prefix}throughput", "msg/s", _values(reports, lambda r: r["msgs_per_s"]),
               ("ratio_min", throughput_target) if throughput_target else None),
        Metric(f"{prefix}latency p50", "ms", _values(reports, lambda r: r["latency"]["p50_ms"])),
        Metric(f"{prefix}latency p99", "ms", _values(reports, lambda r: r["latency"]["p99_ms"])),
        Metric(f"{prefix}hop CPU per 10k msgs", "s",
               _values(reports, lambda r: r["cpu_per_10k_s"]["hop"]),
               ("ratio_max", cpu_target) if cpu_target else None),
    ]  # fmt: skip


def websocket_metrics(reports: dict[str, Any], label: str = "") -> list[Metric]:
    """The gateway over WebSockets (`--transport websockets`): its figures in the gateway
    column against stunnel, and its throughput against the gateway over TCP in the same
    run (target: WebSockets costs at most 15%)."""
    if WS_PATH not in reports:
        return []
    prefix = f"{label} " if label else ""

    def values(get: Callable[[dict[str, Any]], Any]) -> dict[str, float | None]:
        swapped = dict(reports)
        swapped["gateway"] = reports[WS_PATH]
        out = _values(swapped, get)
        out["gateway-tcp"] = _values(reports, get)["gateway"]
        return out

    def throughput(r: dict[str, Any]) -> Any:
        return r["msgs_per_s"]

    def cpu(r: dict[str, Any]) -> Any:
        return r["cpu_per_10k_s"]["hop"]

    return [
        Metric(f"{prefix}[websockets] throughput", "msg/s", values(throughput)),
        Metric(f"{prefix}[websockets] hop CPU per 10k msgs", "s", values(cpu)),
        Metric(f"{prefix}[websockets] throughput / gateway over TCP (ratio column)", "msg/s",
               values(throughput), ("ratio_min", 0.85), ratio_paths=("gateway", "gateway-tcp")),
    ]  # fmt: skip


def scenario_1(bench: Bench) -> ScenarioResult:
    result = ScenarioResult(1, TITLES[1])
    with bench.hub(1, amqp=True) as hub:
        assert hub.amqp_port is not None
        port = hub.amqp_port

        def run(path: str) -> dict[str, Any]:
            upstream_port = hub.ws_port if path == WS_PATH else port
            assert upstream_port is not None
            with bench.hop(path, "amqp", upstream_port, "s1") as hop:
                return bench.traffic("s1", "amqp", hop, hub, mode="throughput", devices=1,
                                     window=bench.params.s1_window, size=1024)  # fmt: skip

        reports = bench.each_path(result, run, bench.throughput_paths())
    result.details = reports
    result.metrics = throughput_metrics(reports, throughput_target=0.9, cpu_target=None)
    result.metrics += websocket_metrics(reports)
    return result


def scenario_2(bench: Bench) -> ScenarioResult:
    params = bench.params
    result = ScenarioResult(2, TITLES[2].format(devices=params.s2_devices, pool=params.s2_pool[0]))
    with bench.hub(params.s2_devices, amqp=True) as hub:
        assert hub.amqp_port is not None
        port = hub.amqp_port

        def run(path: str) -> dict[str, Any]:
            with bench.hop(path, "amqp", port, "s2", pool=params.s2_pool) as hop:
                return bench.traffic("s2", "amqp", hop, hub, mode="throughput",
                                     devices=params.s2_devices, window=params.s2_window,
                                     size=1024)  # fmt: skip

        reports = bench.each_path(result, run)
    result.details = reports
    result.details["per_device_window"] = params.s2_window
    result.metrics = throughput_metrics(reports, throughput_target=None, cpu_target=None)
    return result


def _mqtt_upstreams(bench: Bench, result: ScenarioResult, devices: int) -> list[str]:
    names = ["mosquitto"] if bench.mosquitto_available() else []
    if not names:
        result.skipped["mosquitto"] = "mosquitto is not installed"
    return names + ["hubsim"]


def _mqtt_upstream(bench: Bench, name: str, devices: int) -> Any:
    return bench.mosquitto() if name == "mosquitto" else bench.hub(devices, mqtt=True)


def scenario_3(bench: Bench) -> ScenarioResult:
    result = ScenarioResult(3, TITLES[3])
    for name in _mqtt_upstreams(bench, result, 1):
        with _mqtt_upstream(bench, name, 1) as upstream:
            port = upstream.mqtt_port

            def run(path: str, upstream: Upstream = upstream, port: int = port) -> dict[str, Any]:
                upstream_port = upstream.ws_port if path == WS_PATH else port
                assert upstream_port is not None
                with bench.hop(path, "mqtt", upstream_port, f"s3-{upstream.name}") as hop:
                    return bench.traffic(f"s3-{upstream.name}", "mqtt", hop, upstream,
                                         mode="throughput", devices=1,
                                         window=bench.params.s3_window, size=256)  # fmt: skip

            bench.progress(f" upstream {name}")
            # Over WebSockets against hubsim only: mosquitto's WebSocket listener would
            # measure mosquitto's own WebSocket code, not the gateway's.
            paths = bench.throughput_paths() if name == "hubsim" else PATHS
            reports = bench.each_path(result, run, paths)
        result.details[name] = reports
        result.metrics += throughput_metrics(reports, f"[{name}]", throughput_target=0.9,
                                             cpu_target=1.5)  # fmt: skip
        result.metrics += websocket_metrics(reports, f"[{name}]")
    return result


def _memory_metrics(reports: dict[str, Any], label: str, steps: tuple[int, ...],
                    per_device_target: tuple[str, float] | None) -> list[Metric]:  # fmt: skip
    metrics = [
        Metric(f"{label} RSS with {n} idle", "MB",
               _values(reports, lambda r, n=n: round(r["steps"][str(n)]["rss"] / 2**20, 2)))
        for n in steps
    ]  # fmt: skip
    last = str(steps[-1])
    metrics.append(
        Metric(f"{label} per device connection", "KB",
               _values(reports, lambda r: round(r["steps"][last]["bytes_per_device"] / 1024, 2)),
               per_device_target)  # fmt: skip
    )
    return metrics


def scenario_4(bench: Bench) -> ScenarioResult:
    params = bench.params
    steps = params.s4_steps
    result = ScenarioResult(4, TITLES[4].format(steps=" and ".join(f"{n:,}" for n in steps)))
    result.skipped["direct"] = "no process between device and hub to measure"
    top = steps[-1]
    # Listeners must admit every device; stunnel and the gateway get the same fd limit.
    max_connections = top * 2 + 100

    with bench.hub(top, amqp=True) as hub:
        assert hub.amqp_port is not None
        port = hub.amqp_port

        def run_amqp(path: str) -> dict[str, Any]:
            with bench.hop(path, "amqp", port, "s4-amqp", pool=params.s4_pool,
                           max_connections=max_connections) as hop:  # fmt: skip
                return bench.idle_memory("s4-amqp", "amqp", hop)

        bench.progress(" AMQP (pooled through the gateway)")
        amqp_reports = _non_direct(bench, result, run_amqp)
    result.details["amqp"] = amqp_reports
    result.metrics += _memory_metrics(amqp_reports, "AMQP", steps, ("gateway_max", 40.0))

    upstream_name = "mosquitto" if bench.mosquitto_available() else "hubsim"
    with _mqtt_upstream(bench, upstream_name, top) as upstream:
        mqtt_port = upstream.mqtt_port

        def run_mqtt(path: str) -> dict[str, Any]:
            with bench.hop(path, "mqtt", mqtt_port, "s4-mqtt",
                           max_connections=max_connections) as hop:  # fmt: skip
                return bench.idle_memory("s4-mqtt", "mqtt", hop)

        bench.progress(f" MQTT (one upstream connection each, upstream {upstream_name})")
        mqtt_reports = _non_direct(bench, result, run_mqtt)
    result.details["mqtt"] = mqtt_reports
    result.details["mqtt_upstream"] = upstream_name
    result.metrics += _memory_metrics(mqtt_reports, "MQTT", steps, ("ratio_max", 1.5))
    return result


def _non_direct(bench: Bench, result: ScenarioResult, run: Callable[[str], Any]) -> dict[str, Any]:
    return bench.each_path(result, run, ("stunnel", "gateway"))


def scenario_5(bench: Bench) -> ScenarioResult:
    params = bench.params
    devices = params.s5_devices
    result = ScenarioResult(5, TITLES[5].format(devices=f"{devices:,}"))
    with bench.hub(devices, amqp=True) as hub:
        assert hub.amqp_port is not None
        port = hub.amqp_port

        def run(path: str) -> dict[str, Any]:
            with bench.hop(path, "amqp", port, "s5", pool=params.s5_pool,
                           max_connections=devices * 2 + 100) as hop:  # fmt: skip
                return bench.storm("s5", hop, hub, devices)

        reports = bench.each_path(result, run)
    result.details = reports
    result.details["gateway_pool"] = list(params.s5_pool)
    result.metrics = [
        Metric("time until all attached", "s", _values(reports, lambda r: r["elapsed_s"]),
               ("ratio_max", round(1 / 3, 3))),
        Metric("device attached p50", "ms", _values(reports, lambda r: r["ready_ms"]["p50_ms"])),
        Metric("device attached p99", "ms", _values(reports, lambda r: r["ready_ms"]["p99_ms"])),
        Metric("hop CPU during the storm", "s", _values(reports, lambda r: r["cpu_s"]["hop"])),
        Metric("hub CPU during the storm", "s",
               _values(reports, lambda r: r["cpu_s"]["upstream"])),
    ]  # fmt: skip
    return result


def _added(values: dict[str, float | None]) -> dict[str, float | None]:
    direct = values.get("direct")
    return {
        path: (None if direct is None or values.get(path) is None or path == "direct"
               else round(values[path] - direct, 4))  # type: ignore[operator]
        for path in PATHS
    }  # fmt: skip


def scenario_6(bench: Bench) -> ScenarioResult:
    rate = bench.params.s6_rate
    result = ScenarioResult(6, TITLES[6].format(rate=f"{rate:,}"))
    runs: list[tuple[str, str]] = [("AMQP", "hubsim")]
    if bench.mosquitto_available():
        runs.append(("MQTT", "mosquitto"))
    else:
        result.skipped["MQTT"] = "mosquitto is not installed"
    for protocol_name, upstream_name in runs:
        protocol = protocol_name.lower()
        upstream_cm = (bench.hub(1, amqp=True) if upstream_name == "hubsim"
                       else bench.mosquitto())  # fmt: skip
        with upstream_cm as upstream:
            port = upstream.amqp_port if protocol == "amqp" else upstream.mqtt_port
            tag = f"s6-{protocol}"

            def run(path: str, upstream: Upstream = upstream, port: int = port,
                    tag: str = tag, protocol: str = protocol) -> dict[str, Any]:  # fmt: skip
                with bench.hop(path, protocol, port, tag) as hop:
                    return bench.traffic(tag, protocol, hop, upstream, mode="rate", devices=1,
                                         rate=rate, window=max(rate, 100),
                                         size=1024 if protocol == "amqp" else 256)  # fmt: skip

            bench.progress(f" {protocol_name} to {upstream_name}")
            reports = bench.each_path(result, run)
        result.details[protocol] = reports
        p50 = _values(reports, lambda r: r["latency"]["p50_ms"])
        p99 = _values(reports, lambda r: r["latency"]["p99_ms"])
        result.metrics += [
            Metric(f"{protocol_name} latency p50", "ms", p50),
            Metric(f"{protocol_name} latency p99", "ms", p99),
            Metric(f"{protocol_name} added p50 vs direct", "ms", _added(p50), has_ratio=False),
            Metric(f"{protocol_name} added p99 vs direct", "ms", _added(p99),
                   ("gateway_max", 1.0), has_ratio=False),
        ]  # fmt: skip
    return result


SCENARIOS: dict[int, Callable[[Bench], ScenarioResult]] = {
    1: scenario_1,
    2: scenario_2,
    3: scenario_3,
    4: scenario_4,
    5: scenario_5,
    6: scenario_6,
    7: scenario_7,
}
