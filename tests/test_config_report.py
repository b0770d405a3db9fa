"""`iot-gateway check` reports every problem in one pass, field errors and cross-reference
errors together, each as file:line: key: message; the examples' placeholders are warnings
for `check` and make `run` refuse to start unless --allow-placeholders."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import ConfigError, load_config, parse_config_text

REPO_ROOT = Path(__file__).resolve().parents[1]

MANY = """\
gateway: {id: x, drain_timeout: 10 seconds}
tls_profiles:
  azure: {min_version: "1.1"}
listeners:
  - {name: amqp, protocol: amqp, bind: "0.0.0.0:5672"}
  - {name: mqtt, protocol: mqtt, bind: "0.0.0.0:1883", max_connections: 0}
  - {name: amqp2, protocol: amqp, bind: "0.0.0.0:5672", tls_profile: nope}
connectors:
  - {name: iothub, protocol: amqp, host: hub.example, tls_profile: azure, idle_timeout: forever}
  - {name: iothub-mqtt, protocol: mqtt, host: hub.example, tls_profile: azur}
  - {name: iothub-mqtt, protocol: mqtt, host: hub2.example, allow_plaintext: true}
link_routes:
  - {prefix: "$cbs", connector: iothub}
  - {prefix: "devices/", connector: iothub2}
mqtt_routes:
  - {hub: "*", connector: iothub-mqtt}
"""


def errors_of(text: str, name: str = "gw.yaml") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config_text(text, name)
    return caught.value.errors


def test_field_and_cross_reference_errors_in_one_pass() -> None:
    assert errors_of(MANY) == [
        "gw.yaml:1: gateway.drain_timeout: invalid duration '10 seconds': use a number with a "
        "unit, e.g. 500ms, 30s, 2m, 1h",
        "gw.yaml:3: tls_profiles.azure.min_version: must be '1.2' or '1.3', got '1.1'",
        "gw.yaml:6: listeners[1].max_connections: must be greater than or equal to 1, got 0",
        "gw.yaml:7: listeners[2].tls_profile: no tls_profile named 'nope' (known: 'azure')",
        "gw.yaml:7: listeners[2].bind: bind address 0.0.0.0:5672 already used by listener 'amqp'",
        "gw.yaml:9: connectors[0].idle_timeout: invalid duration 'forever': use a number with a "
        "unit, e.g. 500ms, 30s, 2m, 1h",
        "gw.yaml:10: connectors[1].tls_profile: no tls_profile named 'azur' (known: 'azure')",
        "gw.yaml:11: connectors[2].name: duplicate connector name 'iothub-mqtt'",
        "gw.yaml:14: link_routes[1].connector: no connector named 'iothub2' "
        "(known: 'iothub', 'iothub-mqtt')",
    ]


def test_a_reference_to_an_entry_already_reported_is_not_an_error_of_its_own() -> None:
    # connectors[0] is wrong in itself; the routes naming it are not reported again.
    text = """\
connectors:
  - {name: iothub, protocol: amqp, host: hub.example, allow_plaintext: true, port: 99999}
link_routes:
  - {prefix: "devices/", connector: iothub}
"""
    assert errors_of(text) == [
        "gw.yaml:2: connectors[0].port: must be less than or equal to 65535, got 99999"
    ]


def test_a_whole_bad_section_leaves_the_rest_checked() -> None:
    text = """\
admin: {listen: "nowhere"}
listeners:
  - {name: a, protocol: amqp, bind: "127.0.0.1:9090"}
connectors: []
link_routes:
  - {prefix: "devices/", connector: missing}
"""
    lines = errors_of(text)
    assert lines[0].startswith("gw.yaml:1: admin.listen: invalid address 'nowhere'")
    assert lines[1:] == [
        "gw.yaml:6: link_routes[0].connector: no connector named 'missing' (known: none defined)"
    ]  # and no clash with the default admin address the bad one stood for


def test_cross_reference_errors_alone_as_before() -> None:
    text = """\
connectors:
  - {name: iothub, protocol: amqp, host: hub.example, allow_plaintext: true}
link_routes:
  - {prefix: "devices/", connector: iothub}
  - {prefix: "twin/", connector: nohub}
"""
    assert errors_of(text) == [
        "gw.yaml:5: link_routes[1].connector: no connector named 'nohub' (known: 'iothub')"
    ]


def test_check_command_prints_them_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "gw.yaml").write_text(MANY)
    assert main(["check", "-c", str(tmp_path / "gw.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 9


# -- placeholders ---------------------------------------------------------------------------


EXAMPLES = sorted((REPO_ROOT / "config").glob("*.yaml"))


def placeholders_of(path: Path) -> list[str]:
    return load_config(path).placeholders


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_hub_name_is_flagged(path: Path) -> None:
    found = placeholders_of(path)
    text = path.read_text()
    assert len([f for f in found if "myhub.azure-devices.net" in f]) == text.count(
        "host: myhub.azure-devices.net"
    ) > 0
    assert len([f for f in found if "0ne000ABCD" in f]) == sum(
        1 for line in text.splitlines() if "0ne000ABCD/" in line and not line.lstrip().startswith("#")
    )


def test_the_placeholder_lines_point_at_the_keys() -> None:
    found = placeholders_of(REPO_ROOT / "config" / "iothub-dps.yaml")
    lines = (REPO_ROOT / "config" / "iothub-dps.yaml").read_text().splitlines()
    for entry in found:
        _, line, key, message = entry.split(":", 3)
        assert "placeholder" in message
        text = lines[int(line) - 1]
        assert ("myhub.azure-devices.net" in text) or ("0ne000ABCD" in text), (entry, text)
    assert {e.split(": ")[1] for e in found} == {
        "connectors[0].host", "connectors[1].host", "link_routes[2].pattern",
        "mqtt_routes[0].username",
    }  # fmt: skip


def test_deploy_configs_are_flagged(tmp_path: Path) -> None:
    token = tmp_path / "admin-token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    token.chmod(0o600)
    shutil.copy(REPO_ROOT / "deploy" / "gateway.yaml", tmp_path / "gateway.yaml")
    assert len(load_config(tmp_path / "gateway.yaml").placeholders) == 2


@pytest.mark.parametrize(
    ("fragment", "key"),
    [
        ("hosts: [myhub.azure-devices.net, '10.0.0.1:5671']", "connectors[0].hosts[0]"),
        ("host: MyHub.Azure-Devices.NET", "connectors[0].host"),
        ("host: 10.0.0.1\n    proxy: {url: 'http://proxy.corp.example:3128'}",
         "connectors[0].proxy.url"),
    ],
)  # fmt: skip
def test_placeholders_wherever_the_gateway_dials(fragment: str, key: str) -> None:
    text = f"""\
connectors:
  - name: iothub
    protocol: amqp
    {fragment}
    allow_plaintext: true
"""
    [entry] = parse_config_text(text, "gw.yaml").placeholders
    assert f": {key}: " in entry


def test_real_names_are_not_placeholders() -> None:
    text = """\
proxy: {url: "http://proxy.plant.local:3128"}
connectors:
  - {name: iothub, protocol: amqp, host: contoso-hub.azure-devices.net, allow_plaintext: true}
  - {name: local, protocol: mqtt, host: 127.0.0.1, allow_plaintext: true}
link_routes:
  - {pattern: "0ne00DEM0/registrations/*", connector: iothub}
mqtt_routes:
  - {hub: myhub.azure-devices.net, connector: local}  # a match, not a place to dial
"""
    assert parse_config_text(text, "gw.yaml").placeholders == []


@pytest.mark.parametrize("websockets", [False, True])
def test_the_demo_configuration_has_none(tmp_path: Path, websockets: bool) -> None:
    from gateway.demo.gateway_config import GatewayPorts, HubEndpoint, render_config
    from gateway.demo.scenario import DPS_SCOPE, HUB_HOST

    (tmp_path / "ca.pem").write_text("only its existence is checked\n")
    hub = HubEndpoint(HUB_HOST, 1, 2, str(tmp_path / "ca.pem"), dps_mqtt_port=3,
                      dps_scope=DPS_SCOPE, ws_port=4 if websockets else None)  # fmt: skip
    text = render_config(hub, GatewayPorts(5, 6, 7))
    assert parse_config_text(text, str(tmp_path / "gateway.yaml")).placeholders == []


def test_run_refuses_placeholders_unless_allowed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, restore_root_logger: None
) -> None:
    import gateway.daemon

    started: list[Any] = []
    monkeypatch.setattr(gateway.daemon, "run", lambda config, trace=(): started.append(config) or 0)
    assert main(["run", "-c", "config/iothub-both.yaml"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert started == []
    assert err[0].startswith("config/iothub-both.yaml:43: connectors[0].host: 'myhub.azure-dev")
    assert err[-1].startswith("iot-gateway run: refusing to start with the examples' placeholders")
    assert "--allow-placeholders" in err[-1]
    assert main(["run", "-c", "config/iothub-both.yaml", "--allow-placeholders"]) == 0
    assert len(started) == 1


def test_run_refuses_in_a_real_process(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(textwrap.dedent("""\
        admin: {enabled: false}
        listeners:
          - {name: amqp, protocol: amqp, bind: "127.0.0.1:0"}
        connectors:
          - {name: iothub, protocol: amqp, host: myhub.azure-devices.net, allow_plaintext: true}
        link_routes:
          - {prefix: "devices/", connector: iothub}
        """))  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{config}:5: connectors[0].host: ")
