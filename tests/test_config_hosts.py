"""Connector failover endpoints: ``hosts:`` beside the single ``host``/``port``."""

from __future__ import annotations

import textwrap

import pytest

from gateway.config import ConfigError, GatewayConfig, parse_config_text

BASE = """\
tls_profiles:
  azure: {}
connectors:
  - name: hub
    protocol: amqp
    tls_profile: azure
CONNECTOR
"""


def parse(connector_lines: str) -> GatewayConfig:
    text = BASE.replace("CONNECTOR\n", textwrap.indent(textwrap.dedent(connector_lines), "    "))
    return parse_config_text(text, "cfg.yaml")


def errors(connector_lines: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(connector_lines)
    return info.value.errors


def test_host_alone_is_one_endpoint_as_before():
    c = parse("host: myhub.azure-devices.net\n").connectors[0]
    assert [(e.host, e.port) for e in c.endpoints] == [("myhub.azure-devices.net", 5671)]
    assert c.target == "myhub.azure-devices.net:5671"
    assert c.hosts is None


def test_hosts_in_order_with_default_and_own_ports():
    config = parse("""\
        port: 5671
        hosts: [a.example, "b.example:5672", "[::1]", "[::1]:5673", 127.0.0.2]
    """)
    c = config.connectors[0]
    assert [(e.host, e.port) for e in c.endpoints] == [
        ("a.example", 5671),
        ("b.example", 5672),
        ("::1", 5671),
        ("::1", 5673),
        ("127.0.0.2", 5671),
    ]
    # The first host stands for the connector where one name is needed.
    assert c.host == "a.example" and c.hostname == "a.example"
    assert c.target.startswith("a.example:5671,b.example:5672,[::1]:5671")
    # A dump validates again to the same configuration.
    again = GatewayConfig.model_validate(config.model_dump(mode="json"))
    assert again.connectors[0].endpoints == c.endpoints


def test_mqtt_connector_hosts():
    text = BASE.replace("protocol: amqp", "protocol: mqtt").replace(
        "CONNECTOR\n", "    hosts: [a.example, b.example]\n"
    )
    c = parse_config_text(text, "cfg.yaml").connectors[0]
    assert [(e.host, e.port) for e in c.endpoints] == [("a.example", 8883), ("b.example", 8883)]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("hosts: []\n", "cfg.yaml:7: connectors[0].hosts: List should have at least 1 item"),
        ("hosts: [a, a]\n", "cfg.yaml:7: connectors[0].hosts[1]: duplicate endpoint"),
        ("hosts: [a, 'b:0']\n", "cfg.yaml:7: connectors[0].hosts[1]: invalid host 'b:0'"),
        ("hosts: ['::1']\n", "cfg.yaml:7: connectors[0].hosts[0]: invalid address '::1'"),
        ("hosts: [a, 'b c']\n", "cfg.yaml:7: connectors[0].hosts[1]: invalid host 'b c'"),
        ("hosts: [a, 5]\n", "cfg.yaml:7: connectors[0].hosts[1]: expected a string, got 5"),
        ("host: x\nhosts: [a]\n", "cfg.yaml:8: connectors[0].hosts: give host or hosts, not both"),
        ("port: 5671\n", "cfg.yaml:4: connectors[0].host: required key is missing"),
    ],
)
def test_bad_hosts_point_at_the_line(lines: str, expected: str):
    [error] = errors(lines)
    assert error.startswith(expected), error
