"""The command line as an operator uses it: check, run on a bad config, sas, version."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.waiting import FAILSAFE

from .gateway_proc import REPO_ROOT, gateway_command, run_cli

pytestmark = pytest.mark.timeout(600)

EXAMPLES = sorted((REPO_ROOT / "config").glob("*.yaml"))
ERROR_LINE = re.compile(
    r"^(?P<file>[^:\s]+\.yaml):(?P<line>\d+): (?P<key>[^:\s]+): (?P<message>.+)$"
)

GOOD = """\
gateway:
  id: acceptance
tls_profiles:
  hub:
    ca_file: ca.pem
listeners:
  - {name: amqp, protocol: amqp, bind: "127.0.0.1:0"}
connectors:
  - name: iothub
    protocol: amqp
    host: myhub.azure-devices.net
    port: 5671
    tls_profile: hub
    idle_timeout: 120s
link_routes:
  - {prefix: "$cbs", connector: iothub, direction: both}
  - {prefix: "devices/", connector: iothub, direction: both}
"""


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"iothub-amqp.yaml", "iothub-mqtt.yaml", "iothub-both.yaml"} <= names


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda p: p.name)
def test_check_accepts_each_example(config: Path) -> None:
    result = run_cli("check", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_prints_both_amqp_routes() -> None:
    result = run_cli("check", "-c", "config/iothub-amqp.yaml")
    assert result.returncode == 0, result.stderr
    route_lines = [
        line for line in result.stdout.splitlines() if "iothub" in line and "both" in line
    ]
    assert any("$cbs" in line for line in route_lines), result.stdout
    assert any("devices/" in line for line in route_lines), result.stdout


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "ca.pem").write_text("placeholder, only its existence is checked\n")
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_good_config_passes(tmp_path: Path) -> None:
    _write(tmp_path, GOOD)
    result = run_cli("check", "-c", "gateway.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


BAD_CASES = {
    # name: (replace old, with new, expected line, expected key)
    "unknown-connector": (
        '  - {prefix: "devices/", connector: iothub, direction: both}',
        '  - {prefix: "devices/", connector: iothub2, direction: both}',
        17,
        "link_routes[1].connector",
    ),
    "bad-duration": (
        "    idle_timeout: 120s",
        "    idle_timeout: 2 fortnights",
        14,
        "connectors[0].idle_timeout",
    ),
    "missing-ca": (
        "    ca_file: ca.pem",
        "    ca_file: no-such-ca.pem",
        5,
        "tls_profiles.hub.ca_file",
    ),
    "yaml-syntax": ("    port: 5671", "    port: 5671\n   bad_indent: [", None, None),
}


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_config_exits_2_with_one_located_line(tmp_path: Path, case: str, command: str) -> None:
    old, new, line, key = BAD_CASES[case]
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new))
    started = time.monotonic()
    result = run_cli(command, "-c", "gateway.yaml", cwd=tmp_path, timeout=FAILSAFE)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert time.monotonic() - started < 10
    lines = [x for x in (result.stderr + result.stdout).splitlines() if x.strip()]
    assert len(lines) == 1, lines
    match = ERROR_LINE.match(lines[0])
    assert match, f"not 'file:line: key: message': {lines[0]!r}"
    assert match["file"] == "gateway.yaml"
    if line is not None:
        assert int(match["line"]) == line, lines[0]
        assert match["key"] == key, lines[0]
    else:
        assert 9 <= int(match["line"]) <= 13, lines[0]
    assert path.exists()


def test_plaintext_connector_needs_allow_plaintext(tmp_path: Path) -> None:
    _write(tmp_path, GOOD.replace("    tls_profile: hub\n", ""))
    result = run_cli("check", "-c", "gateway.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "connectors[0]" in result.stderr
    _write(tmp_path, GOOD.replace("    tls_profile: hub\n", "    allow_plaintext: true\n"))
    assert run_cli("check", "-c", "gateway.yaml", cwd=tmp_path).returncode == 0


def test_sas_vector_from_issue_2() -> None:
    result = run_cli(
        "sas",
        "--host",
        "myhub.azure-devices.net",
        "--device-id",
        "dev1",
        "--key",
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        "--expiry",
        "1700000000",
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("SharedAccessSignature ")
    fields = dict(part.split("=", 1) for part in token[len("SharedAccessSignature ") :].split("&"))
    assert urllib.parse.unquote(fields["sig"]) == "wosmA3uJK9T0mdB5CIYn+sAVA2ODflnucuvNO5S6mbM="
    assert "+" not in fields["sig"] and "/" not in fields["sig"] and "=" not in fields["sig"]
    assert urllib.parse.unquote(fields["sr"]) == "myhub.azure-devices.net/devices/dev1"
    assert fields["sr"] != "myhub.azure-devices.net/devices/dev1", "sr must be URL-encoded"
    assert fields["se"] == "1700000000"
    assert "skn" not in fields


def test_sas_token_alone_on_the_last_line_of_combined_output() -> None:
    """Scripts do `iot-gateway sas ... 2>&1 | tail -1`."""
    result = subprocess.run(
        gateway_command(
            "sas",
            "--host",
            "myhub.azure-devices.net",
            "--device-id",
            "dev1",
            "--key",
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            "--expiry",
            "1700000000",
        ),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=FAILSAFE,
    )
    assert result.returncode == 0
    assert result.stdout.strip().splitlines()[-1].startswith("SharedAccessSignature sr="), (
        result.stdout
    )


def test_version() -> None:
    result = run_cli("version")
    assert result.returncode == 0
    assert re.search(r"\d+\.\d+\.\d+", result.stdout)
