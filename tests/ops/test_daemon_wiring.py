"""The daemon passes the credential store and live listener limits to whatever takes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from gateway import daemon as daemon_module
from gateway.auth.credentials import CredentialStore
from gateway.config import parse_config_text
from gateway.net import mqtt_relay
from gateway.ops.lifecycle import LiveListenerSettings

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


@pytest.fixture
def config(tmp_path: Path):
    return parse_config_text(CONFIG, str(tmp_path / "gateway.yaml"))


async def test_newer_listener_and_router_signatures_get_store_and_settings(
    config, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: dict[str, Any] = {}

    async def serve_mqtt_listener(listener_cfg, config, *, task_status=trio.TASK_STATUS_IGNORED,
                                  observer=None, listener_observer=None, stats=None, tracer=None,
                                  credentials=None, settings=None):  # fmt: skip
        calls["mqtt"] = {"credentials": credentials, "settings": settings, "config": config}
        task_status.started([("127.0.0.1", 1883)])
        await trio.sleep_forever()

    class Router(daemon_module.Router):
        def __init__(self, config: Any, *, credentials: Any = None, **kwargs: Any) -> None:
            calls["router"] = credentials
            super().__init__(config, **kwargs)

    monkeypatch.setattr(mqtt_relay, "serve_mqtt_listener", serve_mqtt_listener)
    monkeypatch.setattr(daemon_module, "Router", Router)
    store = CredentialStore()
    async with trio.open_nursery() as nursery:
        gw = daemon_module.Daemon(config, (), store)
        await nursery.start(gw.run)
        assert calls["router"] is store
        assert calls["mqtt"]["credentials"] is store
        assert isinstance(calls["mqtt"]["settings"], LiveListenerSettings)
        assert calls["mqtt"]["config"].current is config  # routes follow reloads
        assert gw.listener_addresses["mqtt"] == [("127.0.0.1", 1883)]
        assert gw.fixed_limits == set()
        gw.request_stop()


async def test_a_listener_that_takes_the_store_but_no_settings_keeps_its_limits(
    config, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    async def serve_mqtt_listener(listener_cfg, config, *, task_status=trio.TASK_STATUS_IGNORED,
                                  observer=None, listener_observer=None, stats=None, tracer=None,
                                  credentials=None):  # fmt: skip
        seen["credentials"] = credentials
        task_status.started([("127.0.0.1", 1883)])
        await trio.sleep_forever()

    monkeypatch.setattr(mqtt_relay, "serve_mqtt_listener", serve_mqtt_listener)
    store = CredentialStore()
    async with trio.open_nursery() as nursery:
        gw = daemon_module.Daemon(config, (), store)
        await nursery.start(gw.run)
        assert seen["credentials"] is store
        assert gw.fixed_limits == {"mqtt"}  # a reload says these need a restart
        gw.request_stop()


async def test_draining_listeners_close_new_connections_at_once(config) -> None:
    async with trio.open_nursery() as nursery:
        gw = daemon_module.Daemon(config, (), CredentialStore())
        await nursery.start(gw.run)
        assert set(gw.listener_settings) == {"amqp", "mqtt"}
        for name in {"amqp", "mqtt"} - gw.fixed_limits:
            port = gw.listener_addresses[name][0][1]
            gw.listener_settings[name].draining = True  # what a drain does first
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(5):
                assert await stream.receive_some(8) == b"", name  # closed at once, not served
            await stream.aclose()
        gw.request_stop()
