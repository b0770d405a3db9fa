"""The example configs in config/ validate on this machine and route as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import AmqpConnector, load_config

EXAMPLES = ["iothub-amqp.yaml", "iothub-mqtt.yaml", "iothub-both.yaml", "iothub-dps.yaml"]
DPS_HOST = "global.azure-devices-provisioning.net"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_loads(repo_root: Path, name: str) -> None:
    config = load_config(repo_root / "config" / name)
    assert config.listeners and config.connectors
    for connector in config.connectors:
        # Examples never ship plaintext upstreams, and rely on the system trust store.
        assert connector.tls_profile is not None and not connector.allow_plaintext
        assert config.tls_profiles[connector.tls_profile].ca_file is None
        assert connector.host in ("myhub.azure-devices.net", DPS_HOST)


def test_amqp_example_is_the_dispatch_router_setup(repo_root: Path) -> None:
    config = load_config(repo_root / "config" / "iothub-amqp.yaml")
    (listener,) = config.listeners
    assert (listener.protocol, str(listener.bind), listener.tls_profile) == (
        "amqp",
        "0.0.0.0:5672",
        None,
    )
    (connector,) = config.connectors
    assert isinstance(connector, AmqpConnector)
    assert (connector.host, connector.port, connector.sasl) == (
        "myhub.azure-devices.net",
        5671,
        "anonymous",
    )
    assert [(r.prefix, r.connector, r.direction) for r in config.link_routes] == [
        ("$cbs", "iothub", "both"),
        ("devices/", "iothub", "both"),
    ]


def test_mqtt_and_both_examples(repo_root: Path) -> None:
    mqtt = load_config(repo_root / "config" / "iothub-mqtt.yaml")
    assert [(r.hub, r.connector) for r in mqtt.mqtt_routes] == [("*", "iothub-mqtt")]
    assert mqtt.connectors[0].port == 8883 and mqtt.link_routes == []
    both = load_config(repo_root / "config" / "iothub-both.yaml")
    assert {listener.protocol for listener in both.listeners} == {"amqp", "mqtt"}
    assert len(both.link_routes) == 2 and len(both.mqtt_routes) == 1


def test_dps_example_routes_registrations_to_the_provisioning_service(repo_root: Path) -> None:
    from gateway.mqtt_relay import select_mqtt_route
    from gateway.router.routes import RouteTable

    config = load_config(repo_root / "config" / "iothub-dps.yaml")
    relay = {c.name for c in config.connectors if isinstance(c, AmqpConnector) and c.sasl == "relay"}
    assert relay == {"dps"}
    table = RouteTable.from_config(config.link_routes)
    match = table.match("0ne000ABCD/registrations/sensor-1", "in")
    assert match is not None and match.route.connector == "dps"
    user = "0ne000ABCD/registrations/sensor-1/api-version=2019-03-31&ClientVersion=x"
    assert select_mqtt_route(config.mqtt_routes, user).connector == "dps-mqtt"
    assert select_mqtt_route(config.mqtt_routes, "myhub.azure-devices.net/d/?api-version=1").connector == "iothub-mqtt"
    assert select_mqtt_route(config.mqtt_routes, "0ne0OTHER/registrations/x/api-version=1") is None
