"""Config model: defaults, durations, addresses, cross-checks and file:line errors."""

from __future__ import annotations

import ipaddress
import os
import textwrap
from pathlib import Path

import pytest

from gateway.config import (
    AmqpConnector,
    AmqpListener,
    ConfigError,
    GatewayConfig,
    HostPort,
    MqttConnector,
    MqttListener,
    load_config,
    parse_config_text,
    parse_duration,
)

MINIMAL = """\
tls_profiles:
  azure: {}
listeners:
  - {name: amqp, protocol: amqp, bind: "127.0.0.1:5672"}
  - {name: mqtt, protocol: mqtt, bind: "127.0.0.1:1883"}
connectors:
  - {name: hub, protocol: amqp, host: myhub.azure-devices.net, tls_profile: azure}
  - {name: hub-mqtt, protocol: mqtt, host: myhub.azure-devices.net, tls_profile: azure}
link_routes:
  - {prefix: "$cbs", connector: hub}
mqtt_routes:
  - {connector: hub-mqtt}
"""


def parse(text: str, filename: str = "cfg.yaml", **kwargs: object) -> GatewayConfig:
    return parse_config_text(textwrap.dedent(text), filename, **kwargs)  # type: ignore[arg-type]


def errors_of(text: str, filename: str = "cfg.yaml", **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, filename, **kwargs)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def single_error(text: str, **kwargs: object) -> str:
    errors = errors_of(text, **kwargs)
    assert len(errors) == 1, errors
    return errors[0]


# --- durations and addresses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
        ("1.5s", 1.5),
        (" 10S ", 10.0),
        ("0", 0.0),
        (7, 7.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "10x", "s", "1 h", "-5s", -1, "1h-", "nan", True, None, "inf"])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("127.0.0.1:5672", "127.0.0.1", 5672, "127.0.0.1:5672"),
        ("0.0.0.0:0", "0.0.0.0", 0, "0.0.0.0:0"),
        ("localhost:1883", "localhost", 1883, "localhost:1883"),
        ("[::1]:5672", "::1", 5672, "[::1]:5672"),
        ("[::]:8883", "::", 8883, "[::]:8883"),
        ("[fe80::1%eth0]:1", "fe80::1%eth0", 1, "[fe80::1%eth0]:1"),
    ],
)
def test_hostport(text: str, host: str, port: int, shown: str) -> None:
    parsed = HostPort.parse(text)
    assert (parsed.host, parsed.port) == (host, port)
    assert str(parsed) == shown
    assert HostPort.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("bad", "hint"),
    [
        ("::1:5672", "brackets"),
        ("localhost", "host:port"),
        (":5672", "host:port"),
        ("host:99999", "0..65535"),
        ("host:http", "0..65535"),
        ("[::1]5672", r"\[ipv6\]:port"),
        ("[nothex]:1", "not an IPv6"),
    ],
)
def test_hostport_rejects(bad: str, hint: str) -> None:
    with pytest.raises(ValueError, match=hint):
        HostPort.parse(bad)


# --- defaults and shape ------------------------------------------------------------------------


def test_defaults() -> None:
    config = parse(MINIMAL)
    assert config.gateway.id.startswith("iot-gateway-")
    assert config.gateway.drain_timeout == 10.0
    assert config.gateway.metrics_device_labels is False
    assert config.admin.listen == HostPort("127.0.0.1", 9090) and config.admin.enabled
    assert (config.log.level, config.log.format, config.log.trace) == ("info", "text", [])
    profile = config.tls_profiles["azure"]
    assert profile.ca_file is None and profile.cert_file is None and profile.min_version == "1.2"

    amqp, mqtt = config.listeners
    assert isinstance(amqp, AmqpListener) and isinstance(mqtt, MqttListener)
    assert amqp.sasl == ["mssbcbs", "anonymous", "plain"]
    assert (amqp.max_frame_size, amqp.idle_timeout, amqp.channel_max) == (65536, 60.0, 255)
    assert (amqp.max_connections, amqp.allowed_networks, amqp.handshake_timeout) == (1000, [], 10.0)
    assert mqtt.max_packet_size == 262144 + 1024 and mqtt.handshake_timeout == 10.0

    hub, hub_mqtt = config.connectors
    assert isinstance(hub, AmqpConnector) and isinstance(hub_mqtt, MqttConnector)
    assert (hub.port, hub_mqtt.port) == (5671, 8883)
    assert hub.sasl == "anonymous" and hub.on_demand and not hub.allow_plaintext
    assert (hub.idle_timeout, hub.max_frame_size, hub.connect_timeout) == (120.0, 65536, 10.0)
    assert (hub.reconnect.initial, hub.reconnect.max) == (1.0, 30.0)
    assert hub.ack_batching == hub_mqtt.ack_batching == 0.001
    assert (hub.pool.max_connections, hub.pool.max_devices_per_connection) == (4, 200)
    assert hub.hostname == "myhub.azure-devices.net"  # defaults to host
    assert hub.target == "myhub.azure-devices.net:5671"

    assert config.link_routes[0].direction == "both"
    assert config.link_routes[0].kind == "prefix" and config.link_routes[0].address == "$cbs"
    assert config.mqtt_routes[0].hub == "*" and config.mqtt_routes[0].allowed_topics is None
    assert config.connector("hub") is hub and config.listener("mqtt") is mqtt
    assert config.tls_profile_for(hub) is profile


def test_empty_file_is_a_config_without_listeners() -> None:
    config = parse("# nothing yet\n")
    assert config.listeners == [] and config.connectors == []


def test_full_shape_round_trip() -> None:
    config = parse(
        """\
        gateway: {id: gw-7, drain_timeout: 2m, metrics_device_labels: true}
        admin: {listen: "[::1]:9091", enabled: false}
        log: {level: debug, format: json, trace: [amqp, mqtt]}
        tls_profiles:
          azure: {server_name: hub.example, min_version: 1.3, ciphers: "ECDHE+AESGCM"}
        listeners:
          - name: amqp
            protocol: amqp
            bind: "[::]:5672"
            sasl: []
            max_frame_size: 512
            idle_timeout: 0
            channel_max: 1
            max_connections: 5
            allowed_networks: [192.168.1.0/24, 10.0.0.7, "fd00::/8"]
            handshake_timeout: 1500ms
        connectors:
          - name: hub
            protocol: amqp
            host: myhub.azure-devices.net
            port: 15671
            tls_profile: azure
            sasl: plain
            sasl_username: dev1@sas.myhub
            sasl_password: not-a-real-secret
            on_demand: false
            reconnect: {initial: 500ms, max: 1m}
            pool: {max_connections: 1, max_devices_per_connection: 1}
        link_routes:
          - {pattern: "devices/*/messages/#", connector: hub, direction: in}
        """
    )
    assert config.gateway.id == "gw-7" and config.gateway.drain_timeout == 120.0
    assert str(config.admin.listen) == "[::1]:9091"
    assert config.log.trace == ["amqp", "mqtt"]
    assert config.tls_profiles["azure"].min_version == "1.3"  # unquoted YAML float accepted
    listener = config.listeners[0]
    assert isinstance(listener, AmqpListener)
    assert listener.sasl == [] and listener.idle_timeout == 0 and listener.handshake_timeout == 1.5
    assert listener.allowed_networks == [
        ipaddress.ip_network("192.168.1.0/24"),
        ipaddress.ip_network("10.0.0.7/32"),
        ipaddress.ip_network("fd00::/8"),
    ]
    hub = config.connectors[0]
    assert isinstance(hub, AmqpConnector)
    assert hub.hostname == "hub.example"  # the profile's server_name
    assert hub.sasl_password is not None
    assert hub.sasl_password.get_secret_value() == "not-a-real-secret"
    assert "not-a-real-secret" not in repr(config) and "not-a-real-secret" not in str(
        config.model_dump(mode="json")
    )
    assert config.link_routes[0].kind == "pattern"
    # JSON dump validates back into the same config.
    again = GatewayConfig.model_validate(config.model_dump(mode="json"))
    assert again.admin.listen == config.admin.listen
    assert again.listeners == config.listeners


def test_connector_hostname_explicit_wins() -> None:
    config = parse(
        MINIMAL.replace("tls_profile: azure}", "tls_profile: azure, hostname: other.example}", 1)
    )
    assert config.connectors[0].hostname == "other.example"  # type: ignore[union-attr]


# --- errors with file:line: key ----------------------------------------------------------------


def test_unknown_connector_names_line_and_key() -> None:
    text = MINIMAL.replace(
        '  - {prefix: "$cbs", connector: hub}\n',
        '  - {prefix: "$cbs", connector: hub}\n  - {prefix: "devices/", connector: iothub2}\n',
    )
    assert single_error(text, filename="config/bad.yaml") == (
        "config/bad.yaml:11: link_routes[1].connector: no connector named 'iothub2' "
        "(known: 'hub', 'hub-mqtt')"
    )


def test_route_to_connector_of_wrong_protocol() -> None:
    text = MINIMAL.replace("  - {connector: hub-mqtt}", "  - {connector: hub}")
    error = single_error(text)
    assert error.startswith("cfg.yaml:12: mqtt_routes[0].connector: connector 'hub' speaks amqp")
    text = MINIMAL.replace(
        '{prefix: "$cbs", connector: hub}', '{prefix: "$cbs", connector: hub-mqtt}'
    )
    assert "link_routes[0].connector: connector 'hub-mqtt' speaks mqtt" in single_error(text)


def test_bad_duration() -> None:
    text = MINIMAL.replace('bind: "127.0.0.1:5672"}', 'bind: "127.0.0.1:5672", idle_timeout: 10x}')
    assert single_error(text) == (
        "cfg.yaml:4: listeners[0].idle_timeout: invalid duration '10x': "
        "use a number with a unit, e.g. 500ms, 30s, 2m, 1h"
    )


def test_ack_batching_off_or_bounded() -> None:
    hub = "tls_profile: azure}"
    assert parse(MINIMAL.replace(hub, "tls_profile: azure, ack_batching: 0}")).connectors[0].ack_batching == 0
    assert parse(MINIMAL.replace(hub, "tls_profile: azure, ack_batching: 5ms}")).connectors[1].ack_batching == 0.005
    error = single_error(MINIMAL.replace(hub, "tls_profile: azure, ack_batching: 1s}", 1))
    assert error.startswith("cfg.yaml:7: connectors[0].ack_batching: ")
    assert "0.05" in error


def test_yaml_syntax_error() -> None:
    error = single_error("listeners:\n  - name: a\n   protocol: amqp\n")
    assert error.startswith("cfg.yaml:3: yaml: ")


def test_yaml_duplicate_key() -> None:
    assert single_error("log:\n  level: info\n  level: debug\n") == (
        "cfg.yaml:3: yaml: duplicate key 'level'"
    )


def test_top_level_must_be_a_mapping() -> None:
    assert single_error("- a\n- b\n") == "cfg.yaml:1: config: expected a mapping of sections"


def test_unknown_keys_are_errors_with_a_hint() -> None:
    text = MINIMAL.replace("tls_profiles:", "log: {levle: debug}\ntls_profiles:")
    assert single_error(text) == "cfg.yaml:1: log.levle: unknown key (did you mean 'level'?)"
    assert single_error("colour: blue\n") == "cfg.yaml:1: colour: unknown key"


def test_protocol_specific_keys() -> None:
    text = MINIMAL.replace(
        '{name: mqtt, protocol: mqtt, bind: "127.0.0.1:1883"}',
        '{name: mqtt, protocol: mqtt, bind: "127.0.0.1:1883", max_frame_size: 4096}',
    )
    assert single_error(text) == (
        "cfg.yaml:5: listeners[1].max_frame_size: unknown key: "
        "'max_frame_size' is only valid for protocol amqp"
    )
    text = MINIMAL.replace(
        '{name: amqp, protocol: amqp, bind: "127.0.0.1:5672"}',
        '{name: amqp, protocol: amqp, bind: "127.0.0.1:5672", max_packet_size: 4096}',
    )
    assert (
        "listeners[0].max_packet_size: unknown key: 'max_packet_size' is only valid for protocol mqtt"
        in single_error(text)
    )
    text = MINIMAL.replace(
        "{name: hub-mqtt, protocol: mqtt, host: myhub.azure-devices.net, tls_profile: azure}",
        "{name: hub-mqtt, protocol: mqtt, host: myhub.azure-devices.net, tls_profile: azure,"
        " sasl: plain}",
    )
    assert single_error(text) == (
        "cfg.yaml:8: connectors[1].sasl: unknown key: 'sasl' is only valid for protocol amqp"
    )


def test_protocol_missing_or_wrong() -> None:
    text = MINIMAL.replace(
        '{name: mqtt, protocol: mqtt, bind: "127.0.0.1:1883"}',
        '{name: mqtt, bind: "127.0.0.1:1883"}',
    )
    assert (
        single_error(text)
        == "cfg.yaml:5: listeners[1].protocol: required key is missing (amqp or mqtt)"
    )
    text = MINIMAL.replace("protocol: mqtt, bind", "protocol: mqtts, bind")
    assert (
        single_error(text)
        == "cfg.yaml:5: listeners[1].protocol: must be 'amqp' or 'mqtt', got 'mqtts'"
    )


def test_missing_required_key_points_at_the_item() -> None:
    text = MINIMAL.replace(
        "{name: hub, protocol: amqp, host: myhub.azure-devices.net,", "{name: hub, protocol: amqp,"
    )
    assert single_error(text) == "cfg.yaml:7: connectors[0].host: required key is missing"


def test_ipv6_bind() -> None:
    config = parse(MINIMAL.replace('"127.0.0.1:5672"', '"[::1]:5672"'))
    assert config.listeners[0].bind == HostPort("::1", 5672)
    error = single_error(MINIMAL.replace('"127.0.0.1:5672"', '"::1:5672"'))
    assert error.startswith("cfg.yaml:4: listeners[0].bind: invalid address '::1:5672'")
    assert "brackets" in error


@pytest.mark.parametrize(
    ("first", "second", "clash"),
    [
        ("127.0.0.1:5672", "127.0.0.1:5672", True),
        ("0.0.0.0:5672", "127.0.0.1:5672", True),
        ("127.0.0.1:5672", "0.0.0.0:5672", True),
        ("[::]:5672", "[::1]:5672", True),
        ("[::1]:5672", "[::1]:5672", True),
        ("[::]:5672", "0.0.0.0:5672", False),  # separate families (IPV6_V6ONLY)
        ("127.0.0.1:5672", "127.0.0.2:5672", False),
        ("127.0.0.1:5672", "127.0.0.1:5673", False),
        ("127.0.0.1:0", "127.0.0.1:0", False),  # ephemeral ports never clash
    ],
)
def test_duplicate_bind(first: str, second: str, clash: bool) -> None:
    text = MINIMAL.replace('"127.0.0.1:5672"', f'"{first}"').replace(
        '"127.0.0.1:1883"', f'"{second}"'
    )
    if not clash:
        parse(text)
        return
    assert single_error(text) == (
        f"cfg.yaml:5: listeners[1].bind: bind address {HostPort.parse(second)} "
        "already used by listener 'amqp'"
    )


def test_listener_clashing_with_admin() -> None:
    text = MINIMAL.replace('"127.0.0.1:5672"', '"127.0.0.1:9090"')
    assert single_error(text) == (
        "cfg.yaml:4: listeners[0].bind: bind address 127.0.0.1:9090 already used by admin.listen"
    )
    parse("admin: {enabled: false}\n" + text)  # a disabled admin endpoint binds nothing


def test_duplicate_names() -> None:
    text = MINIMAL.replace("{name: mqtt, protocol: mqtt", "{name: amqp, protocol: mqtt")
    assert single_error(text) == "cfg.yaml:5: listeners[1].name: duplicate listener name 'amqp'"
    text = MINIMAL.replace("{name: hub-mqtt,", "{name: hub,").replace(
        "connector: hub-mqtt", "connector: hub"
    )
    assert "cfg.yaml:8: connectors[1].name: duplicate connector name 'hub'" in errors_of(text)


def test_plaintext_connector_refused() -> None:
    text = MINIMAL.replace(
        "host: myhub.azure-devices.net, tls_profile: azure}", "host: 10.0.0.5}", 1
    )
    assert single_error(text) == (
        "cfg.yaml:7: connectors[0]: plaintext connector refused; set allow_plaintext: true "
        "to send traffic to 10.0.0.5:5671 unencrypted, or name a tls_profile"
    )
    text = text.replace("host: 10.0.0.5}", "host: 10.0.0.5, allow_plaintext: true}")
    assert parse(text).connectors[0].tls_profile is None


def test_unknown_tls_profile() -> None:
    text = MINIMAL.replace("tls_profile: azure}", "tls_profile: azur}", 1)
    assert single_error(text) == (
        "cfg.yaml:7: connectors[0].tls_profile: no tls_profile named 'azur' (known: 'azure')"
    )
    text = MINIMAL.replace('bind: "127.0.0.1:5672"}', 'bind: "127.0.0.1:5672", tls_profile: local}')
    assert single_error(text).startswith(
        "cfg.yaml:4: listeners[0].tls_profile: no tls_profile named 'local'"
    )


def test_listener_tls_needs_a_certificate() -> None:
    text = MINIMAL.replace('bind: "127.0.0.1:5672"}', 'bind: "127.0.0.1:5672", tls_profile: azure}')
    assert single_error(text) == (
        "cfg.yaml:4: listeners[0].tls_profile: tls_profile 'azure' has no cert_file/key_file "
        "to serve device TLS with"
    )


def test_tls_files_resolved_against_the_config_directory(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    for name in ("ca.pem", "gw.pem", "gw.key"):
        (tmp_path / "certs" / name).write_text("placeholder\n")
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(
        "tls_profiles:\n"
        "  local: {ca_file: certs/ca.pem, cert_file: certs/gw.pem, key_file: ./certs/gw.key}\n"
        "listeners:\n"
        "  - {name: amqps, protocol: amqp, bind: '127.0.0.1:0', tls_profile: local}\n"
    )
    config = load_config(config_path)
    profile = config.tls_profiles["local"]
    assert profile.ca_file == tmp_path / "certs" / "ca.pem"
    assert profile.key_file == tmp_path / "certs" / "gw.key"
    assert config.source_path == config_path.absolute()


def test_missing_ca_file_names_key_and_path(tmp_path: Path) -> None:
    text = "tls_profiles:\n  azure:\n    ca_file: roots.pem\n"
    error = single_error(text, filename=str(tmp_path / "gw.yaml"))
    assert (
        error
        == f"{tmp_path / 'gw.yaml'}:3: tls_profiles.azure.ca_file: file not found: {tmp_path / 'roots.pem'}"
    )
    error = single_error(text, base_dir=tmp_path)
    assert (
        error == f"cfg.yaml:3: tls_profiles.azure.ca_file: file not found: {tmp_path / 'roots.pem'}"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key_file(tmp_path: Path) -> None:
    (tmp_path / "gw.pem").write_text("x")
    key = tmp_path / "gw.key"
    key.write_text("x")
    key.chmod(0)
    text = "tls_profiles:\n  local: {cert_file: gw.pem, key_file: gw.key}\n"
    assert single_error(text, base_dir=tmp_path) == (
        f"cfg.yaml:2: tls_profiles.local.key_file: file not readable: {key}"
    )


def test_cert_without_key(tmp_path: Path) -> None:
    (tmp_path / "gw.pem").write_text("x")
    text = "tls_profiles:\n  local:\n    cert_file: gw.pem\n"
    assert single_error(text, base_dir=tmp_path) == (
        "cfg.yaml:3: tls_profiles.local.cert_file: cert_file needs key_file too (both or neither)"
    )


def test_link_route_prefix_or_pattern() -> None:
    both = MINIMAL.replace(
        '{prefix: "$cbs", connector: hub}', '{prefix: "$cbs", pattern: "a/#", connector: hub}'
    )
    assert (
        single_error(both) == "cfg.yaml:10: link_routes[0]: give exactly one of prefix or pattern"
    )
    neither = MINIMAL.replace('{prefix: "$cbs", connector: hub}', "{connector: hub}")
    assert (
        single_error(neither)
        == "cfg.yaml:10: link_routes[0]: give exactly one of prefix or pattern"
    )
    direction = MINIMAL.replace("connector: hub}", "connector: hub, direction: sideways}")
    assert single_error(direction) == (
        "cfg.yaml:10: link_routes[0].direction: must be 'in', 'out' or 'both', got 'sideways'"
    )


def test_sasl_plain_needs_credentials_and_never_echoes_the_password() -> None:
    text = MINIMAL.replace("tls_profile: azure}", "tls_profile: azure, sasl: plain}", 1)
    assert errors_of(text) == [
        "cfg.yaml:7: connectors[0].sasl_username: required when sasl: plain",
        "cfg.yaml:7: connectors[0].sasl_password: required when sasl: plain",
    ]
    text = MINIMAL.replace("tls_profile: azure}", "tls_profile: azure, sasl_password: 12345678}", 1)
    error = single_error(text)
    assert error.startswith("cfg.yaml:7: connectors[0].sasl_password: ") and "12345678" not in error


def test_mqtt_topic_filters() -> None:
    ok = MINIMAL.replace(
        "{connector: hub-mqtt}",
        '{connector: hub-mqtt, allowed_topics: ["devices/+/messages/events/#", "$iothub/#"]}',
    )
    assert parse(ok).mqtt_routes[0].allowed_topics == ["devices/+/messages/events/#", "$iothub/#"]
    bad = MINIMAL.replace(
        "{connector: hub-mqtt}", '{connector: hub-mqtt, allowed_topics: ["devices/#/x"]}'
    )
    assert single_error(bad).startswith(
        "cfg.yaml:12: mqtt_routes[0].allowed_topics[0]: invalid topic filter"
    )


def test_limits() -> None:
    text = MINIMAL.replace(
        'bind: "127.0.0.1:5672"}', 'bind: "127.0.0.1:5672", max_frame_size: 511}'
    )
    assert single_error(text) == (
        "cfg.yaml:4: listeners[0].max_frame_size: must be greater than or equal to 512, got 511"
    )
    text = MINIMAL.replace(
        "tls_profile: azure}", "tls_profile: azure, pool: {max_devices_per_connection: 1001}}", 1
    )
    assert single_error(text).startswith(
        "cfg.yaml:7: connectors[0].pool.max_devices_per_connection: must be less"
    )
    text = MINIMAL.replace(
        "tls_profile: azure}", "tls_profile: azure, reconnect: {initial: 10s, max: 1s}}", 1
    )
    assert single_error(text) == "cfg.yaml:7: connectors[0].reconnect.max: must be at least initial"


def test_several_errors_sorted_by_line() -> None:
    text = MINIMAL.replace("connector: hub}", "connector: nope}").replace(
        "{connector: hub-mqtt}", "{connector: nada}"
    )
    errors = errors_of(text)
    assert [e.split(":")[1] for e in errors] == ["10", "12"]


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert info.value.errors == [
        f"{tmp_path / 'absent.yaml'}: cannot read config file: No such file or directory"
    ]


def test_aliases_and_merge_keys() -> None:
    config = parse(
        """\
        tls_profiles: {azure: {}}
        listeners:
          - &first {name: a, protocol: amqp, bind: "127.0.0.1:0", max_connections: 7}
          - {<<: *first, name: b}
        """
    )
    assert [(item.name, item.max_connections) for item in config.listeners] == [("a", 7), ("b", 7)]


def test_duplicate_link_route() -> None:
    text = MINIMAL.replace(
        '  - {prefix: "$cbs", connector: hub}\n',
        '  - {prefix: "$cbs", connector: hub}\n  - {prefix: "$cbs/", connector: hub, direction: in}\n',
    )
    assert single_error(text) == (
        "cfg.yaml:11: link_routes[1].prefix: duplicate route for prefix '$cbs/' "
        "(direction in overlaps both)"
    )
    split = MINIMAL.replace(
        '  - {prefix: "$cbs", connector: hub}\n',
        '  - {prefix: "$cbs", connector: hub, direction: in}\n'
        '  - {prefix: "$cbs", connector: hub, direction: out}\n',
    )
    assert len(parse(split).link_routes) == 2


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("listeners: {a: 1}\n", "cfg.yaml:1: listeners: must be a list"),
        ("gateway: 5\n", "cfg.yaml:1: gateway: must be a mapping (key: value), got 5"),
        (
            "log: {trace: [amqp, http]}\n",
            "cfg.yaml:1: log.trace[1]: must be 'amqp' or 'mqtt', got 'http'",
        ),
        (
            'tls_profiles: {"bad name": {}}\n',
            "cfg.yaml:1: tls_profiles.bad name: invalid name 'bad name'",
        ),
    ],
)
def test_type_errors_read_like_yaml(text: str, error: str) -> None:
    assert single_error(text).startswith(error)
