"""`python -m bench --smoke --transport websockets`: scenarios 1 and 3 also run the
gateway with its connectors over WebSockets (hubsim serving /$iothub/websocket), and
report it against stunnel and against the gateway over TCP. Numbers are not judged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parents[2]


def test_scenarios_1_and_3_over_websockets(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--transport", "websockets",
         "--scenario", "1", "3", "--paths", "stunnel,gateway", "--out", str(tmp_path)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    data = json.loads(next(tmp_path.glob("bench-*-smoke.json")).read_text())
    by_number = {item["number"]: item for item in data["scenarios"]}
    for number, label in ((1, ""), (3, "[hubsim] ")):
        item = by_number[number]
        assert not item["errors"], item["errors"]
        metrics = {m["name"]: m for m in item["metrics"]}
        ws = metrics[f"{label}[websockets] throughput"]["values"]
        assert ws["gateway"] and ws["gateway-tcp"], ws
        versus_tcp = metrics[f"{label}[websockets] throughput / gateway over TCP (ratio column)"]
        assert versus_tcp["ratio_gateway_stunnel"] == pytest.approx(ws["gateway"] / ws["gateway-tcp"])
    assert "gateway-ws" in proc.stderr
