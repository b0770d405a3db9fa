"""`iot-gateway sas --from-config`, `credentials list` and `credentials hash-password`."""

from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path

import pytest

from gateway.auth.dps import derive_device_key
from gateway.auth.local_auth import verify_password
from gateway.auth.sas import parse_sas_token, verify_sas_token
from gateway.cli import main

from .conftest import ALL_KEYS, DEV1_KEY, ENV_KEY, FLEET_KEY, HUB

PASSWORD_HASH = "scrypt$16$1$1$c2FsdHNhbHQ=$BSPy+2bu3kN/SEwQ0zZ4fQ=="  # format only; never verified


@pytest.fixture
def config_path(tmp_path: Path, secrets_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DEV4_KEY", ENV_KEY)
    for name in ("dev3.pem", "dev3.key"):
        (tmp_path / name).write_text("x")
        (tmp_path / name).chmod(0o600)
    path = tmp_path / "gw.yaml"
    path.write_text(
        f"""\
tls_profiles:
  azure: {{}}
connectors:
  - {{name: hub, protocol: amqp, host: {HUB}, tls_profile: azure}}
  - {{name: hub-mqtt, protocol: mqtt, host: {HUB.upper()}, tls_profile: azure}}
credentials:
  secrets_file: secrets.yaml
  token_ttl: 2h
  devices:
    - {{id: dev1, key: dev1-key, trust: network}}
    - {{id: dev2, key: dev2-key, local_password_hash: "{PASSWORD_HASH}", allowed_addresses: ["192.168.1.0/24"]}}
    - {{id: dev3, cert_file: dev3.pem, key_file: dev3.key, allowed_addresses: ["192.168.1.7"]}}
    - {{id: dev4/mod1, key: env:DEV4_KEY, trust: network}}
  groups:
    - {{id_pattern: "sensor-*", group_key: fleet-key, trust: network}}
"""
    )
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_no_secret(text: str) -> None:
    for secret in (*ALL_KEYS, derive_device_key(FLEET_KEY, "sensor-1"), PASSWORD_HASH):
        assert secret not in text
    assert PASSWORD_HASH.split("$")[-1] not in text


# --- sas --from-config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "key", "audience"),
    [
        ("dev1", DEV1_KEY, f"{HUB}/devices/dev1"),
        ("dev4/mod1", ENV_KEY, f"{HUB}/devices/dev4/modules/mod1"),
        ("sensor-0042", derive_device_key(FLEET_KEY, "sensor-0042"), f"{HUB}/devices/sensor-0042"),
    ],
)
def test_sas_from_config_prints_a_token_that_verifies(
    capsys: pytest.CaptureFixture[str], config_path: Path, device: str, key: str, audience: str
) -> None:
    before = time.time()
    code, out, err = run(capsys, "sas", "--from-config", device, "-c", str(config_path))
    assert code == 0, err
    token = out.splitlines()[-1]
    assert verify_sas_token(token, key, time.time(), audience)
    expiry = parse_sas_token(token).se
    assert before + 7200 - 2 <= expiry <= time.time() + 7200  # the config's token_ttl
    assert f"# resource {audience}, expires " in err
    assert_no_secret(out.replace(token, "") + err)


def test_sas_from_config_options(capsys: pytest.CaptureFixture[str], config_path: Path) -> None:
    code, out, _ = run(
        capsys, "sas", "--from-config", "dev1", "-c", str(config_path),
        "--host", "otherhub.azure-devices.net", "--expiry", "1700000000",
    )  # fmt: skip
    assert code == 0
    token = out.splitlines()[-1]
    assert parse_sas_token(token).se == 1700000000
    assert verify_sas_token(token, DEV1_KEY, 1699999999, "otherhub.azure-devices.net/devices/dev1")
    code, out, _ = run(
        capsys, "sas", "--from-config", "dev1", "-c", str(config_path), "--ttl", "5m"
    )
    assert code == 0 and abs(parse_sas_token(out.splitlines()[-1]).se - (time.time() + 300)) < 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--from-config", "nobody"], "no credentials for 'nobody' in "),
        (["--from-config", "dev1", "--key", DEV1_KEY], "not --key"),
        (["--from-config", "dev1", "--device-id", "x"], "not --device-id"),
        (["--from-config", "dev3"], "dev3 authenticates with an X.509 certificate"),
        (["--from-config", "dev1", "--ttl", "0s"], "greater than 0"),
    ],
)
def test_sas_from_config_errors(
    capsys: pytest.CaptureFixture[str], config_path: Path, extra: list[str], message: str
) -> None:
    code, out, err = run(capsys, "sas", "-c", str(config_path), *extra)
    assert code == 2 and out == "" and message in err
    assert_no_secret(err)


def test_sas_from_config_needs_config_and_a_hub(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, secrets_path: Path
) -> None:
    code, _, err = run(capsys, "sas", "--from-config", "dev1")
    assert code == 2 and "--from-config needs -c/--config FILE" in err
    path = tmp_path / "nohub.yaml"
    path.write_text(
        "credentials:\n  secrets_file: secrets.yaml\n"
        "  devices:\n    - {id: dev1, key: dev1-key, trust: network}\n"
    )
    code, _, err = run(capsys, "sas", "--from-config", "dev1", "-c", str(path))
    assert code == 2 and "name the hub with --host (connector hosts in" in err
    code, out, _ = run(capsys, "sas", "--from-config", "dev1", "-c", str(path), "--host", HUB)
    assert code == 0 and verify_sas_token(out.splitlines()[-1], DEV1_KEY, time.time())
    secrets_path.chmod(0o644)
    code, out, err = run(capsys, "sas", "--from-config", "dev1", "-c", str(path), "--host", HUB)
    assert code == 2 and out == "" and f"{path}:2: credentials.secrets_file: " in err


def test_plain_sas_still_needs_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "sas", "--host", HUB, "--expiry", "1")
    assert code == 2 and "required: --device-id, --key" in err
    code, _, err = run(
        capsys, "sas", "--host", HUB, "--device-id", "d", "--key", DEV1_KEY, "-c", "x"
    )
    assert code == 2 and "only used with --from-config" in err


# --- credentials list / hash-password ----------------------------------------------------------


def test_credentials_list_never_prints_a_key(
    capsys: pytest.CaptureFixture[str], config_path: Path, tmp_path: Path
) -> None:
    code, out, err = run(capsys, "credentials", "list", "-c", str(config_path))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"credentials in {config_path} (5):"
    assert re.split(r"\s{2,}", lines[1].strip()) == [
        "ID", "KIND", "SOURCE", "LOCAL AUTH", "TOKEN EXPIRY",
    ]  # fmt: skip
    table = [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]
    on_demand = "issued on demand (ttl 2h, renew at 80%)"
    assert table == [
        ["dev1", "key", "secrets_file:dev1-key", "trust: network", on_demand],
        ["dev2", "key", "secrets_file:dev2-key", "password + from 192.168.1.0/24", on_demand],
        ["dev3", "x509", f"cert {tmp_path / 'dev3.pem'}", "from 192.168.1.7/32",
         "none (X.509 certificate)"],
        ["dev4/mod1", "key", "env:DEV4_KEY", "trust: network", on_demand],
        ["sensor-*", "group", "secrets_file:fleet-key", "trust: network", on_demand],
    ]  # fmt: skip
    assert err.count("warning: credentials ") == 3 and "trust: network" in err
    assert_no_secret(out + err)


def test_credentials_list_without_section_and_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    config_path: Path,
) -> None:  # fmt: skip
    path = tmp_path / "plain.yaml"
    path.write_text("gateway: {id: gw}\n")
    code, out, _ = run(capsys, "credentials", "list", "-c", str(path))
    assert code == 0 and "no credentials section" in out
    monkeypatch.delenv("DEV4_KEY")
    code, out, err = run(capsys, "credentials", "list", "-c", str(config_path))
    assert code == 2 and out == ""
    assert "credentials.devices[3].key: environment variable DEV4_KEY is not set" in err
    code, _, err = run(capsys, "credentials")
    assert code == 2 and "hash-password" in err


def test_hash_password_from_stdin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("correct horse\n"))
    code, out, err = run(capsys, "credentials", "hash-password")
    assert code == 0 and err == ""
    encoded = out.strip()
    assert encoded.startswith("scrypt$16384$8$1$") and "correct horse" not in out
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct horse\n", encoded)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, err = run(capsys, "credentials", "hash-password")
    assert code == 2 and out == "" and "empty password" in err


def test_hash_password_prompts_on_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import getpass

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Tty())
    answers = iter(["s3cret", "s3cret", "one", "two"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    code, out, _ = run(capsys, "credentials", "hash-password")
    assert code == 0 and verify_password("s3cret", out.strip())
    code, out, err = run(capsys, "credentials", "hash-password")
    assert code == 2 and out == "" and "the passwords differ" in err
