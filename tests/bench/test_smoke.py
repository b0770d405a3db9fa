"""The benchmark harness in smoke mode: every scenario's code path, tiny counts.

One `python -m bench --smoke` run (about half a minute) is shared by the
tests of this module; each test then checks one scenario's results. Numbers
are not judged here (development machines are noisy): only that every path
that can run did run and produced its figures. A path whose binary is missing
(stunnel4, mosquitto) is skipped by the harness with a reason, and the test
that needs it is skipped with that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.stunnel import stunnel_binary
from bench.syscalls import perf_binary
from bench.upstreams import mosquitto_binary

pytestmark = pytest.mark.bench

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 280  # the per-test limit is 300 s; a healthy smoke run takes about 30 s
STUNNEL = stunnel_binary()
MOSQUITTO = mosquitto_binary()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-out")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    json_files = list(out.glob("bench-*-smoke.json"))
    md_files = list(out.glob("bench-*-smoke.md"))
    assert len(json_files) == 1 and len(md_files) == 1, proc.stdout
    data: dict[str, Any] = json.loads(json_files[0].read_text())
    data["_stdout"] = proc.stdout
    data["_markdown"] = md_files[0].read_text()
    return data


def scenario(data: dict[str, Any], number: int) -> dict[str, Any]:
    for item in data["scenarios"]:
        if item["number"] == number:
            assert not item["errors"], item["errors"]
            return item
    raise AssertionError(f"scenario {number} missing")


def values(item: dict[str, Any], metric_name: str) -> dict[str, float | None]:
    for metric in item["metrics"]:
        if metric["name"] == metric_name:
            return metric["values"]
    raise AssertionError(f"no metric {metric_name!r} in {[m['name'] for m in item['metrics']]}")


def expected_paths(*, direct: bool = True) -> list[str]:
    paths = ["direct"] if direct else []
    return paths + (["stunnel"] if STUNNEL else []) + ["gateway"]


def needs(binary: str | None, name: str) -> None:
    if binary is None:
        pytest.skip(f"{name} is not installed: the bench skipped the paths that need it")


def test_run_info_and_outputs(smoke: dict[str, Any]) -> None:
    run = smoke["run"]
    assert run["smoke"] is True
    assert run["machine"]["nproc"] >= 1 and run["machine"]["cpu_model"]
    assert run["command"].startswith("python -m bench --smoke")
    assert [s["number"] for s in smoke["scenarios"]] == [1, 2, 3, 4, 5, 6, 7]
    assert "gateway/stunnel" in smoke["_stdout"]
    assert smoke["_markdown"].startswith("### Run of ")
    assert "| scenario | metric | direct | stunnel | gateway |" in smoke["_markdown"]


@pytest.mark.parametrize("number", [1, 2])
def test_amqp_throughput(smoke: dict[str, Any], number: int) -> None:
    item = scenario(smoke, number)
    throughput = values(item, "throughput")
    for path in expected_paths():
        assert throughput[path] and throughput[path] > 0, (path, item["details"].get(path))
        report = item["details"][path]
        assert report["hub_d2c"] >= report["acked_total"] > 0
    cpu = values(item, "hop CPU per 10k msgs")
    assert cpu["gateway"] is not None and cpu["direct"] is None


def test_stunnel_path_ran(smoke: dict[str, Any]) -> None:
    needs(STUNNEL, "stunnel4")
    item = scenario(smoke, 1)
    assert "stunnel" not in item["skipped"]
    assert values(item, "throughput")["stunnel"]


def test_mqtt_throughput(smoke: dict[str, Any]) -> None:
    item = scenario(smoke, 3)
    upstreams = ["hubsim"] + (["mosquitto"] if MOSQUITTO else [])
    for upstream in upstreams:
        throughput = values(item, f"[{upstream}] throughput")
        for path in expected_paths():
            assert throughput[path] and throughput[path] > 0, (upstream, path)
    if not MOSQUITTO:
        assert item["skipped"]["mosquitto"] == "mosquitto is not installed"


def test_idle_memory(smoke: dict[str, Any]) -> None:
    item = scenario(smoke, 4)
    assert "direct" in item["skipped"]
    for protocol in ("AMQP", "MQTT"):
        per_device = values(item, f"{protocol} per device connection")
        for path in expected_paths(direct=False):
            assert per_device[path] is not None, (protocol, path)
        rss = values(item, f"{protocol} RSS with 30 idle")
        assert rss["gateway"] and rss["gateway"] > 0


def test_connect_storm(smoke: dict[str, Any]) -> None:
    item = scenario(smoke, 5)
    elapsed = values(item, "time until all attached")
    for path in expected_paths():
        assert elapsed[path] and elapsed[path] > 0
        assert item["details"][path]["devices"] == 20


def test_added_latency(smoke: dict[str, Any]) -> None:
    item = scenario(smoke, 6)
    protocols = ["AMQP"] + (["MQTT"] if MOSQUITTO else [])
    for protocol in protocols:
        p99 = values(item, f"{protocol} latency p99")
        for path in expected_paths():
            assert p99[path] is not None and p99[path] > 0
        added = values(item, f"{protocol} added p99 vs direct")
        assert added["direct"] is None and added["gateway"] is not None


def test_light_load(smoke: dict[str, Any]) -> None:
    item = scenario(smoke, 7)
    paths = (["stunnel"] if STUNNEL else []) + ["gateway"]
    for protocol in ("AMQP", "MQTT"):
        cpu = values(item, f"[{protocol}] hop CPU per 10k msgs (median of rounds)")
        rate = values(item, f"[{protocol}] throughput")
        for path in paths:
            assert cpu[path] is not None and cpu[path] >= 0
            assert rate[path] and rate[path] > 0
        rounds = item["details"][protocol.lower()]
        traced = all("per_message" in r[p].get("trace", {}) for r in rounds for p in paths)
        if perf_binary() is not None and traced:  # perf may be there but not allowed
            syscalls = values(item, f"[{protocol}] syscalls per msg")
            hub_writes = values(item, f"[{protocol}] TLS writes (records) to hub per msg")
            for path in paths:
                assert syscalls[path] and syscalls[path] > 0, item["details"]
                assert hub_writes[path] and hub_writes[path] > 0, item["details"]
        # Rounds alternate the order of the paths.
        assert len(rounds) == 2 and all(set(r) == set(paths) for r in rounds)
    rss = values(item, "idle RSS, no device (AMQP + MQTT configured)")
    assert rss["gateway"] and rss["gateway"] > 5
