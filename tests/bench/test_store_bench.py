"""`python -m bench.store` runs (tiny counts): the figures in bench/RESULTS.md come from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import store as store_bench

ROOT = Path(__file__).resolve().parents[2]


def test_throughput_smoke(tmp_path: Path, capsys) -> None:
    assert store_bench.main(["throughput", "--sizes", "64", "--appenders", "1,4",
                             "--messages", "40", "--dir", str(tmp_path)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["size"], r["appenders"], r["messages"]) for r in rows] == [(64, 1, 40), (64, 4, 40)]
    assert rows[0]["commits"] == 40 and all(r["messages_per_s"] > 0 for r in rows)


def test_rss_smoke(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.store", "rss", "--backlog", "600", "--dir", str(tmp_path)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    result = json.loads(out.stdout[out.stdout.index("{\n"):])
    assert result["empty"]["backlog_messages"] == 0
    assert result["backlog"]["backlog_messages"] == 512  # whole rounds of 256 appenders
    assert result["backlog"]["rss_after_open_kib"] > 0
