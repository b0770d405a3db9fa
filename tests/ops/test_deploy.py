"""Deployment artefacts: the systemd unit verifies, the Dockerfile and manifests say what they must."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import yaml

from tests.waiting import FAILSAFE

from .conftest import AdminFixture

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "iot-gateway.service"
EXEC_PATH = "/opt/iot-gateway/venv/bin/iot-gateway"


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    # Point ExecStart at a file that exists here so verify checks the unit's
    # syntax and settings, not whether the gateway is installed on this machine.
    fake = tmp_path / "iot-gateway"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = UNIT.read_text().replace(EXEC_PATH, str(fake))
    unit = tmp_path / "iot-gateway.service"
    unit.write_text(text)
    env = {**os.environ, "SYSTEMD_LOG_LEVEL": "notice"}
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    # Anything said about our unit is a problem (unknown keys, bad values, ...).
    assert "iot-gateway.service" not in output, output


def test_systemd_unit_settings() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30s"]
    assert s["ExecStart"] == [f"{EXEC_PATH} run -c /etc/iot-gateway/gateway.yaml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["User"] == ["iot-gateway"]
    assert s["Restart"] == ["on-failure"]
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
    }.items():
        assert s[key] == [value], key
    assert "@system-service" in s["SystemCallFilter"]
    # Binding below 1024 is an opt-in, explained but not enabled.
    assert "CAP_NET_BIND_SERVICE" in UNIT.read_text()
    assert all("CAP_NET_BIND_SERVICE" not in v for v in s["AmbientCapabilities"])


def test_install_script_dry_run() -> None:
    script = ROOT / "systemd" / "install.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["sh", "-n", str(script)], check=True, timeout=30)
    result = subprocess.run(
        ["sh", str(script), "--dry-run"], capture_output=True, text=True, timeout=60, check=True
    )
    out = result.stdout
    assert "-m venv /opt/iot-gateway/venv" in out or "exists" in out
    assert f"--require-hashes -r {ROOT}/requirements/runtime.lock" in out
    assert f"--no-deps --no-build-isolation --force-reinstall {ROOT}" in out
    assert "/etc/systemd/system/iot-gateway.service" in out
    assert "systemctl enable iot-gateway.service" in out
    assert "/etc/iot-gateway" in out
    if "user iot-gateway exists" not in out:
        assert "useradd --system" in out


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_key_lines() -> None:
    instr = dockerfile_instructions()
    froms = [rest for word, rest in instr if word == "FROM"]
    assert len(froms) >= 2 and froms[0].endswith("AS builder")  # multi-stage
    runtime_start = max(i for i, (w, _) in enumerate(instr) if w == "FROM")
    runtime = instr[runtime_start:]
    runtime_words = dict(runtime)
    assert any(w == "COPY" and rest.startswith("--from=builder") for w, rest in runtime)
    user = runtime_words["USER"]
    assert user.split(":")[0] not in ("root", "0")
    health = runtime_words["HEALTHCHECK"]
    assert "/healthz" in health or "IOTGW_HEALTH_URL" in health
    assert "urllib.request" in health and "curl" not in health
    assert "/healthz" in runtime_words["ENV"]
    exposed = {p for w, rest in runtime if w == "EXPOSE" for p in rest.split()}
    assert {"5672", "1883", "9090"} <= exposed
    assert any(
        w == "COPY" and rest.endswith("/etc/iot-gateway/gateway.yaml") for w, rest in runtime
    )
    assert "run" in runtime_words["CMD"] and "/etc/iot-gateway/gateway.yaml" in runtime_words["CMD"]
    assert runtime_words["STOPSIGNAL"] == "SIGTERM"
    # The baked-in config listens for the admin endpoint on all interfaces.
    baked = yaml.safe_load((ROOT / "deploy" / "gateway.yaml").read_text())
    assert baked["admin"]["listen"] == "0.0.0.0:9090"


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    for entry in (".git", ".venv", "tests"):
        assert entry in patterns

    def excluded(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(p, pat.removeprefix("**/")) for p in prefixes for pat in patterns
        )

    # What the build copies must not be excluded.
    for needed in (
        "gateway/__init__.py",
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "requirements/runtime.lock",
        "deploy/gateway.yaml",
    ):
        assert not excluded(needed), needed
    assert excluded("tests/ops/test_deploy.py") and excluded("gateway/__pycache__/x.pyc")


async def test_healthcheck_command_against_the_admin_endpoint(admin: AdminFixture) -> None:
    health = dict(dockerfile_instructions()[::-1])["HEALTHCHECK"]
    argv = json.loads(health[health.index("CMD") + 3 :].strip())
    assert argv[:2] == ["python", "-c"]
    command = [sys.executable, "-c", argv[2]]
    with trio.fail_after(FAILSAFE):
        ok = await trio.run_process(
            command, env={**os.environ, "IOTGW_HEALTH_URL": admin.url + "/healthz"}, check=False
        )
        down = await trio.run_process(
            command,
            env={**os.environ, "IOTGW_HEALTH_URL": "http://127.0.0.1:1/healthz"},
            check=False,
            capture_stderr=True,
        )
    assert ok.returncode == 0
    assert down.returncode != 0  # nothing listening: unhealthy


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_deploy_yaml_parses() -> None:
    files = sorted((ROOT / "deploy").rglob("*.yml")) + sorted((ROOT / "deploy").rglob("*.yaml"))
    assert len(files) >= 7
    for path in files:
        assert load_all(path), path


def test_compose_and_prometheus() -> None:
    compose = load_all(ROOT / "deploy" / "docker-compose.yml")[0]
    gateway = compose["services"]["gateway"]
    assert any(p.endswith("5672:5672") for p in gateway["ports"])
    assert any(v.endswith(":/etc/iot-gateway/gateway.yaml:ro") for v in gateway["volumes"])
    prom = compose["services"]["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    scrape = load_all(ROOT / "deploy" / "prometheus.yml")[0]["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["gateway:9090"]
    assert scrape["metrics_path"] == "/metrics"


def k8s_objects() -> dict[str, dict]:
    objects = {}
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in load_all(path):
            if "kind" in doc and doc["kind"] != "Kustomization":
                objects[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return objects


def test_k8s_manifests() -> None:
    objs = k8s_objects()
    deployment = objs["Deployment/iot-gateway"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert {p["containerPort"] for p in container["ports"]} == {5672, 1883, 9090}
    service = objs["Service/iot-gateway"]
    assert {(p["port"], p["protocol"]) for p in service["spec"]["ports"]} == {
        (5672, "TCP"),
        (1883, "TCP"),
    }
    pdb = objs["PodDisruptionBudget/iot-gateway"]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    configmap = objs["ConfigMap/iot-gateway-config"]
    sources = deployment["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"]
    assert sources[0]["configMap"]["name"] == "iot-gateway-config"
    config = yaml.safe_load(configmap["data"]["gateway.yaml"])
    assert config["admin"]["listen"] == "0.0.0.0:9090"
    # /api/* on the pod IP needs the bearer token, mounted next to the configuration
    # from a Secret, readable by the gateway's group only.
    assert config["admin"]["token_file"] == "admin-token"
    assert sources[1]["secret"]["items"] == [{"key": "admin-token", "path": "admin-token"}]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert deployment["spec"]["template"]["spec"]["volumes"][0]["projected"]["defaultMode"] == 0o440
    kustomization = load_all(ROOT / "deploy" / "k8s" / "kustomization.yaml")[0]
    for resource in kustomization["resources"]:
        assert (ROOT / "deploy" / "k8s" / resource).is_file()


def test_shipped_configs_validate(tmp_path: Path) -> None:
    config = pytest.importorskip("gateway.config")
    # Where they are used, the admin token is mounted next to them.
    token = tmp_path / "admin-token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    token.chmod(0o600)
    shutil.copy(ROOT / "deploy" / "gateway.yaml", tmp_path / "gateway.yaml")
    config.load_config(tmp_path / "gateway.yaml")
    text = k8s_objects()["ConfigMap/iot-gateway-config"]["data"]["gateway.yaml"]
    parsed = config.parse_config_text(text, "deploy/k8s/configmap.yaml", base_dir=tmp_path)
    assert str(parsed.admin.listen) == "0.0.0.0:9090"
    assert parsed.admin.token is not None
