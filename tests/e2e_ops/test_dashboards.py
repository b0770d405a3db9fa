"""The Grafana dashboard and the Prometheus alerts query what the gateway exports.

- `promtool check rules` on the alerts, `promtool test rules` on their unit
  tests, and every dashboard query checked for syntax by promtool too (as a
  recording rule, Grafana's variables filled in);
- every metric name any query uses is in a live gateway's /metrics after AMQP
  and MQTT traffic, a refused attach, an unreachable connector and a refused
  device connection, and every label a query selects on or groups by is on
  that metric's series.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import trio
import yaml
from proton.utils import LinkDetached

from tests.e2e_amqp.gw_helpers import Device, in_thread

from .helpers import (
    REPO_ROOT,
    WAIT,
    admin_url,
    gateway_yaml,
    http_get,
    metric,
    port_of,
    scrape,
    start_daemon,
    write_config,
)
from .test_metrics import amqp_run, mqtt_run, scrape_until

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "iot-gateway.json"
ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed "
                                    "(Debian package prometheus)")  # fmt: skip

# Grafana's variables, as Prometheus would see them after substitution.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$job": ".*", "$instance": ".*"}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    return exprs


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr.replace("$labels", ""), expr
    return expr


# -- a small PromQL reader: enough to find the metric names and labels a query uses ---------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan",
             # aggregations, which may be followed by `by (...)` rather than `(`
             "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk",
             "quantile", "count_values", "group"}  # fmt: skip
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched on) for every vector selector in `expr`."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\boffset\s+\w+", "", text)
    found: list[tuple[str, set[str]]] = []
    for match in _IDENT.finditer(text):
        name = match.group(0)
        before = text[: match.start()].rstrip()
        after = text[match.end() :].lstrip()
        if name.lower() in _KEYWORDS or after.startswith("("):
            continue  # a keyword or a function
        if re.search(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*$", before):
            continue  # a label name in a grouping clause
        if re.search(r"\{[^}]*$", before):
            continue  # a label name inside a matcher
        labels: set[str] = set()
        if after.startswith("{"):
            body = after[1 : after.index("}")]
            labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", body))
        found.append((name, labels))
    return found


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels.update(x.strip() for x in clause.split(",") if x.strip())
    return labels


def test_promql_reader() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, protocol) (rate(iotgw_relay_latency_seconds_bucket'
            '{job=~"$job", instance=~"a"}[5m]))) unless on (instance) up offset 5m')  # fmt: skip
    assert selectors(expr) == [("iotgw_relay_latency_seconds_bucket", {"job", "instance"}),
                               ("up", set())]  # fmt: skip
    assert grouping_labels(expr) == {"le", "protocol", "instance"}


# -- static checks ---------------------------------------------------------------------------


@needs_promtool
def test_promtool_check_rules() -> None:
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_alert_unit_tests() -> None:
    result = subprocess.run([PROMTOOL, "test", "rules", ALERT_TESTS.name], capture_output=True,
                            text=True, timeout=120, cwd=ALERT_TESTS.parent)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    # promtool parses a rule file's expressions: make each query a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": substitute(expr)}
        for i, expr in enumerate(dashboard_exprs())
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_importable_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "iot-gateway" and dash["title"] == "iot-gateway"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for wanted in ("devices", "hub connections", "messages/s by direction", "p50 / p99",
                   "refusals", "token expiry", "reconnects"):  # fmt: skip
        assert wanted in titles, wanted
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "job", "instance"}
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            assert 'job=~"$job", instance=~"$instance"' in target["expr"], target["expr"]


# -- against a live gateway ------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exported_names(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Names a scrape declares (with their sample suffixes) and each sample name's labels."""
    declared: set[str] = set()
    labels: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                "_created"), "info": ("_info",), "summary": ("_sum", "_count", "_created")}  # fmt: skip
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            base = name.removesuffix("_total") if kind == "counter" else name
            declared.add(name)
            declared.update(base + s for s in suffixes.get(kind, ()))
        elif line and not line.startswith("#"):
            name = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0)  # type: ignore[union-attr]
            names = set(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="', line[len(name):].split("} ")[0]))
            labels.setdefault(name, set()).update(names)
    return declared, labels


async def wait_for_series(url: str, name: str, **labels: str) -> None:
    """Scrape until `name{labels}` has counted something (bounded)."""
    with trio.fail_after(WAIT):
        while not metric(await scrape(url), name, **labels):
            await trio.sleep(0.05)


async def test_every_query_uses_metrics_a_live_gateway_exports(nursery, hub, keys,
                                                                tmp_path) -> None:  # fmt: skip
    dead = closed_port()
    text = gateway_yaml(
        hub,
        routes=('  - {prefix: "$cbs", connector: iothub}\n'
                '  - {prefix: "devices/", connector: iothub}\n'
                '  - {prefix: "dead/", connector: dead}\n'),
        connector=(f"  - {{name: dead, protocol: amqp, host: 127.0.0.1, port: {dead}, "
                   "allow_plaintext: true, on_demand: false, reconnect: {initial: 0.2s, max: 0.5s}}\n"),
    )  # fmt: skip
    data = yaml.safe_load(text)
    # A listener that admits nobody from loopback: a refused device connection.
    data["listeners"].append({"name": "lan", "protocol": "amqp", "bind": "127.0.0.1:0",
                              "allowed_networks": ["10.0.0.0/8"]})  # fmt: skip
    # The store's series (backlog per connector, refusals, errors) exist from the start.
    data["store_and_forward"] = {"path": str(tmp_path / "store.db")}
    config = write_config(tmp_path / "gateway.yaml", yaml.safe_dump(data))
    daemon = await start_daemon(nursery, config)
    url = admin_url(daemon)

    await in_thread(amqp_run, port_of(daemon, "amqp"), hub, keys["dev1"])
    await mqtt_run(port_of(daemon, "mqtt"), hub, keys["dev2"])

    def unreachable_and_refused() -> None:
        dev = Device(f"amqp://127.0.0.1:{port_of(daemon, 'amqp')}")
        try:
            with pytest.raises(LinkDetached):
                dev.conn.create_sender("dead/queue")
        finally:
            dev.close()
        with socket.create_connection(("127.0.0.1", port_of(daemon, "lan")), timeout=10) as s:
            s.settimeout(10)
            assert s.recv(1) == b""  # closed at once
        # A malformed MQTT CONNECT (no protocol name): a device-side protocol error.
        with socket.create_connection(("127.0.0.1", port_of(daemon, "mqtt")), timeout=10) as s:
            s.settimeout(10)
            s.sendall(b"\x10\x02\x00\x00")
            while s.recv(4096):
                pass

    await in_thread(unreachable_and_refused)
    await scrape_until(url, "iotgw_device_connections_refused_total", 1, listener="lan")
    await scrape_until(url, "iotgw_mqtt_sessions_closed_total", 1, reason="device_disconnect")
    # A reload of a broken file is rejected (and counted).
    (tmp_path / "gateway.yaml").write_text("listeners: [\n")
    assert await daemon.reload() is False
    # The unreachable connector (on_demand: false) keeps retrying (backoff 0.2 s): wait
    # for a reconnect.
    await wait_for_series(url, "iotgw_reconnects_total", connector="dead")
    await wait_for_series(url, "iotgw_protocol_errors_total", protocol="mqtt", side="device")
    status, body = await trio.to_thread.run_sync(http_get, url + "/metrics")
    assert status == 200
    declared, labels = exported_names(body)

    checked: set[str] = set()
    added_by_prometheus = {"instance", "job"}
    for expr in dashboard_exprs() + alert_exprs():
        found = selectors(substitute(expr))
        for name, matched in found:
            assert name in declared, f"{name} (in {expr!r}) is not exported"
            # Series exist for it, carrying the labels the query matches on.
            assert name in labels, f"no {name} series after the traffic (in {expr!r})"
            missing = matched - added_by_prometheus - labels[name]
            assert not missing, f"{name} has no label {missing} (in {expr!r})"
            checked.add(name)
        # Every label the query groups by is on one of the series it reads.
        on_series = set().union(*(labels[name] for name, _ in found))
        missing = grouping_labels(expr) - added_by_prometheus - on_series
        assert not missing, f"grouping by {missing}, which no series has (in {expr!r})"
    # The panels the issue asks for are all backed by real series.
    for name in ("iotgw_device_connections_open", "iotgw_upstream_connections",
                 "iotgw_messages_total", "iotgw_relay_latency_seconds_bucket",
                 "iotgw_attach_refusals_total", "iotgw_device_connections_refused_total",
                 "iotgw_token_expiry_seconds", "iotgw_reconnects_total",
                 "iotgw_tls_handshake_failures_total", "iotgw_draining"):  # fmt: skip
        assert name in checked, name


def test_draining_gauge() -> None:
    from gateway.ops.metrics import Metrics

    m = Metrics(process_metrics=False)
    assert m.registry.get_sample_value("iotgw_draining") == 0
    m.set_draining(True)
    assert m.registry.get_sample_value("iotgw_draining") == 1
