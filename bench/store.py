"""Store-and-forward micro-benchmarks: the message store alone, on this machine's disk.

    python -m bench.store throughput [--sizes 256,1024] [--appenders 1,16,64,256] [--messages 20000]
    python -m bench.store rss [--backlog 1000000] [--size 256]

``throughput``: messages/s that ``MessageStore.append`` commits durably (WAL,
``synchronous=FULL``: one fsync per group commit), with N concurrent appenders
as N devices would send; also the commits (fsyncs) it took and the mean batch.

``rss``: the resident memory of a process that opens the store, with an empty
store and with a backlog of ``--backlog`` messages, each in a fresh process
(the gateway keeps per-device aggregates only, so both should be the same).
The backlog is filled first (that takes a while), in the directory given by
``--dir`` (default: a temporary one, removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from gateway.config.store import StoreAndForwardSection
from gateway.store import MessageStore

DEVICES = 100


def _config(path: Path, **extra: Any) -> StoreAndForwardSection:
    values: dict[str, Any] = {"path": path, "max_bytes": "4GiB", "device_share": 1.0}
    values.update(extra)
    return StoreAndForwardSection.model_validate(values)


async def _appenders(store: MessageStore, appenders: int, messages: int, size: int) -> None:
    payload = os.urandom(size)
    each = messages // appenders

    async def one(i: int) -> None:
        device = f"bench-{i % DEVICES:04d}" if appenders <= DEVICES else f"bench-{i:05d}"
        topic = f"devices/{device}/messages/events/"
        for _ in range(each):
            await store.append(device=device, connector="iothub", protocol="mqtt",
                               address=topic, meta=b"", payload=payload)  # fmt: skip

    async with trio.open_nursery() as nursery:
        for i in range(appenders):
            nursery.start_soon(one, i)


async def _throughput_one(directory: Path, size: int, appenders: int, messages: int) -> dict[str, Any]:
    path = directory / f"tp-{size}-{appenders}.db"
    store = await MessageStore.open(_config(path))
    try:
        await _appenders(store, appenders, max(appenders, messages // 10), size)  # warm up
        commits = store.commits
        count = (messages // appenders) * appenders
        started = time.perf_counter()
        await _appenders(store, appenders, count, size)
        elapsed = time.perf_counter() - started
        fsyncs = store.commits - commits
    finally:
        await store.aclose()
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return {
        "size": size,
        "appenders": appenders,
        "messages": count,
        "seconds": round(elapsed, 3),
        "messages_per_s": round(count / elapsed),
        "commits": fsyncs,
        "mean_batch": round(count / max(1, fsyncs), 1),
        "mib_per_s": round(count * size / elapsed / 2**20, 2),
    }


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in args.sizes:
            for appenders in args.appenders:
                row = trio.run(_throughput_one, Path(tmp), size, appenders, args.messages)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


# -- RSS ---------------------------------------------------------------------------------------


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def _open_and_measure(path: Path) -> dict[str, Any]:
    before = _rss_kib()
    started = time.perf_counter()
    store = await MessageStore.open(_config(path))
    opened = time.perf_counter() - started
    after_open = _rss_kib()
    # What a replay does: read each device's oldest messages, a window at a time.
    for device in store.devices_waiting("mqtt")[:DEVICES]:
        await store.peek(device, 64)
    stats = store.stats()
    after_peek = _rss_kib()
    await store.aclose()
    return {
        "backlog_messages": stats.messages,
        "backlog_mib": round(stats.bytes / 2**20, 1),
        "file_mib": round(stats.file_bytes / 2**20, 1),
        "open_seconds": round(opened, 2),
        "rss_before_open_kib": before,
        "rss_after_open_kib": after_open,
        "rss_after_peek_kib": after_peek,
        "rss_peak_kib": _hwm_kib(),
    }


def _measure_in_child(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.store", "_measure", str(path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


async def _fill(path: Path, backlog: int, size: int) -> float:
    store = await MessageStore.open(_config(path, batch_max=1024))
    try:
        started = time.perf_counter()
        done = 0
        step = 100_000
        while done < backlog:
            n = min(step, backlog - done)
            await _appenders(store, 256, n, size)
            done += (n // 256) * 256
            if (n // 256) * 256 == 0:
                break
        return time.perf_counter() - started
    finally:
        await store.aclose()


def rss(args: argparse.Namespace) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        empty = directory / "empty.db"
        full = directory / "backlog.db"
        trio.run(_fill, empty, 0, args.size)
        result: dict[str, Any] = {"empty": _measure_in_child(empty)}
        print(json.dumps(result["empty"]), flush=True)
        fill_seconds = trio.run(_fill, full, args.backlog, args.size)
        result["fill_seconds"] = round(fill_seconds, 1)
        result["backlog"] = _measure_in_child(full)
        print(json.dumps(result["backlog"]), flush=True)
        return result
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tp = sub.add_parser("throughput", help="appends/s with fsync per group commit")
    tp.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024])
    tp.add_argument("--appenders", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 16, 64, 256])  # fmt: skip
    tp.add_argument("--messages", type=int, default=20_000)
    tp.add_argument("--dir", default=None, help="where the database goes (default: $TMPDIR)")
    rs = sub.add_parser("rss", help="resident memory with an empty store and a large backlog")
    rs.add_argument("--backlog", type=int, default=1_000_000)
    rs.add_argument("--size", type=int, default=256)
    rs.add_argument("--dir", default=None)
    me = sub.add_parser("_measure")
    me.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "throughput":
        throughput(args)
    elif args.command == "rss":
        print(json.dumps(rss(args), indent=2))
    else:
        print(json.dumps(trio.run(_open_and_measure, Path(args.path))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
