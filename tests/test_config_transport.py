"""Connector `transport` and `proxy` settings: defaults, inheritance, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import parse_config_text
from gateway.config.loader import ConfigError


def connectors(text: str, base_dir: Path | None = None) -> dict[str, object]:
    config = parse_config_text(text, base_dir=base_dir)
    return {c.name: c for c in config.connectors}


def test_port_defaults_follow_the_transport() -> None:
    found = connectors(
        """
connectors:
  - {name: a, protocol: amqp, host: hub, allow_plaintext: true}
  - {name: m, protocol: mqtt, host: hub, allow_plaintext: true}
  - {name: aw, protocol: amqp, host: hub, allow_plaintext: true, transport: websockets}
  - {name: mw, protocol: mqtt, host: hub, allow_plaintext: true, transport: websockets}
  - {name: mx, protocol: mqtt, host: hub, allow_plaintext: true, transport: websockets, port: 8443}
"""
    )
    assert {name: c.port for name, c in found.items()} == {  # type: ignore[attr-defined]
        "a": 5671,
        "m": 8883,
        "aw": 443,
        "mw": 443,
        "mx": 8443,
    }
    assert found["a"].transport == "tcp"  # type: ignore[attr-defined]
    assert found["mw"].target == "hub:443"  # type: ignore[attr-defined]


def test_top_level_proxy_is_the_default(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("secret\n")
    found = connectors(
        """
proxy: {url: "http://proxy.corp:3128", username: gw, password_file: pw}
connectors:
  - {name: inherit, protocol: mqtt, host: hub, allow_plaintext: true}
  - {name: direct, protocol: mqtt, host: hub, allow_plaintext: true, proxy: none}
  - {name: env, protocol: amqp, host: hub, allow_plaintext: true, proxy: env}
  - name: own
    protocol: amqp
    host: hub
    allow_plaintext: true
    proxy: {url: "http://other:8080"}
""",
        base_dir=tmp_path,
    )
    inherited = found["inherit"].proxy  # type: ignore[attr-defined]
    assert inherited.url == "http://proxy.corp:3128" and inherited.username == "gw"
    assert inherited.password_file == tmp_path / "pw"
    assert found["direct"].proxy == "none"  # type: ignore[attr-defined]
    assert found["env"].proxy == "env"  # type: ignore[attr-defined]
    assert found["own"].proxy.url == "http://other:8080"  # type: ignore[attr-defined]


def test_no_proxy_by_default() -> None:
    found = connectors(
        "connectors: [{name: m, protocol: mqtt, host: hub, allow_plaintext: true}]\n"
    )
    assert found["m"].proxy is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("snippet", "message"),
    [
        ("transport: wss", "connectors[0].transport: must be 'tcp' or 'websockets'"),
        ("proxy: envv", "connectors[0].proxy: must be 'env' or 'none'"),
        ("proxy: {url: 'https://p:443'}", "connectors[0].proxy.url: unsupported proxy scheme"),
        ("proxy: {url: 'http://p:3128', username: u}", "username needs password_file too"),
        ("proxy: {url: 'http://p:3128', pasword_file: x}", "connectors[0].proxy.pasword_file"),
        ("proxy: {url: 'http://p:3128', username: u, password_file: nope}", "file not found"),
    ],
)
def test_errors_point_at_the_key(snippet: str, message: str, tmp_path: Path) -> None:
    text = (
        "connectors:\n"
        f"  - {{name: m, protocol: mqtt, host: hub, allow_plaintext: true, {snippet}}}\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "gw.yaml", base_dir=tmp_path)
    assert message in str(info.value)
    assert "gw.yaml:2:" in str(info.value)


def test_firewall_example(repo_root: Path) -> None:
    from gateway.config import load_config

    config = load_config(repo_root / "config" / "iothub-firewall.yaml")
    assert [(c.transport, c.port, c.proxy) for c in config.connectors] == [
        ("websockets", 443, "env"),
        ("websockets", 443, "env"),
    ]
    assert all(c.host == "myhub.azure-devices.net" for c in config.connectors)
    assert config.tls_profiles["azure"].ca_file is None
