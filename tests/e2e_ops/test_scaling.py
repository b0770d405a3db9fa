"""Scaling out (docs/scaling.md): the shipped manifests and configs, and two gateways
behind the shipped HAProxy configuration, one of them stopped under a device.

HAProxy and keepalived check their own files (`haproxy -c`, `keepalived -t`);
the live test runs the real HAProxy with `deploy/haproxy/haproxy.cfg` (only
addresses and ports changed) in front of two gateway processes and hubsim,
and shows what the issue asks: the device's gateway drains on SIGTERM, the
health check on /readyz takes it out, the device reconnects through the same
address to the other gateway and its messages reach the hub.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import trio
import yaml

from tests.mqtt.paho_device import PahoDevice
from tests.mqtt.test_relay_hubsim import sas_token, username

from .helpers import MQTT_EVENTS, REPO_ROOT, WAIT, GatewayProcess, gateway_yaml, http_get

K8S = REPO_ROOT / "deploy" / "k8s"
HAPROXY_CFG = REPO_ROOT / "deploy" / "haproxy" / "haproxy.cfg"
KEEPALIVED_CONF = REPO_ROOT / "deploy" / "keepalived" / "keepalived.conf"
HAPROXY = shutil.which("haproxy")
KEEPALIVED = shutil.which("keepalived") or (
    "/usr/sbin/keepalived" if Path("/usr/sbin/keepalived").exists() else None
)


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# -- Kubernetes ---------------------------------------------------------------------------------


def test_hpa_scales_the_deployment_and_the_deployment_leaves_replicas_to_it() -> None:
    kustomization = docs(K8S / "kustomization.yaml")[0]
    assert "hpa.yaml" in kustomization["resources"]
    (hpa,) = docs(K8S / "hpa.yaml")
    (deployment,) = docs(K8S / "deployment.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["kind"] == "HorizontalPodAutoscaler"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > 2
    assert "replicas" not in deployment["spec"]
    (cpu,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert cpu["resource"]["name"] == "cpu" and container["resources"]["requests"]["cpu"]
    # Scale-down moves every device of a pod: one pod at a time.
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    # The drain fits in the grace period: drain_timeout + preStop delay.
    spec = deployment["spec"]["template"]["spec"]
    configmap = docs(K8S / "configmap.yaml")[0]
    drain = yaml.safe_load(configmap["data"]["gateway.yaml"])["gateway"]["drain_timeout"]
    assert int(drain.rstrip("s")) + 5 < spec["terminationGracePeriodSeconds"]


def test_statefulset_variant() -> None:
    objects = {d["kind"]: d for d in docs(K8S / "statefulset" / "statefulset.yaml")}
    sts, headless = objects["StatefulSet"], objects["Service"]
    (deployment,) = docs(K8S / "deployment.yaml")
    assert headless["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert sts["spec"]["selector"] == deployment["spec"]["selector"]
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]] == "/var/lib/iot-gateway"
    assert pod["volumes"] == deployment["spec"]["template"]["spec"]["volumes"]
    same = deployment["spec"]["template"]["spec"]["containers"][0]
    for key in ("args", "ports", "securityContext"):
        assert container[key] == same[key], key
    assert container["readinessProbe"]["httpGet"] == same["readinessProbe"]["httpGet"]
    # A variant: `kubectl apply -k deploy/k8s` does not create it.
    assert not any("statefulset" in r for r in docs(K8S / "kustomization.yaml")[0]["resources"])


# -- HAProxy and keepalived: their own checks ------------------------------------------------


@pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed")
def test_haproxy_config_checks() -> None:
    result = subprocess.run([HAPROXY, "-c", "-f", str(HAPROXY_CFG)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_config_shape() -> None:
    text = HAPROXY_CFG.read_text()
    assert re.search(r"^\s*mode tcp\b", text, re.M)
    assert text.count("option httpchk GET /readyz") == 2
    servers = re.findall(r"^\s*server \S+ \S+:(\d+) (.*)$", text, re.M)
    assert {port for port, _ in servers} == {"5672", "1883"}
    assert all("check port 9090" in rest for _, rest in servers)
    assert "shutdown-sessions" not in text  # a drain must not be cut short by HAProxy


@pytest.mark.skipif(KEEPALIVED is None, reason="keepalived not installed")
def test_keepalived_config_checks() -> None:
    assert KEEPALIVED is not None
    result = subprocess.run([KEEPALIVED, "-t", "-f", str(KEEPALIVED_CONF)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_keepalived_tracks_readiness() -> None:
    text = KEEPALIVED_CONF.read_text()
    assert "http://127.0.0.1:9090/readyz" in text
    assert re.search(r"track_script\s*\{\s*gateway_ready\s*\}", text)
    assert "nopreempt" in text and re.search(r"^\s*state BACKUP", text, re.M)


# -- two gateways behind the shipped HAProxy configuration -----------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def haproxy_config(tmp_path: Path, amqp: int, mqtt: int,
                   gateways: list[GatewayProcess]) -> Path:  # fmt: skip
    """deploy/haproxy/haproxy.cfg with loopback addresses and these gateways' ports."""
    text = HAPROXY_CFG.read_text()
    text = text.replace("bind :5672", f"bind 127.0.0.1:{amqp}")
    text = text.replace("bind :1883", f"bind 127.0.0.1:{mqtt}")
    # A test needs few connections (and a sandbox may not raise the fd limit).
    text = re.sub(r"maxconn \d+", "maxconn 500", text)
    sock = tmp_path / "haproxy.sock"
    text = text.replace("global\n", f"global\n    stats socket {sock} level admin\n", 1)
    for i, gw in enumerate(gateways, start=1):
        assert gw.admin_port is not None
        for listener, port in (("amqp", 5672), ("mqtt", 1883)):
            text = re.sub(
                rf"server gw{i} \S+:{port} check port 9090",
                f"server gw{i} 127.0.0.1:{gw.ports[listener]} check port {gw.admin_port}",
                text,
            )
    assert not re.search(r"^\s*server .*192\.168\.", text, re.M)
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    return path


def server_states(sock: Path) -> dict[tuple[str, str], str]:
    """(backend, server) -> UP / DOWN / ..., from HAProxy's stats socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    states = {}
    for line in data.decode().splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[1].startswith("gw"):
            states[(fields[0], fields[1])] = fields[17]
    return states


async def wait_states(sock: Path, wanted: dict[tuple[str, str], str]) -> None:
    states: dict[tuple[str, str], str] = {}
    with trio.move_on_after(WAIT + 10):
        while True:
            try:
                states = await trio.to_thread.run_sync(server_states, sock)
            except OSError:
                states = {}
            if all(states.get(k, "").startswith(v) for k, v in wanted.items()):
                return
            await trio.sleep(0.1)
    raise AssertionError(f"HAProxy servers {states}, waiting for {wanted}")


async def mqtt_devices(gw: GatewayProcess) -> set[str]:
    import json

    status, body = await trio.to_thread.run_sync(http_get, gw.admin_url + "/api/connections")
    assert status == 200
    return {
        d for c in json.loads(body)
        if c["kind"] == "device" and c["protocol"] == "mqtt" for d in c["device_ids"]
    }  # fmt: skip


@pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed")
async def test_device_moves_to_the_other_gateway_when_its_gateway_stops(hub, keys,
                                                                         tmp_path) -> None:  # fmt: skip
    gateways = []
    for name in ("a", "b"):
        path = tmp_path / f"gateway-{name}.yaml"
        path.write_text(gateway_yaml(hub, gateway=f"-{name}, drain_timeout: 5s"))
        gateways.append(GatewayProcess(path))
    proxy: subprocess.Popen[bytes] | None = None
    device: PahoDevice | None = None
    try:
        for gw in gateways:
            await gw.started()
        amqp_front, mqtt_front = free_port(), free_port()
        cfg = haproxy_config(tmp_path, amqp_front, mqtt_front, gateways)
        log = (tmp_path / "haproxy.log").open("wb")
        proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=log,
                                 stderr=subprocess.STDOUT)  # fmt: skip
        sock = tmp_path / "haproxy.sock"
        both_up = {(b, f"gw{i}"): "UP" for b in ("gateways_amqp", "gateways_mqtt")
                   for i in (1, 2)}  # fmt: skip
        await wait_states(sock, both_up)

        password = sas_token("dev2", keys["dev2"])
        device = PahoDevice("dev2", username=username("dev2"), password=password)
        assert await device.connect(mqtt_front) == 0
        await device.publish(MQTT_EVENTS.format("dev2"), b"before", qos=1)
        serving = [gw for gw in gateways if "dev2" in await mqtt_devices(gw)]
        assert len(serving) == 1
        first = serving[0]
        other = gateways[1 - gateways.index(first)]
        index = gateways.index(first) + 1

        # The device's gateway is stopped: it drains and exits; the device loses
        # its connection, and HAProxy's check on /readyz takes the gateway out.
        first.signal(signal.SIGTERM)
        assert await first.wait_exit(WAIT + 10) == 0
        assert await device.wait_disconnected(WAIT)
        await wait_states(sock, {("gateways_mqtt", f"gw{index}"): "DOWN",
                                 ("gateways_amqp", f"gw{index}"): "DOWN"})  # fmt: skip

        # It reconnects to the same address and lands on the other gateway.
        device.close()
        device = PahoDevice("dev2", username=username("dev2"), password=password)
        assert await device.connect(mqtt_front) == 0
        await device.publish(MQTT_EVENTS.format("dev2"), b"after", qos=1)
        assert "dev2" in await mqtt_devices(other)
        payloads = [r.body for r in hub.recorder.d2c if r.device_id == "dev2"]
        assert payloads == [b"before", b"after"]
        assert "draining" in first.output and "stopped" in first.output
    finally:
        if device is not None:
            await trio.to_thread.run_sync(device.close)
        if proxy is not None:
            proxy.terminate()
            await trio.to_thread.run_sync(lambda: proxy.wait(10))
        for gw in gateways:
            gw.close()
