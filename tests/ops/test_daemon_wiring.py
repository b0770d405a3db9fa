"""The daemon hands the listeners, the router and the admin API what they need, and a
reload switches them over: live limits, the credential store, the route table."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway import daemon as daemon_module
from gateway.auth.credentials import CredentialError, CredentialStore
from gateway.config import parse_config_text
from gateway.ops.lifecycle import LiveCredentials, LiveListenerSettings
from tests.waiting import FAILSAFE

CONFIG = """
gateway: {id: gw-wiring}
admin: {enabled: false}
listeners:
  - {name: amqp, protocol: amqp, bind: "127.0.0.1:0"}
  - {name: mqtt, protocol: mqtt, bind: "127.0.0.1:0"}
connectors:
  - {name: iothub, protocol: amqp, host: hub.example, allow_plaintext: true}
  - {name: iothub-mqtt, protocol: mqtt, host: hub.example, allow_plaintext: true}
link_routes:
  - {prefix: "devices/", connector: iothub}
mqtt_routes:
  - {hub: "*", connector: iothub-mqtt}
"""

KEY = base64.b64encode(b"k" * 32).decode()


def credentials_section(tmp_path: Path, ids: list[str]) -> str:
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text("".join(f"{i}-key: {KEY}\n" for i in ids))
    os.chmod(secrets, 0o600)
    devices = "".join(f"    - {{id: {i}, key: {i}-key, trust: network}}\n" for i in ids)
    return f"credentials:\n  secrets_file: {secrets}\n  devices:\n{devices}"


@pytest.fixture
def config(tmp_path: Path):
    return parse_config_text(CONFIG, str(tmp_path / "gateway.yaml"))


async def test_listeners_get_live_settings_and_the_store_router_gets_the_store(
    config, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: dict[str, Any] = {}

    async def serve_mqtt_listener(listener_cfg, config, *, task_status=trio.TASK_STATUS_IGNORED,
                                  observer=None, listener_observer=None, stats=None, tracer=None,
                                  credentials=None, settings=None, clock=None,
                                  handshake=None, store_forward=None):  # fmt: skip
        calls["mqtt"] = {"credentials": credentials, "settings": settings, "config": config,
                         "observer": observer, "listener_observer": listener_observer,
                         "handshake": handshake, "store_forward": store_forward}  # fmt: skip
        task_status.started([("127.0.0.1", 1883)])
        await trio.sleep_forever()

    monkeypatch.setattr(daemon_module, "serve_mqtt_listener", serve_mqtt_listener)
    store = CredentialStore()
    async with trio.open_nursery() as nursery:
        gw = daemon_module.Daemon(config, (), store)
        await nursery.start(gw.run)
        assert gw.router.tokens is not None and gw.router.tokens.store is store
        mqtt = calls["mqtt"]
        assert isinstance(mqtt["credentials"], LiveCredentials)
        assert mqtt["credentials"].current is store and mqtt["credentials"]  # true while empty
        assert mqtt["settings"] is gw.listener_settings["mqtt"]
        assert isinstance(gw.listener_settings["amqp"], LiveListenerSettings)
        assert mqtt["config"].current is config  # routes follow reloads
        assert mqtt["observer"].registry is gw.registry  # connector state, device ids
        assert mqtt["listener_observer"] is gw.listener_observer
        assert mqtt["handshake"] is gw.handshake  # one budget for every listener
        assert mqtt["store_forward"] is None  # no store_and_forward section
        assert gw.listener_addresses["mqtt"] == [("127.0.0.1", 1883)]
        gw.request_stop()


async def test_draining_listeners_close_new_connections_at_once(config) -> None:
    async with trio.open_nursery() as nursery:
        gw = daemon_module.Daemon(config, (), CredentialStore())
        await nursery.start(gw.run)
        assert set(gw.listener_settings) == {"amqp", "mqtt"}
        for name in ("amqp", "mqtt"):
            port = gw.listener_addresses[name][0][1]
            gw.listener_settings[name].draining = True  # what a drain does first
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(FAILSAFE):
                assert await stream.receive_some(8) == b"", name  # closed at once, not served
            await stream.aclose()
        gw.request_stop()


async def test_routes_in_the_registry_list_link_and_mqtt_routes(config) -> None:
    gw = daemon_module.Daemon(config, (), CredentialStore())
    routes = gw.registry.routes()
    assert {"kind": "link", "prefix": "devices/", "connector": "iothub",
            "direction": "both"} in routes  # fmt: skip
    assert {"kind": "mqtt", "hub": "*", "connector": "iothub-mqtt"} in routes


async def test_reload_applies_listener_limits_credentials_and_routes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level("INFO")
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG + credentials_section(tmp_path, ["dev1"]))
    from gateway.config import load_config

    config = load_config(path)
    async with trio.open_nursery() as nursery:
        gw = daemon_module.Daemon(config)
        await nursery.start(gw.run)
        first = gw.credentials
        assert [row["id"] for row in gw.registry.credentials()] == ["dev1"]
        assert gw.registry.credentials()[0]["tokens"] == []

        changed = CONFIG.replace('bind: "127.0.0.1:0"}', 'bind: "127.0.0.1:0", max_connections: 7}')
        changed = changed.replace('{hub: "*", connector: iothub-mqtt}',
                                  '{hub: "myhub.example", connector: iothub-mqtt}')  # fmt: skip
        path.write_text(changed + credentials_section(tmp_path, ["dev1", "dev2"]))
        assert await gw.reload()
        assert gw.credentials is not first
        assert gw.router.tokens is not None and gw.router.tokens.store is gw.credentials
        assert gw.live_credentials.current is gw.credentials
        assert sorted(row["id"] for row in gw.registry.credentials()) == ["dev1", "dev2"]
        assert {gw.listener_settings[n].max_connections for n in ("amqp", "mqtt")} == {7}
        assert {"kind": "mqtt", "hub": "myhub.example",
                "connector": "iothub-mqtt"} in gw.registry.routes()  # fmt: skip
        assert "credentials: 1 -> 2 entries" in caplog.text

        # A key that cannot be read when the store is built rejects the whole reload.
        current = gw.credentials

        def unbuildable(config: Any) -> CredentialStore:
            raise CredentialError("credentials.devices[0]: environment variable X is not set")

        monkeypatch.setattr(daemon_module, "_credential_store", unbuildable)
        path.write_text(CONFIG + credentials_section(tmp_path, ["dev1"]))
        assert not await gw.reload()
        assert gw.credentials is current and gw.router.tokens.store is current
        assert gw.listener_settings["amqp"].max_connections == 7  # the old file stays in force
        assert "reload rejected, the running configuration stays: credentials:" in caplog.text
        gw.request_stop()


def test_api_credentials_rows_carry_the_router_tokens_never_secrets() -> None:
    from gateway.ops.credentials_api import credential_rows

    class Tokens:
        def describe(self) -> list[dict[str, Any]]:
            return [
                {"connection": "d1", "identity": "dev1", "upstream": "iothub/0",
                 "expires_in": 3590.0, "failures": 0},
                {"connection": "d2", "identity": "stranger", "upstream": "iothub/0",
                 "expires_in": 10.0, "failures": 2},
            ]  # fmt: skip

    store = CredentialStore.from_config(
        parse_config_text(
            CONFIG + f"credentials:\n  allow_inline_secrets: true\n  devices:\n"
            f"    - {{id: dev1, key: {KEY}, trust: network}}\n"
            f"    - {{id: dev2, key: {KEY}, trust: network}}\n",
            "/tmp/gateway.yaml",
        ).credentials
    )
    rows = {row["id"]: row for row in credential_rows(store, Tokens())}
    assert [t["connection"] for t in rows["dev1"]["tokens"]] == ["d1"]
    assert rows["dev2"]["tokens"] == []
    assert KEY not in repr(rows)
