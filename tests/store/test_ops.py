"""The store in operations: /metrics (iotgw_store_*), /api/store, `iot-gateway status`,
and the daemon opening it at start (or carrying on without it) and closing it at stop."""

from __future__ import annotations

import io
import json
import logging
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway import daemon as daemon_module
from gateway.config import parse_config_text
from gateway.ops import status
from gateway.ops.status_summary import Snapshot, render_summary
from gateway.ops.store_status import StoreCollector, StoreStatus
from gateway.ops.store_view import store_tables, summary_line
from gateway.store import FakeStore, StoreUnavailable

from .conftest import Clock, message


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def filled_store(clock: Clock) -> FakeStore:
    store = FakeStore(max_bytes=1_000_000, clock=clock)
    await store.append(**message("dev1", 0, 100))
    clock.advance(30)
    await store.append(**message("dev1", 1, 100))
    await store.append(**message("dev2", 0, 200, protocol="amqp", connector="hub-amqp"))
    store.record_replayed("hub-mqtt", "dev1", 4)
    store._ledger.refused["full"] += 2
    store._ledger.errors["disk_full"] += 1
    clock.advance(10)
    return store


async def test_metrics_per_connector(clock: Clock) -> None:
    store = await filled_store(clock)
    status_ = StoreStatus(True, max_bytes=1_000_000, connectors=("hub-mqtt", "hub-amqp", "idle"))
    status_.store = store
    registry = CollectorRegistry()
    registry.register(StoreCollector(status_))
    got = samples(registry)

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert value("iotgw_store_up") == 1
    assert value("iotgw_store_max_bytes") == 1_000_000
    assert value("iotgw_store_backlog_messages", connector="hub-mqtt") == 2
    assert value("iotgw_store_backlog_messages", connector="hub-amqp") == 1
    assert value("iotgw_store_backlog_messages", connector="idle") == 0
    assert value("iotgw_store_backlog_bytes", connector="hub-mqtt") == 2 * (100 + 64 + 4 + 32 + 1)
    assert value("iotgw_store_oldest_age_seconds", connector="hub-mqtt") == 40
    assert value("iotgw_store_oldest_age_seconds", connector="idle") == 0
    assert value("iotgw_store_appended_total", connector="hub-mqtt") == 2
    assert value("iotgw_store_replayed_total", connector="hub-mqtt") == 4
    assert value("iotgw_store_expired_total", connector="hub-amqp") == 0
    assert value("iotgw_store_rejected_total", connector="idle") == 0
    assert value("iotgw_store_refused_total", reason="full") == 2
    assert value("iotgw_store_refused_total", reason="device_share") == 0
    assert value("iotgw_store_errors_total", kind="disk_full") == 1
    assert value("iotgw_store_errors_total", kind="corrupt") == 0
    assert value("iotgw_store_replay_rate") == store.replay_rate
    assert not [k for k in got if "device" in dict(k[1])]  # no device labels by default


async def test_metrics_per_device_when_asked(clock: Clock) -> None:
    store = await filled_store(clock)
    status_ = StoreStatus(True, max_bytes=1_000_000)
    status_.store = store
    registry = CollectorRegistry()
    registry.register(StoreCollector(status_, device_labels=True))
    got = samples(registry)
    key = ("iotgw_store_backlog_messages", (("connector", "hub-amqp"), ("device", "dev2")))
    assert got[key] == 1
    key = ("iotgw_store_oldest_age_seconds", (("connector", "hub-mqtt"), ("device", "dev1")))
    assert got[key] == 40


def test_metrics_when_off_or_unavailable() -> None:
    registry = CollectorRegistry()
    registry.register(StoreCollector(StoreStatus(False)))
    assert samples(registry) == {}
    broken = StoreStatus(True, max_bytes=5, path="/x/store.db")
    broken.error = StoreUnavailable("store /x/store.db: the database file is corrupt (x)",
                                    kind="corrupt")  # fmt: skip
    registry = CollectorRegistry()
    registry.register(StoreCollector(broken))
    got = samples(registry)
    assert got[("iotgw_store_up", ())] == 0
    assert got[("iotgw_store_errors_total", (("kind", "corrupt"),))] == 1
    assert broken.snapshot() == {
        "state": "unavailable",
        "reason": "store /x/store.db: the database file is corrupt (x)",
        "path": "/x/store.db",
        "max_bytes": 5,
        "errors": {"corrupt": 1},
    }
    assert StoreStatus(False).snapshot() == {"state": "off"}


async def test_api_snapshot_and_status_text(clock: Clock) -> None:
    store = await filled_store(clock)
    status_ = StoreStatus(True, max_bytes=1_000_000)
    status_.store = store
    snap = json.loads(json.dumps(status_.snapshot()))
    assert snap["state"] == "ok" and snap["messages"] == 3
    assert snap["connectors"]["hub-mqtt"]["messages"] == 2
    assert snap["connectors"]["hub-mqtt"]["replayed"] == 4
    assert snap["devices"]["dev2"] == {
        "messages": 1, "bytes": 200 + 64 + 4 + 32 + 1, "oldest_age_seconds": 10.0,
        "connector": "hub-amqp",
    }  # fmt: skip
    assert snap["refused"] == {"full": 2} and snap["errors"] == {"disk_full": 1}
    line = summary_line(snap)
    assert line is not None and line.startswith("ok, 3 messages waiting (")
    assert "% of 976.6 KiB" in line and "oldest 40s" in line and "2 refused" in line
    assert summary_line({"state": "off"}) is None
    assert summary_line({"state": "unavailable", "reason": "corrupt"}) == "UNAVAILABLE: corrupt"
    text = store_tables(snap, status.render_table)
    assert text.startswith("Store: ok, :memory:\n  3 messages")
    assert "Store backlog by connector" in text and "Store backlog by device" in text
    assert "dev2    hub-amqp" in text.replace("  ", "  ")
    assert store_tables({"state": "off"}, status.render_table).startswith("Store\n  off")


def test_summary_shows_the_store_only_when_configured() -> None:
    snap = Snapshot()
    assert "Store and forward" not in render_summary(snap, "http://x")
    snap.store = {"state": "ok", "messages": 0, "bytes": 0, "max_bytes": 1024}
    assert "Store and forward     ok, 0 messages waiting (0 B, 0% of 1.0 KiB)" in render_summary(
        snap, "http://x"
    )


# --- the daemon ----------------------------------------------------------------------------

CONFIG = """
gateway: {{id: gw-store}}
admin: {{listen: "127.0.0.1:0"}}
connectors:
  - {{name: iothub, protocol: amqp, host: hub.example, allow_plaintext: true}}
store_and_forward: {{path: {path}, max_bytes: 1MiB}}
"""


def http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.read().decode()


async def run_daemon(config_text: str, tmp_path: Path, check: Any) -> daemon_module.Daemon:
    config = parse_config_text(config_text, str(tmp_path / "gateway.yaml"))
    async with trio.open_nursery() as nursery:
        gw = daemon_module.Daemon(config, ())
        await nursery.start(gw.run)
        host, port = gw.admin_addresses[0]
        await check(gw, f"http://{host}:{port}")
        gw.request_stop()
    return gw


async def test_daemon_opens_serves_and_closes_the_store(tmp_path: Path) -> None:
    path = tmp_path / "state" / "store.db"

    async def check(gw: daemon_module.Daemon, url: str) -> None:
        assert gw.store is not None and gw.store_status.store is gw.store
        await gw.store.append(**message("dev1", 0, 100, connector="iothub", protocol="amqp"))
        code, body = await trio.to_thread.run_sync(http_get, url + "/api/store")
        snap = json.loads(body)
        assert code == 200 and snap["state"] == "ok" and snap["path"] == str(path)
        assert snap["connectors"]["iothub"]["messages"] == 1
        code, body = await trio.to_thread.run_sync(http_get, url + "/metrics")
        assert 'iotgw_store_backlog_messages{connector="iothub"} 1.0' in body
        assert "iotgw_store_up 1.0" in body
        code, body = await trio.to_thread.run_sync(http_get, url + "/readyz")
        assert code == 200
        out = io.StringIO()
        assert await trio.to_thread.run_sync(
            lambda: status.main(["--admin", url, "--store"], out=out)
        ) == 0
        assert "Store: ok" in out.getvalue() and "iothub" in out.getvalue()

    gw = await run_daemon(CONFIG.format(path=path), tmp_path, check)
    assert gw.store is None  # closed at stop
    assert path.exists()


async def test_daemon_without_the_section_has_no_store(tmp_path: Path) -> None:
    text = CONFIG.split("store_and_forward")[0].replace("{{", "{").replace("}}", "}")

    async def check(gw: daemon_module.Daemon, url: str) -> None:
        assert gw.store is None
        code, body = await trio.to_thread.run_sync(http_get, url + "/api/store")
        assert json.loads(body) == {"state": "off"}
        code, body = await trio.to_thread.run_sync(http_get, url + "/metrics")
        assert "iotgw_store_" not in body

    await run_daemon(text, tmp_path, check)


async def test_corrupt_store_at_start_keeps_the_gateway_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "store.db"
    path.write_bytes(b"not a database at all " * 500)

    async def check(gw: daemon_module.Daemon, url: str) -> None:
        assert gw.store is None
        code, body = await trio.to_thread.run_sync(http_get, url + "/api/store")
        snap = json.loads(body)
        assert snap["state"] == "unavailable" and "corrupt" in snap["reason"]
        code, body = await trio.to_thread.run_sync(http_get, url + "/metrics")
        assert "iotgw_store_up 0.0" in body
        assert 'iotgw_store_errors_total{kind="corrupt"} 1.0' in body
        code, _ = await trio.to_thread.run_sync(http_get, url + "/readyz")
        assert code == 200  # live traffic is still relayed

    with caplog.at_level(logging.ERROR, "gateway.daemon"):
        await run_daemon(CONFIG.format(path=path), tmp_path, check)
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.daemon"]
    assert len(lines) == 1
    assert lines[0].startswith(f"store {path}: the database file is corrupt (")
    assert "running without store and forward" in lines[0]
