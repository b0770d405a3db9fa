"""What a reload applies live and what it leaves for a restart (gateway.ops.reload)."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

from gateway.config import parse_config_text
from gateway.ops.lifecycle import LiveConfig, LiveListenerSettings
from gateway.ops.reload import plan_reload

BASE = """
gateway: {{id: gw-1, drain_timeout: {drain}}}
admin: {{listen: "127.0.0.1:{admin}"}}
log: {{level: {level}, trace: {trace}}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "127.0.0.1:{port}", max_connections: {maxc}{networks}}}
  - {{name: mqtt, protocol: mqtt, bind: "127.0.0.1:0"}}
connectors:
  - {{name: iothub, protocol: amqp, host: {host}, allow_plaintext: true}}
  - {{name: iothub-mqtt, protocol: mqtt, host: hub.example, allow_plaintext: true}}
link_routes:
{routes}
mqtt_routes:
  - {{hub: "*", connector: iothub-mqtt}}
"""

ROUTES = '  - {prefix: "$cbs", connector: iothub}\n  - {prefix: "devices/", connector: iothub}'


def config(tmp_path: Path, base: str = BASE, **changes: object):
    values = {
        "drain": "10s", "admin": 0, "level": "info", "trace": "[]", "port": 0, "maxc": 1000,
        "networks": "", "host": "hub.example", "routes": ROUTES,
    }  # fmt: skip
    values.update(changes)
    path = tmp_path / "gateway.yaml"
    return parse_config_text(base.format(**values), str(path))


def test_identical_files_change_nothing(tmp_path: Path) -> None:
    running = config(tmp_path)
    plan = plan_reload(running, config(tmp_path))
    assert plan.config is running
    assert (plan.applied, plan.needs_restart, plan.warnings) == ([], [], [])


def test_routes_limits_log_and_drain_timeout_apply_live(tmp_path: Path) -> None:
    running = config(tmp_path)
    new = config(
        tmp_path,
        routes=ROUTES + '\n  - {pattern: "twin/#", connector: iothub}',
        maxc=5,
        networks=', allowed_networks: ["10.0.0.0/8"]',
        level="debug",
        trace="[amqp]",
        drain="3s",
    )
    plan = plan_reload(running, new)
    assert plan.needs_restart == []
    cfg = plan.config
    assert [r.address for r in cfg.link_routes] == ["$cbs", "devices/", "twin/#"]
    assert cfg.listener("amqp").max_connections == 5
    assert cfg.listener("amqp").allowed_networks == [ip_network("10.0.0.0/8")]
    assert (cfg.log.level, cfg.log.trace, cfg.gateway.drain_timeout) == ("debug", ["amqp"], 3.0)
    # The running objects are left as they were (a reload builds a new configuration).
    assert running.listener("amqp").max_connections == 1000
    assert len(running.link_routes) == 2
    text = "; ".join(plan.applied)
    assert "link_routes: 2 -> 3 route(s)" in text
    assert "listener amqp max_connections: 1000 -> 5" in text
    assert "listener amqp allowed_networks: any -> [10.0.0.0/8]" in text
    assert "log.level: info -> debug" in text and "gateway.drain_timeout" in text


def test_binds_connectors_admin_and_id_need_a_restart(tmp_path: Path) -> None:
    running = config(tmp_path)
    new = config(tmp_path, port=5999, host="other.example", admin=9999)
    plan = plan_reload(running, new)
    assert plan.config is running  # nothing live changed, nothing taken over
    assert "listener amqp: bind" in plan.needs_restart
    assert "connectors" in plan.needs_restart and "admin" in plan.needs_restart
    renamed = config(tmp_path, BASE.replace("id: gw-1", "id: gw-2"))
    assert plan_reload(running, renamed).needs_restart == ["gateway.id"]


def test_a_route_to_a_connector_that_is_not_running_is_warned_about(tmp_path: Path) -> None:
    running = config(tmp_path)
    base = BASE.replace(
        "connectors:\n",
        "connectors:\n  - {{name: new, protocol: amqp, host: n.example, allow_plaintext: true}}\n",
    )
    new = config(tmp_path, base, routes=ROUTES + '\n  - {prefix: "x/", connector: new}')
    plan = plan_reload(running, new)
    assert "connectors" in plan.needs_restart
    assert any("'new' is not running" in w for w in plan.warnings)
    assert [r.address for r in plan.config.link_routes][-1] == "x/"


def test_live_listener_settings_follow_reload_and_drain(tmp_path: Path) -> None:
    running = config(tmp_path, maxc=3)
    settings = LiveListenerSettings.from_config(running.listener("amqp"), running)
    assert (settings.max_connections, settings.allowed_networks) == (3, ())
    new = plan_reload(
        running, config(tmp_path, maxc=7, networks=', allowed_networks: ["127.0.0.1"]')
    )
    settings.update_limits(new.config.listener("amqp"))
    assert settings.max_connections == 7
    assert settings.allowed_networks == (ip_network("127.0.0.1/32"),)
    settings.draining = True
    assert settings.max_connections == 0


def test_live_config_follows_the_configuration_in_force(tmp_path: Path) -> None:
    first = config(tmp_path)
    live = LiveConfig(first)
    assert live.mqtt_routes is first.mqtt_routes
    second = plan_reload(
        first, config(tmp_path, routes=ROUTES + '\n  - {prefix: "y/", connector: iothub}')
    )
    live.current = second.config
    assert [r.address for r in live.link_routes][-1] == "y/"
    assert live.tls_profile_for(first.connector("iothub")) is None
