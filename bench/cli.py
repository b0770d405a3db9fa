"""`python -m bench`: run the scenarios and print the table.

    python -m bench [--smoke] [--scenario N ...] [--repeat N] [--out bench/out/]

Exit status: 0 when every selected scenario ran on every available path
(targets missed are reported, not fatal), 1 when a scenario failed, 2 on a
usage error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.config.durations import parse_duration

from .gateway_proc import RUNNERS
from .harness import FULL, SMOKE, Bench
from .procs import raise_fd_limit
from .report import (
    machine,
    revision,
    summary_text,
    text_table,
    write_outputs,
    write_summary,
)
from .results import PATHS, RunInfo, ScenarioResult
from .scenarios import SCENARIOS, TITLES

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="iot-gateway benchmarks: the same device traffic direct to the upstream over "
        "TLS, through stunnel (client mode) and through iot-gateway, in one run.",
    )
    parser.add_argument("--smoke", action="store_true",
                        help="tiny counts, a few seconds per scenario: checks the harness works")
    parser.add_argument("--scenario", type=int, action="extend", nargs="+", metavar="N",
                        choices=sorted(SCENARIOS), help="scenarios to run (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where the JSON and Markdown results go (default: bench/out/)")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help="comma-separated subset of direct,stunnel,gateway")
    parser.add_argument("--gateway-runner", choices=RUNNERS, default="daemon",
                        help="daemon: `python -m gateway run` (default); runner: "
                        "bench.gateway_runner, the relays without admin endpoint and metrics")
    parser.add_argument("--duration", type=float, help="seconds measured per traffic run")
    parser.add_argument("--warmup", type=float, help="seconds of traffic before measuring")
    parser.add_argument("--profile-gateway", type=Path, metavar="DIR",
                        help="run the gateway under cProfile and write one .pstats file per "
                        "scenario path to DIR (slows the gateway: not for the table)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run the selected scenarios N times in a row and also print each "
                        "ratio's median (a single run's ratios move with how the kernel shares "
                        "the CPUs between the processes)")
    parser.add_argument("--ack-batching", metavar="DURATION",
                        help="the gateway connectors' ack_batching (default: the gateway's "
                        "default, 1ms); 0 relays every hub answer at once")
    parser.add_argument("--transport", choices=("tcp", "websockets"), default="tcp",
                        help="websockets: scenarios 1 and 3 (hubsim) also run the gateway with "
                        "its connectors over WebSockets (hubsim serving /$iothub/websocket), "
                        "reported as [websockets] rows against stunnel and the gateway over TCP")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the work directory (configs, child logs) after the run")
    for number, title in TITLES.items():
        parser.epilog = (parser.epilog or "scenarios:") + f"\n  {number}: {title}"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser  # fmt: skip


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    if not paths or any(p not in PATHS for p in paths):
        print(f"python -m bench: --paths takes a subset of {','.join(PATHS)}", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print("python -m bench: --repeat takes a count of 1 or more", file=sys.stderr)
        return 2
    if args.ack_batching is not None:
        try:
            parse_duration(args.ack_batching)
        except ValueError as exc:
            print(f"python -m bench: --ack-batching: {exc}", file=sys.stderr)
            return 2
    params = SMOKE if args.smoke else FULL
    overrides = {k: v for k, v in (("duration", args.duration), ("warmup", args.warmup)) if v}
    params = dataclasses.replace(params, **overrides)
    numbers = sorted(set(args.scenario or SCENARIOS))

    raise_fd_limit()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    work = Path(tempfile.mkdtemp(prefix="iot-gateway-bench-"))
    started = time.monotonic()
    info = RunInfo(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command=shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        smoke=args.smoke,
        machine=machine(),
        gateway_runner=args.gateway_runner,
        revision=revision(REPO),
    )
    rounds: list[list[ScenarioResult]] = []
    bench = Bench(work, params, runner=args.gateway_runner, paths=paths,
                  profile_dir=args.profile_gateway, ack_batching=args.ack_batching,
                  transport=args.transport)  # fmt: skip
    interrupted = False
    try:
        for round_number in range(1, args.repeat + 1):
            rounds.append([])
            for number in numbers:
                where = f" (round {round_number} of {args.repeat})" if args.repeat > 1 else ""
                print(f"scenario {number}{where} ...", file=sys.stderr, flush=True)
                rounds[-1].append(SCENARIOS[number](bench))
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: every process the bench started has been stopped", file=sys.stderr)
    info.seconds = time.monotonic() - started
    if bench.runners_used:
        info.gateway_runner = ",".join(sorted(bench.runners_used))
    failed = any(result.errors for results in rounds for result in results)
    for round_number, results in enumerate(rounds, 1):
        if not results:
            continue
        suffix = f"-round{round_number}" if args.repeat > 1 else ""
        if suffix:
            print(f"\nround {round_number}:")
        print(text_table(results), end="")
        json_path, md_path = write_outputs(args.out, info, results, suffix)
        print(f"\nresults: {json_path}\nmarkdown for bench/RESULTS.md: {md_path}")
    complete = [results for results in rounds if len(results) == len(numbers)]
    if len(complete) > 1:
        print(f"\nratios over {len(complete)} rounds:")
        print(summary_text(complete), end="")
        print(f"\nmarkdown: {write_summary(args.out, info, complete)}")
    if args.keep_logs or failed or interrupted:
        print(f"logs: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        return 130
    return 1 if failed else 0
