"""Where a message's time goes at light load: one hop, 200 devices, 400 msg/s.

    python -m bench.light_profile --protocol amqp --path gateway --seconds 15
    python -m bench.light_profile --protocol amqp --path gateway --cprofile /tmp/prof
    python -m bench.light_profile --protocol mqtt --path gateway --py-spy /tmp/mqtt.txt

Runs hubsim, the hop (`gateway`, `stunnel`, or `floor`: `bench.floor_relay`, a
bare trio forwarder with the gateway's TLS stream and nothing else) and the
devices of scenario 7, and prints the hop's CPU per 10k messages split into
user and system time (from /proc/<pid>/stat).

- `--cprofile DIR`: the gateway runs under cProfile; afterwards the calls
  per message of trio's scheduler (run-loop turns, task wake-ups, waits,
  checkpoints, cancel scopes, sleeps) and of the whole process are printed.
  Run it twice, with two `--seconds`, to tell start-up from traffic: the
  `--baseline-seconds` option does that and prints the difference per message.
- `--py-spy FILE`: `py-spy record --format raw` of the hop during the window
  (collapsed stacks; `--native` with `--py-spy-native`).

Figures move with how busy the machine is; compare paths in one invocation
(`--path gateway,stunnel`), several times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pstats
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .floor_compare import floor_hop
from .harness import FULL, Bench
from .procs import CLK_TCK

# Functions whose call counts tell the scheduler's work (cProfile counts each
# resumption of a coroutine or generator as a call).
COUNTED = {
    "run-loop turns": ("/_core/_run.py", "unrolled_run"),
    "task wake-ups (reschedule)": ("/_core/_run.py", "reschedule"),
    "blocking waits (x2: call and resumption)": ("/_core/_traps.py", "wait_task_rescheduled"),
    "fd waits (x2: call and resumption)": ("/_core/_io_epoll.py", "_epoll_wait"),
    "epoll registrations updated": ("/_core/_io_epoll.py", "_update_registrations"),
    "epoll_ctl calls": ("~", "<method 'modify' of 'select.epoll' objects>"),
    "checkpoint_if_cancelled": ("/_core/_run.py", "checkpoint_if_cancelled"),
    "cancel_shielded_checkpoint": ("/_core/_run.py", "cancel_shielded_checkpoint"),
    "checkpoint": ("/_core/_run.py", "checkpoint"),
    "cancel scopes entered": ("/_core/_run.py", "__enter__"),
    "trio.sleep": ("/_timeouts.py", "sleep"),
    "socket send": ("~", "<method 'send' of '_socket.socket' objects>"),
    "socket recv": ("~", "<method 'recv' of '_socket.socket' objects>"),
}


def _stat_times(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def run(protocol: str, path: str, seconds: float, *, profile_dir: Path | None = None,
        py_spy: list[str] | None = None, ack_batching: str | None = None) -> dict[str, Any]:  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="iot-gateway-light-"))
    params = dataclasses.replace(FULL, warmup=3.0, duration=seconds)
    bench = Bench(work, params, paths=("stunnel", "gateway"), profile_dir=profile_dir,
                  progress=lambda text: None, ack_batching=ack_batching)  # fmt: skip
    try:
        with bench.hub(params.s7_devices, amqp=True, mqtt=True) as hub:
            port = hub.amqp_port if protocol == "amqp" else hub.mqtt_port
            assert port is not None
            hop_cm = (floor_hop(bench, port, "light", "floor") if path == "floor"
                      else bench.hop(path, protocol, port, "light"))  # fmt: skip
            with hop_cm as hop:
                assert hop.child is not None
                spec = bench.spec(hop, mode="rate", devices=params.s7_devices,
                                  rate=params.s7_rate, window=params.s7_window,
                                  size=1024 if protocol == "amqp" else 256, batch=50)  # fmt: skip
                child = bench.devices("light-devices", protocol, spec)
                spy = None
                try:
                    child.expect("connected", params.connect_timeout + 10)
                    child.expect("start", 60)
                    user0, sys0 = _stat_times(hop.child.pid)
                    if py_spy:
                        spy = subprocess.Popen([a.replace("{pid}", str(hop.child.pid))
                                                for a in py_spy])  # fmt: skip
                    report = child.expect("result", seconds + 60)
                    user1, sys1 = _stat_times(hop.child.pid)
                    child.wait(60)
                finally:
                    child.stop()
                    if spy is not None:
                        spy.wait(60)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = report["messages"]
    return {
        "path": path,
        "protocol": protocol,
        "messages": n,
        "relayed_total": report["acked_total"],
        "cpu_per_10k_s": round((user1 - user0 + sys1 - sys0) / n * 1e4, 3),
        "user_per_10k_s": round((user1 - user0) / n * 1e4, 3),
        "sys_per_10k_s": round((sys1 - sys0) / n * 1e4, 3),
        "p50_ms": report["latency"]["p50_ms"],
        "p99_ms": report["latency"]["p99_ms"],
    }


def counts(stats_file: Path) -> dict[str, int]:
    stats = pstats.Stats(str(stats_file)).stats  # type: ignore[attr-defined]
    out = {name: 0 for name in COUNTED}
    total = 0
    for (filename, _line, function), (_cc, ncalls, *_rest) in stats.items():
        total += ncalls
        for name, (suffix, func) in COUNTED.items():
            if function == func and filename.endswith(suffix):
                out[name] += ncalls
    out["all Python function calls"] = total
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.light_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=("amqp", "mqtt"), default="amqp")
    parser.add_argument("--path", default="gateway",
                        help="comma-separated: gateway, stunnel, floor (each run in turn)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--cprofile", type=Path, metavar="DIR")
    parser.add_argument("--baseline-seconds", type=float, default=5.0,
                        help="with --cprofile: a shorter run whose counts are subtracted")
    parser.add_argument("--py-spy", type=Path, metavar="FILE")
    parser.add_argument("--py-spy-native", action="store_true")
    parser.add_argument("--ack-batching", metavar="DURATION",
                        help="the gateway connectors' ack_batching (default: the gateway's)")
    args = parser.parse_args(argv)  # fmt: skip
    for _ in range(args.repeat):
        for path in args.path.split(","):
            if args.cprofile is not None and path == "gateway":
                runs = []
                for seconds, sub in ((args.baseline_seconds, "short"), (args.seconds, "long")):
                    directory = args.cprofile / sub
                    result = run(args.protocol, path, seconds, profile_dir=directory,
                                 ack_batching=args.ack_batching)
                    result["counts"] = counts(directory / "light-gateway.pstats")
                    runs.append(result)
                short, long = runs
                extra = long["relayed_total"] - short["relayed_total"]
                long["per_message"] = {
                    name: round((long["counts"][name] - short["counts"][name]) / extra, 2)
                    for name in long["counts"]
                } if extra > 0 else {}  # fmt: skip
                print(json.dumps(long), flush=True)
                continue
            spy = None
            if args.py_spy is not None:
                spy = [str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw",
                       "-r", "400", "-d", str(int(args.seconds) - 1), "-o", str(args.py_spy),
                       "-p", "{pid}"] + (["--native"] if args.py_spy_native else [])  # fmt: skip
            print(json.dumps(run(args.protocol, path, args.seconds, py_spy=spy,
                                 ack_batching=args.ack_batching)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
