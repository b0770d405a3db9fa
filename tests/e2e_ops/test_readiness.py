"""/readyz follows the hub for a connector with ``on_demand: false``; /api shows no secrets."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import trio

from gateway.config import parse_config_text
from gateway.daemon import serve
from tests.waiting import FAILSAFE

from .helpers import admin_url, gateway_yaml, http_get, start_daemon, wait_http, write_config


async def test_readyz_flips_when_the_hub_goes_away_and_comes_back(nursery, hub, tmp_path) -> None:
    text = gateway_yaml(hub, connector="    on_demand: false\n")
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", text))
    url = admin_url(daemon) + "/readyz"
    assert await wait_http(url, 200) == "ready\n"
    assert await trio.to_thread.run_sync(http_get, admin_url(daemon) + "/healthz") == (200, "ok\n")

    await trio.to_thread.run_sync(hub.stop)
    body = await wait_http(url, 503)
    assert body.startswith("connector not connected: iothub"), body

    await trio.to_thread.run_sync(hub.start)  # same ports: the hub is back
    assert await wait_http(url, 200) == "ready\n"
    _, connectors = await trio.to_thread.run_sync(http_get, admin_url(daemon) + "/api/connectors")
    iothub = next(c for c in json.loads(connectors) if c["name"] == "iothub")
    assert (iothub["state"], iothub["on_demand"], iothub["connections"]) == ("connected", False, 1)


async def test_on_demand_connector_does_not_affect_readiness(nursery, hub, tmp_path) -> None:
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", gateway_yaml(hub)))
    await trio.to_thread.run_sync(hub.stop)
    assert await wait_http(admin_url(daemon) + "/readyz", 200) == "ready\n"


def credentials_yaml(tmp_path: Path, key: str) -> str:
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(f"dev1-key: {key}\n")
    os.chmod(secrets, 0o600)
    return f"""
credentials:
  secrets_file: {secrets}
  devices:
    - {{id: dev1, key: dev1-key, trust: network}}
    - {{id: dev2, key: env:IOTGW_TEST_DEV2_KEY, allowed_addresses: ["127.0.0.1"]}}
"""


async def test_api_credentials_lists_identities_never_keys(
    nursery, hub, keys, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("IOTGW_TEST_DEV2_KEY", keys["dev2"])
    text = gateway_yaml(hub, extra=credentials_yaml(tmp_path, keys["dev1"]))
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", text))
    status, body = await trio.to_thread.run_sync(http_get, admin_url(daemon) + "/api/credentials")
    assert status == 200
    rows = {row["id"]: row for row in json.loads(body)}
    assert set(rows) == {"dev1", "dev2"}
    assert (rows["dev1"]["kind"], rows["dev2"]["source"]) == ("key", "env:IOTGW_TEST_DEV2_KEY")
    assert keys["dev1"] not in body and keys["dev2"] not in body
    # trust: network is worth a warning at start-up.
    assert any("dev1 has trust: network" in r.getMessage() for r in caplog.records)
    assert keys["dev1"] not in caplog.text and keys["dev2"] not in caplog.text


async def test_a_credential_that_cannot_be_built_exits_2_before_binding(
    hub, keys, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO)
    text = gateway_yaml(hub, extra=credentials_yaml(tmp_path, keys["dev1"]))
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    # Valid when loaded (the variable was set then), gone when the daemon builds the store.
    config = parse_config_text(text, str(path), env={"IOTGW_TEST_DEV2_KEY": keys["dev2"]})
    os.environ.pop("IOTGW_TEST_DEV2_KEY", None)
    with trio.fail_after(FAILSAFE):
        assert await serve(config) == 2
    assert "environment variable IOTGW_TEST_DEV2_KEY is not set" in caplog.text
    assert "listener amqp" not in caplog.text and "started" not in caplog.text
