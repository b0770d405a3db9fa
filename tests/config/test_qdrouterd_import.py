"""`iot-gateway import-qdrouterd`: Qpid Dispatch Router configurations -> gateway YAML.

The sample files in ``qdrouterd/`` are written for these tests after the
shapes documented by Qpid Dispatch Router (its schema, its example configs
across 0.5 - 1.x, and the IoT Hub routing-gateway setup): every result must
pass ``iot-gateway check`` and say what it left behind, and why.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from gateway.config import load_config, parse_config_text
from gateway.config.qdrouterd import QdrouterdError, canonical_attr, import_text, parse

DATA = Path(__file__).parent / "qdrouterd"
SAMPLES = sorted(p.name for p in DATA.iterdir())


def imported(tmp_path: Path, name: str) -> tuple[Path, str]:
    """Import sample `name` with the CLI into tmp_path (with the PEM files it names)."""
    for pem in ("ca.pem", "client.pem", "client.key", "server.pem", "server.key"):
        (tmp_path / pem).write_text("placeholder\n")
    out = tmp_path / "gateway.yaml"
    assert main(["import-qdrouterd", str(DATA / name), "-o", str(out)]) == 0
    return out, out.read_text()


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_imports_and_passes_check(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out, text = imported(tmp_path, name)
    err = capsys.readouterr().err
    assert "does not pass" not in err, err
    assert main(["check", "-c", str(out)]) == 0, capsys.readouterr().err
    # Every comment about something left behind names the source line and a reason.
    for line in text.splitlines():
        if "not carried over:" in line:
            assert re.search(rf"{re.escape(name)}:\d+: .+ -- .+", line), line


def test_iothub_article_setup(tmp_path: Path) -> None:
    out, text = imported(tmp_path, "iothub-article.conf")
    config = load_config(out)
    assert config.gateway.id == "Router.IoTGateway"
    (listener,) = config.listeners
    assert (listener.protocol, str(listener.bind), listener.sasl) == (
        "amqp", "0.0.0.0:5672", ["mssbcbs", "anonymous"]
    )  # fmt: skip
    assert listener.tls_profile is None
    (connector,) = config.connectors
    assert (connector.name, connector.host, connector.port) == (
        "IOTHUB", "myhub.azure-devices.net", 5671
    )  # fmt: skip
    assert connector.tls_profile == "iothub-tls" and connector.sasl == "anonymous"
    assert connector.idle_timeout == 120
    assert config.tls_profiles["iothub-tls"].ca_file == tmp_path / "ca.pem"
    # Four in/out linkRoutes become two routes in both directions.
    routes = [(r.prefix, r.direction, r.connector) for r in config.link_routes]
    assert routes == [("$cbs", "both", "IOTHUB"), ("devices/", "both", "IOTHUB")]
    assert "not carried over" not in text


def test_dispatch_05_link_route_patterns_and_inline_tls(tmp_path: Path) -> None:
    out, text = imported(tmp_path, "dispatch-0.5.conf")
    config = load_config(out)
    assert config.gateway.id == "Router.Edge"  # router.routerId wins over containerName
    (listener,) = config.listeners
    assert str(listener.bind) == "0.0.0.0:5672"
    assert listener.sasl == ["mssbcbs", "anonymous", "plain"]
    (connector,) = config.connectors
    assert (connector.host, connector.port) == ("myhub.azure-devices.net", 5671)  # amqps
    assert config.tls_profiles[connector.tls_profile].ca_file == tmp_path / "ca.pem"  # certDb
    assert [(r.prefix, r.direction) for r in config.link_routes] == [
        ("$cbs", "both"), ("devices/", "both")
    ]  # fmt: skip
    assert re.search(r"dispatch-0\.5\.conf:40: linkRoutePattern \{prefix: b2\.\} -- no "
                     r"connection", text)  # fmt: skip
    assert re.search(r"dispatch-0\.5\.conf:44: fixedAddress .* -- message-routing", text)
    assert re.search(r"dispatch-0\.5\.conf:4: workerThreads: 2 -- ", text)


def test_dispatch_06_dashed_names_quotes_patterns(tmp_path: Path) -> None:
    out, text = imported(tmp_path, "dispatch-0.6.conf")
    config = load_config(out)
    assert config.gateway.id == "Router.Site-7"  # quoted value
    (listener,) = config.listeners
    assert str(listener.bind) == "[::]:5672"
    assert listener.sasl == ["plain"] and listener.idle_timeout == 30
    assert listener.max_frame_size == 32768
    (connector,) = config.connectors
    assert connector.host == "westhub.azure-devices.net"  # trailing comment stripped
    profile = config.tls_profiles[connector.tls_profile]
    assert profile.min_version == "1.2" and profile.ca_file == tmp_path / "ca.pem"
    routes = [(r.kind, r.address, r.direction) for r in config.link_routes]
    assert routes == [
        ("prefix", "$cbs", "both"),
        ("pattern", "devices/*/messages/#", "both"),  # '#' kept: pattern values are not cut
        ("pattern", "devices/*/twin/#", "in"),
    ]


def test_json_form(tmp_path: Path) -> None:
    out, text = imported(tmp_path, "router.json")
    config = load_config(out)
    assert config.gateway.id == "json-router"
    (listener,) = config.listeners
    assert listener.name == "devices" and str(listener.bind) == "127.0.0.1:15672"
    (connector,) = config.connectors
    assert connector.name == "hub" and connector.sasl == "external"
    assert config.tls_profiles["hub"].cert_file == tmp_path / "client.pem"
    assert len(config.link_routes) == 2
    assert re.search(r"router\.json:16: address \{prefix: telemetry\} -- ", text)


def test_unsupported_entities_are_each_explained(tmp_path: Path) -> None:
    out, text = imported(tmp_path, "unsupported.conf")
    config = load_config(out)
    # What is left: the TLS device listener, the route-container connector, one route.
    assert [listener.name for listener in config.listeners] == ["secure-devices"]
    assert config.listeners[0].tls_profile == "server-tls"
    assert [c.name for c in config.connectors] == ["broker"]
    assert [(r.prefix, r.direction) for r in config.link_routes] == [("orders/", "in")]
    expected = {
        4: "mode: interior",
        6: "workerThreads",
        7: "saslConfigDir",
        16: "password: <redacted>",
        25: "authenticatePeer: yes",
        26: "SCRAM-SHA-1",
        29: "openProperties",
        35: "listener",
        41: "listener 'console'",
        48: "connector 'peer-router'",
        62: "saslPassword",
        65: "connector 'queue-host'",
        72: "linkRoute {prefix: queue.} -- containerId",
        78: "linkRoute {prefix: rewritten/}",
        91: "duplicate",
        97: "autoLink",
        103: "address",
        108: "waypoint",
        113: "exchange",
        118: "binding",
        124: "policy",
        129: "vhost",
        140: "authServicePlugin",
        146: "log {module: ROUTER_CORE}",
        151: "tcpListener",
    }
    notes = {
        int(m.group(1)): m.group(2)
        for m in re.finditer(r"not carried over: unsupported\.conf:(\d+): (.*)", text)
    }
    for line, what in expected.items():
        assert line in notes and what in notes[line], (line, what, notes.get(line))
    # Secrets never reach the output, not even in comments.
    assert "hunter2" not in text and "BROKER_PASSWORD" not in text
    # The connector whose password came from the environment gets a placeholder to fill in.
    assert config.connectors[0].sasl_password.get_secret_value() == "REPLACE-ME"


def test_qpid_dispatch_default_config() -> None:
    # The shape of the qdrouterd.conf Qpid Dispatch installs: a listener and
    # message-routing addresses.
    text = """
router {
    mode: standalone
}

listener {
    host: 0.0.0.0
    port: amqp
    authenticatePeer: no
    saslMechanisms: ANONYMOUS
}

address {
    prefix: closest
    distribution: closest
}

address {
    prefix: multicast
    distribution: multicast
}
"""
    result = import_text(text, "qdrouterd.conf")
    config = parse_config_text(result.yaml, "out.yaml")
    assert [str(listener.bind) for listener in config.listeners] == ["0.0.0.0:5672"]
    assert config.connectors == [] and config.link_routes == []
    assert [n.line for n in result.notes] == [13, 18]


def test_admin_port_moves_off_a_listener_port() -> None:
    text = "listener {\n    host: 0.0.0.0\n    port: 9090\n}\n"
    config = parse_config_text(import_text(text).yaml, "out.yaml")
    assert str(config.admin.listen) == "127.0.0.1:9091"


def test_in_out_with_different_connectors_stay_separate() -> None:
    text = """
sslProfile {
    name: roots
}
connector {
    name: a
    role: route-container
    host: a.azure-devices.net
    port: 5671
    sslProfile: roots
}
connector {
    name: b
    role: route-container
    host: b.azure-devices.net
    port: 5671
    sslProfile: roots
}
linkRoute {
    prefix: devices/
    direction: in
    connection: a
}
linkRoute {
    prefix: devices/
    direction: out
    connection: b
}
"""
    result = import_text(text)
    config = parse_config_text(result.yaml, "out.yaml")
    assert [(r.direction, r.connector) for r in config.link_routes] == [("in", "a"), ("out", "b")]
    assert config.tls_profiles["roots"].ca_file is None  # system trust store


def test_plaintext_connector_kept_plaintext_and_said_so() -> None:
    text = "connector {\n  name: hub\n  role: route-container\n  host: h.example\n  port: 5672\n}\n"
    result = import_text(text)
    config = parse_config_text(result.yaml, "out.yaml")
    assert config.connectors[0].allow_plaintext is True
    assert "sends in plaintext" in result.yaml


def test_pass_prefixed_connector_password_is_used() -> None:
    text = (
        "connector {\n name: b\n role: route-container\n host: b.example\n"
        " saslMechanisms: PLAIN\n saslUsername: u\n saslPassword: pass:s3cret\n}\n"
    )
    config = parse_config_text(import_text(text).yaml, "out.yaml")
    assert config.connectors[0].sasl_password.get_secret_value() == "s3cret"


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("saslMechanisms", "saslMechanisms"),
        ("sasl-mechanisms", "saslMechanisms"),
        ("SASL-Mechanisms", "saslMechanisms"),
        ("verifyHostName", "verifyHostname"),
        ("dir", "direction"),
        ("addr", "host"),
        ("certDb", "caCertFile"),
        ("key-file", "privateKeyFile"),
        ("idle_timeout_seconds", "idleTimeoutSeconds"),
    ],
)
def test_attribute_name_variants(written: str, canonical: str) -> None:
    assert canonical_attr(written) == canonical


def test_comments_and_hash_in_patterns() -> None:
    text = """# leading comment
linkRoute {   # trailing comment on the opening line
    pattern: a/#/b   # the pattern keeps its '#'
    direction: in    # comment
    connection: 'x'
}  # closing comment
"""
    (entity,) = parse(text)
    assert entity.type == "linkRoute"
    assert entity.get("pattern") == "a/#/b"
    assert entity.get("direction") == "in"
    assert entity.get("connection") == "x"
    assert entity.attrs["pattern"].line == 3


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("listener {\n    port: 5672\n", 1, "entity 'listener' is never closed"),
        ("port: 5672\n", 1, "attribute 'port' outside an entity"),
        ("router {\n  mode: standalone\n}\n}\n", 4, "'}' without an open entity"),
        ("listener { port: 5672 }\n", 1, "put each 'key: value' on a line"),
        ("listener {\n  port 5672\n}\n", 2, "expected 'key: value' or '}'"),
        ("listener {\n  connector {\n  }\n}\n", 2, "inside entity 'listener'"),
        ("listener {\n  host:\n}\n", 2, "attribute 'host' has no value"),
        ('listener {\n  host: "0.0.0.0\n}\n', 2, "unterminated quoted value"),
        ("vhost {\n  groups: {\n    a: b\n", 2, "map 'groups' is never closed"),
        ('# comment\n[\n  ["listener", {"port": 5672}\n  ["router", {}]\n]\n', 4, "JSON"),
        ('[["listener", {"port": 5672}], "router"]\n', 1, "item 2 is not"),
    ],
)
def test_malformed_input_names_the_line(text: str, line: int, message: str) -> None:
    with pytest.raises(QdrouterdError) as info:
        parse(text, "bad.conf")
    assert info.value.line == line
    assert message in str(info.value)
    assert str(info.value).startswith(f"bad.conf:{line}: ")


def test_cli_malformed_input_exits_2_with_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "qdrouterd.conf"
    bad.write_text("router {\n    mode: standalone\n\nlistener {\n    port: 5672\n}\n")
    assert main(["import-qdrouterd", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:4: 'listener {{' inside entity 'router' opened at line 1" in err


def test_cli_stdout_and_no_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(DATA / "iothub-article.conf", tmp_path / "qdrouterd.conf")
    (tmp_path / "ca.pem").write_text("x\n")
    assert main(["import-qdrouterd", str(tmp_path / "qdrouterd.conf")]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["link_routes"][0]["prefix"] == "$cbs"
    assert "1 listener(s), 1 connector(s), 2 link route(s)" in captured.err
    out = tmp_path / "gateway.yaml"
    out.write_text("keep me\n")
    assert main(["import-qdrouterd", str(tmp_path / "qdrouterd.conf"), "-o", str(out)]) == 2
    assert out.read_text() == "keep me\n"
    assert "--force" in capsys.readouterr().err
    assert main(["import-qdrouterd", str(tmp_path / "qdrouterd.conf"), "-o", str(out),
                 "--force"]) == 0  # fmt: skip
    assert "link_routes:" in out.read_text()


def test_cli_warns_when_named_files_are_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gateway.yaml"
    assert main(["import-qdrouterd", str(DATA / "iothub-article.conf"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "does not pass `iot-gateway check` here yet" in err
    assert "ca_file: file not found" in err


def test_failover_urls_become_hosts() -> None:
    text = """
sslProfile {
    name: roots
}
connector {
    name: hub
    role: route-container
    host: myhub.azure-devices.net
    port: 5671
    sslProfile: roots
    failoverUrls: amqps://myhub-dr.azure-devices.net:5671, backup.example.net
}
"""
    config = parse_config_text(import_text(text).yaml, "out.yaml")
    (connector,) = config.connectors
    assert [(e.host, e.port) for e in connector.endpoints] == [
        ("myhub.azure-devices.net", 5671),
        ("myhub-dr.azure-devices.net", 5671),
        ("backup.example.net", 5671),
    ]


def test_byte_order_mark_crlf_and_tabs() -> None:
    text = "\ufeffrouter {\r\n\tmode: standalone\r\n\tid: R1\r\n}\r\nlistener {\r\n\tport: 5672\r\n}\r\n"
    config = parse_config_text(import_text(text).yaml, "out.yaml")
    assert config.gateway.id == "R1" and str(config.listeners[0].bind) == "0.0.0.0:5672"


def test_dispatch_06_inline_tls_and_connector_key(tmp_path: Path) -> None:
    out, text = imported(tmp_path, "dispatch-0.6-inline-tls.conf")
    config = load_config(out)
    (connector,) = config.connectors
    assert connector.tls_profile == "azure-iot-hub"  # the 0.6 sslProfileName
    assert config.tls_profiles["azure-iot-hub"].ca_file == tmp_path / "ca.pem"
    assert (connector.host, connector.port) == ("contoso-hub.azure-devices.net", 5671)
    assert [(r.prefix, r.direction) for r in config.link_routes] == [
        ("$cbs", "both"), ("devices/", "both")
    ]  # fmt: skip
    assert re.search(r"verifyHostName: no -- host name verification is always on", text)
