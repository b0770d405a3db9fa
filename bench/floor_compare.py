"""The MQTT scenarios (3 and 6) with a fourth path, the floor: a bare trio TLS forwarder.

    python -m bench.floor_compare [--scenario 3 6] [--paths direct,stunnel,gateway,floor]
                                  [--upstream mosquitto|hubsim]

Same harness, load generator, upstream (mosquitto, or hubsim) and measurement as
`python -m bench`; the `floor` path puts `bench.floor_relay` where the
gateway goes. In one invocation, so the ratios compare like with like:
if floor/stunnel misses a target, no Python/trio relay on this machine can
meet it, and gateway/floor is what the gateway's own work costs on top.
Prints a table and writes the raw reports to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .devices import HUB_HOST
from .harness import FULL, SMOKE, Bench, Hop
from .procs import BenchError, Child, free_port, raise_fd_limit, wait_for_port
from .report import machine
from .upstreams import Upstream

FLOOR_PATHS = ("direct", "stunnel", "gateway", "floor", "floor-sslstream")
START_TIMEOUT = 15.0
DEFAULT_OUT = Path(__file__).resolve().parent / "out"


@contextlib.contextmanager
def floor_hop(bench: Bench, upstream_port: int, tag: str, path: str) -> Iterator[Hop]:
    port = free_port()
    tls = "sslstream" if path == "floor-sslstream" else "gateway"
    argv = [sys.executable, "-m", "bench.floor_relay", "--listen", str(port),
            "--upstream", str(upstream_port), "--ca-file", str(bench.certs.ca_file),
            "--server-name", HUB_HOST, "--tls", tls]  # fmt: skip
    child = Child(f"{tag}-{path}", argv, bench.work)
    try:
        wait_for_port(port, child, START_TIMEOUT)
        yield Hop(path, port, False, child)
    finally:
        child.stop()


def run_path(bench: Bench, path: str, upstream: Upstream, tag: str, **traffic: Any) -> Any:
    port = upstream.mqtt_port
    assert port is not None
    if path.startswith("floor"):
        hop = floor_hop(bench, port, tag, path)
    else:
        hop = bench.hop(path, "mqtt", port, tag)
    with hop as h:
        return bench.traffic(tag, "mqtt", h, upstream, **traffic)


def measure(bench: Bench, scenario: int, paths: tuple[str, ...],
            upstream_name: str = "mosquitto") -> dict[str, Any]:  # fmt: skip
    reports: dict[str, Any] = {}
    upstream_cm = bench.mosquitto() if upstream_name == "mosquitto" else bench.hub(1, mqtt=True)
    with upstream_cm as upstream:
        for path in paths:
            if scenario == 3:
                fields = dict(mode="throughput", devices=1, window=bench.params.s3_window,
                              size=256)  # fmt: skip
            else:
                rate = bench.params.s6_rate
                fields = dict(mode="rate", devices=1, rate=rate, window=max(rate, 100), size=256)
            try:
                reports[path] = run_path(bench, path, upstream, f"floor-s{scenario}", **fields)
            except (BenchError, OSError) as exc:
                reports[path] = {"error": str(exc)}
                bench.progress(f"  {path}: FAILED: {exc}")
    return reports


def _get(report: dict[str, Any] | None, *keys: str) -> float | None:
    value: Any = report
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def table(scenario: int, reports: dict[str, Any], paths: tuple[str, ...],
          upstream_name: str = "mosquitto") -> list[str]:  # fmt: skip
    if scenario == 3:
        title = f"3. MQTT QoS 1, 1 device, 256 B, 100 in flight ({upstream_name})"
        metrics = [("throughput (msg/s)", ("msgs_per_s",)),
                   ("latency p50 (ms)", ("latency", "p50_ms")),
                   ("latency p99 (ms)", ("latency", "p99_ms")),
                   ("hop CPU per 10k msgs (s)", ("cpu_per_10k_s", "hop"))]  # fmt: skip
    else:
        title = f"6. MQTT at 1,000 msg/s, 1 device ({upstream_name})"
        metrics = [("latency p50 (ms)", ("latency", "p50_ms")),
                   ("latency p99 (ms)", ("latency", "p99_ms"))]  # fmt: skip
    rows = []
    for name, keys in metrics:
        values = {p: _get(reports.get(p), *keys) for p in paths}
        rows.append((name, values))
    if scenario == 6:
        for pct in ("p50", "p99"):
            direct = _get(reports.get("direct"), "latency", f"{pct}_ms")
            added = {}
            for p in paths:
                v = _get(reports.get(p), "latency", f"{pct}_ms")
                added[p] = None if p == "direct" or v is None or direct is None else v - direct
            rows.append((f"added {pct} vs direct (ms)", added))
    ratios = [("gateway", "stunnel"), ("floor", "stunnel"), ("floor-sslstream", "stunnel"),
              ("gateway", "floor")]  # fmt: skip
    ratios = [(a, b) for a, b in ratios if a in paths and b in paths]
    header = ["metric", *paths, *(f"{a}/{b}" for a, b in ratios)]
    body = []
    for name, values in rows:
        row = [name] + [_fmt(values[p]) for p in paths]
        for a, b in ratios:
            va, vb = values.get(a), values.get(b)
            row.append("-" if not va or not vb or name.startswith("added") else f"{va / vb:.2f}")
        body.append(row)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    out = [title, "  ".join(h.rjust(w) if i else h.ljust(w)
                           for i, (h, w) in enumerate(zip(header, widths, strict=True)))]  # fmt: skip
    out += ["  ".join(c.rjust(w) if i else c.ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in body]  # fmt: skip
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.floor_compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenario", type=int, nargs="+", choices=(3, 6), default=[3, 6])
    parser.add_argument("--paths", default=",".join(FLOOR_PATHS))
    parser.add_argument("--duration", type=float)
    parser.add_argument("--warmup", type=float)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--upstream", choices=("mosquitto", "hubsim"), default="mosquitto")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)  # fmt: skip
    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    if not paths or any(p not in FLOOR_PATHS for p in paths):
        parser.error(f"--paths takes a subset of {','.join(FLOOR_PATHS)}")
    params = SMOKE if args.smoke else FULL
    overrides = {k: v for k, v in (("duration", args.duration), ("warmup", args.warmup)) if v}
    params = dataclasses.replace(params, **overrides)
    if args.upstream == "mosquitto" and not Bench.mosquitto_available():
        print("python -m bench.floor_compare: needs mosquitto", file=sys.stderr)
        return 2
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="iot-gateway-floor-"))
    bench = Bench(work, params, paths=tuple(p for p in paths if not p.startswith("floor")))
    results: dict[str, Any] = {}
    lines: list[str] = []
    try:
        for scenario in sorted(set(args.scenario)):
            print(f"scenario {scenario} ...", file=sys.stderr, flush=True)
            reports = measure(bench, scenario, paths, args.upstream)
            results[str(scenario)] = reports
            lines += table(scenario, reports, paths, args.upstream) + [""]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = machine()
    head = [f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
            f"machine: {m['nproc']} CPU(s), {m['cpu_model']}, Python {m['python']}",
            "command: python -m bench.floor_compare " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv), ""]  # fmt: skip
    text = "\n".join(head + lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    path = args.out / f"floor-{stamp}.json"
    path.write_text(json.dumps({"table": text, "reports": results}, indent=2, default=str))
    print(f"results: {path}")
    failed = any("error" in r for reports in results.values() for r in reports.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
