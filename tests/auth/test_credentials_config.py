"""The credentials: section: key sources, file modes, local auth rules, file:line errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.auth.local_auth import hash_password
from gateway.config import ConfigError, load_config

from .conftest import ALL_KEYS, DEV1_KEY, DEV2_KEY, ENV_KEY, FLEET_KEY, ConfigParser, write_secrets

Errors = Callable[..., list[str]]
PASSWORD_HASH = hash_password("local-secret", n=2**4, r=1, p=1, salt=b"saltsalt")


def assert_no_secret(lines: list[str]) -> None:
    text = "\n".join(lines)
    for key in ALL_KEYS:
        assert key not in text
        assert key.rstrip("=") not in text
    assert PASSWORD_HASH not in text


def single(errors: Errors, text: str, **kwargs: object) -> str:
    lines = errors(text, **kwargs)
    assert len(lines) == 1, lines
    assert_no_secret(lines)
    return lines[0]


# --- a valid section -----------------------------------------------------------------------


def test_full_example_is_valid(parse: ConfigParser, secrets_path: Path, tmp_path: Path) -> None:
    cert = tmp_path / "dev3.pem"
    key = tmp_path / "dev3.key"
    cert.write_text("cert")
    key.write_text("key")
    key.chmod(0o600)
    config = parse(
        f"""
        credentials:
          secrets_file: secrets.yaml
          devices:
            - {{id: dev1, key: dev1-key, trust: network}}
            - {{id: dev2, key: dev2-key, local_password_hash: "{PASSWORD_HASH}", allowed_addresses: ["192.168.1.0/24", "fd00::/8"]}}
            - {{id: dev3, cert_file: dev3.pem, key_file: dev3.key, allowed_addresses: ["192.168.1.7"]}}
            - {{id: dev4/mod1, key: env:DEV4_KEY, trust: network}}
          groups:
            - {{id_pattern: "sensor-*", group_key: fleet-key, trust: network}}
          token_ttl: 30m
          renew_at: 0.5
        """,
        env={"DEV4_KEY": ENV_KEY},
    )
    creds = config.credentials
    assert creds is not None
    assert creds.secrets_file == secrets_path
    assert creds.token_ttl == 1800 and creds.renew_at == 0.5
    dev1, dev2, dev3, dev4 = creds.devices
    assert dev1.key_ref is not None and dev1.key_ref.describe() == "secrets_file:dev1-key"
    assert dev1.key_ref.value is not None and dev1.key_ref.value.get_secret_value() == DEV1_KEY
    assert dev2.password_hash is not None and dev2.password_hash.n == 16
    assert [str(n) for n in dev2.allowed_addresses] == ["192.168.1.0/24", "fd00::/8"]
    assert (dev3.cert_file, dev3.key_file, dev3.key_ref) == (cert, key, None)
    assert (dev4.device_id, dev4.module_id) == ("dev4", "mod1")
    assert dev4.key_ref is not None and dev4.key_ref.describe() == "env:DEV4_KEY"
    assert dev4.key_ref.value is None  # read from the environment when the store is built
    assert creds.groups[0].key_ref is not None
    assert creds.groups[0].key_ref.describe() == "secrets_file:fleet-key"
    # Secrets stay out of reprs and dumps.
    text = repr(config) + str(config.model_dump()) + config.model_dump_json()
    for secret in (DEV1_KEY, DEV2_KEY, FLEET_KEY, ENV_KEY, PASSWORD_HASH, "dev1-key"):
        assert secret not in text


def test_defaults_and_absent_section(parse: ConfigParser) -> None:
    assert parse("gateway: {id: gw}\n").credentials is None
    creds = parse("credentials: {}\n").credentials
    assert creds is not None
    assert (creds.token_ttl, creds.renew_at, creds.allow_inline_secrets) == (3600, 0.8, False)
    assert (creds.devices, creds.groups, creds.secrets_file) == ([], [], None)


def test_inline_key_allowed_only_when_enabled(parse: ConfigParser, errors: Errors) -> None:
    text = f"""
        credentials:
          devices:
            - {{id: dev1, key: "{DEV1_KEY}", trust: network}}
        """
    line = single(errors, text)
    assert line.startswith("gw.yaml:3: credentials.devices[0].key: inline keys are refused")
    assert "allow_inline_secrets" in line
    config = parse(text.replace("  devices:", "  allow_inline_secrets: true\n          devices:"))
    ref = config.credentials.devices[0].key_ref  # type: ignore[union-attr]
    assert ref is not None and ref.source == "inline" and ref.name is None
    assert ref.value is not None and ref.value.get_secret_value() == DEV1_KEY
    assert DEV1_KEY not in repr(ref)


def test_env_keys(parse: ConfigParser, errors: Errors) -> None:
    text = """
        credentials:
          devices:
            - {id: dev4/mod1, key: env:DEV4_KEY, trust: network}
        """
    assert parse(text, env={"DEV4_KEY": ENV_KEY}).credentials is not None
    assert single(errors, text, env={}) == (
        "gw.yaml:3: credentials.devices[0].key: environment variable DEV4_KEY is not set"
    )
    assert single(errors, text, env={"DEV4_KEY": "not base64!"}) == (
        "gw.yaml:3: credentials.devices[0].key: environment variable DEV4_KEY: not valid base64"
    )
    bad_name = text.replace("env:DEV4_KEY", "env:4-x")
    assert "invalid environment variable name '4-x'" in single(errors, bad_name)


def test_env_defaults_to_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "credentials:\n  devices:\n    - {id: d, key: env:IOTGW_TEST_KEY, trust: network}\n"
    )
    monkeypatch.delenv("IOTGW_TEST_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [
        f"{path}:3: credentials.devices[0].key: environment variable IOTGW_TEST_KEY is not set"
    ]
    monkeypatch.setenv("IOTGW_TEST_KEY", ENV_KEY)
    assert load_config(path).credentials is not None
    assert load_config(path, env={"IOTGW_TEST_KEY": DEV1_KEY}).credentials is not None


# --- the secrets file --------------------------------------------------------------------------

SECRETS_CONFIG = """
    credentials:
      secrets_file: secrets.yaml
      devices:
        - {id: dev1, key: dev1-key, trust: network}
    """


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_secrets_file_owner_only_is_accepted(
    parse: ConfigParser, secrets_path: Path, mode: int
) -> None:
    secrets_path.chmod(mode)
    assert parse(SECRETS_CONFIG).credentials is not None


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660, 0o666])
def test_secrets_file_readable_by_others_is_refused(
    errors: Errors, secrets_path: Path, mode: int
) -> None:
    secrets_path.chmod(mode)
    line = single(errors, SECRETS_CONFIG)
    assert line == (
        f"gw.yaml:2: credentials.secrets_file: secrets file {secrets_path} is accessible by "
        f"group or others (mode {mode:04o}); refusing to use it: chmod 600 {secrets_path}"
    )


def test_secrets_file_missing_or_not_a_file(errors: Errors, tmp_path: Path) -> None:
    assert single(errors, SECRETS_CONFIG) == (
        f"gw.yaml:2: credentials.secrets_file: secrets file not found: {tmp_path / 'secrets.yaml'}"
    )
    (tmp_path / "secrets.yaml").mkdir()
    (tmp_path / "secrets.yaml").chmod(0o700)
    assert "is not a regular file" in single(errors, SECRETS_CONFIG)


def test_secrets_file_absolute_path(parse: ConfigParser, secrets_path: Path) -> None:
    config = parse(SECRETS_CONFIG.replace("secrets.yaml", str(secrets_path)))
    assert config.credentials is not None and config.credentials.secrets_file == secrets_path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- a\n- b\n", "secrets.yaml:1: expected a mapping name: base64-key"),
        ("dev1-key: [1, 2]\n", "secrets.yaml:1: secret 'dev1-key' must be a base64 string"),
        ("other: x\ndev1-key: {a: 1\n", "secrets.yaml:3: not valid YAML"),
        ("dev1-key: %Zm9v\n", "secrets.yaml:1: not valid YAML"),
    ],
)
def test_secrets_file_content_errors(
    errors: Errors, tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "secrets.yaml"
    path.write_text(content)
    path.chmod(0o600)
    line = single(errors, SECRETS_CONFIG)
    assert line.startswith(f"gw.yaml:2: credentials.secrets_file: {tmp_path}/"), line
    assert message in line


def test_secret_names_and_values(errors: Errors, tmp_path: Path) -> None:
    write_secrets(tmp_path / "secrets.yaml", {"dev1-key": "not*base64*at*all", "spare": DEV2_KEY})
    line = single(errors, SECRETS_CONFIG)
    assert line == (
        "gw.yaml:4: credentials.devices[0].key: secret 'dev1-key' in "
        f"{tmp_path / 'secrets.yaml'}: not valid base64"
    )
    assert "not*base64" not in line
    unknown = SECRETS_CONFIG.replace("key: dev1-key", "key: dev9-key")
    assert single(errors, unknown) == (
        "gw.yaml:4: credentials.devices[0].key: no secret of that name in "
        f"{tmp_path / 'secrets.yaml'} (names there: 'dev1-key', 'spare')"
    )


def test_key_name_without_secrets_file(errors: Errors) -> None:
    line = single(
        errors,
        """
        credentials:
          devices:
            - {id: dev1, key: dev1-key, trust: network}
        """,
    )
    assert line.startswith("gw.yaml:3: credentials.devices[0].key: no secrets_file to look")


def test_a_mistyped_key_is_never_echoed(errors: Errors, secrets_path: Path) -> None:
    # Unpadded base64: not a valid inline key, not a name; the value must not be echoed.
    mistyped = DEV2_KEY.rstrip("=")
    assert len(mistyped) % 4
    line = single(errors, SECRETS_CONFIG.replace("key: dev1-key", f"key: {mistyped}"))
    assert "no secret of that name" in line and mistyped not in line
    assert DEV2_KEY.rstrip("=") not in line


# --- entries -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "key_path", "message"),
    [
        (
            "{id: d, trust: network}",
            "devices[0]",
            "needs key (symmetric key) or cert_file + key_file (X.509)",
        ),
        (
            "{id: d, key: dev1-key, cert_file: c.pem, key_file: c.key, trust: network}",
            "devices[0].cert_file",
            "give either key (symmetric key) or cert_file + key_file (X.509), not both",
        ),
        ("{id: d, cert_file: c.pem, trust: network}", "devices[0].cert_file", "needs key_file"),
        ("{id: d, key_file: c.key, trust: network}", "devices[0].key_file", "needs cert_file"),
        (
            "{id: d, key: dev1-key}",
            "devices[0]",
            "needs local authentication: local_password_hash, allowed_addresses, or trust: network",
        ),
        (
            "{id: d, key: dev1-key, allowed_addresses: []}",
            "devices[0]",
            "needs local authentication",
        ),
        (
            "{id: d, key: dev1-key, trust: network, allowed_addresses: [10.0.0.1]}",
            "devices[0].trust",
            "trust: network cannot be combined",
        ),
        ("{id: d, key: dev1-key, trust: everyone}", "devices[0].trust", "must be 'network'"),
        (
            "{id: d, key: dev1-key, local_password_hash: plain}",
            "devices[0].local_password_hash",
            "password hash must look like scrypt$N$r$p$salt$hash",
        ),
        (
            "{id: d, key: dev1-key, local_password_hash: 'scrypt$3$8$1$c2FsdHNhbHQ=$aGFzaGhhc2hoYXNoaGFzaA=='}",
            "devices[0].local_password_hash",
            "N must be a power of 2",
        ),
        (
            "{id: d, key: dev1-key, allowed_addresses: [192.168.1.0/33]}",
            "devices[0].allowed_addresses[0]",
            "invalid network '192.168.1.0/33'",
        ),
        ("{id: 'a b', key: dev1-key, trust: network}", "devices[0].id", "invalid device id 'a b'"),
        ("{id: a/b/c, key: dev1-key, trust: network}", "devices[0].id", "invalid device id"),
        ("{id: d, key: dev1-key, trust: network, kye: x}", "devices[0].kye", "unknown key"),
    ],
)
def test_device_entry_errors(
    errors: Errors,
    secrets_path: Path,
    tmp_path: Path,
    entry: str,
    key_path: str,
    message: str,
) -> None:
    for name in ("c.pem", "c.key"):
        (tmp_path / name).write_text("x")
        (tmp_path / name).chmod(0o600)
    line = single(
        errors,
        f"""
        credentials:
          secrets_file: secrets.yaml
          devices:
            - {{id: ok, key: dev2-key, trust: network}}
            - {entry}
        """,
    )
    key_path = key_path.replace("devices[0]", "devices[1]")
    assert line.startswith(f"gw.yaml:5: credentials.{key_path}: "), line
    assert message in line


def test_duplicates_and_group_errors(errors: Errors, secrets_path: Path) -> None:
    lines = errors(
        """
        credentials:
          secrets_file: secrets.yaml
          devices:
            - {id: dev1, key: dev1-key, trust: network}
            - {id: dev1, key: dev2-key, trust: network}
          groups:
            - {id_pattern: "sensor-*", group_key: fleet-key, trust: network}
            - {id_pattern: "sensor-*", group_key: fleet-key, trust: network}
        """
    )
    assert lines == [
        "gw.yaml:5: credentials.devices[1].id: duplicate device id 'dev1'",
        "gw.yaml:8: credentials.groups[1].id_pattern: duplicate id_pattern 'sensor-*'",
    ]
    line = single(
        errors,
        """
        credentials:
          secrets_file: secrets.yaml
          groups:
            - {id_pattern: "sensor-*", group_key: fleet-key}
        """,
    )
    assert line.startswith("gw.yaml:4: credentials.groups[0]: needs local authentication")
    line = single(
        errors,
        """
        credentials:
          secrets_file: secrets.yaml
          groups:
            - {id_pattern: "a/*", group_key: fleet-key, trust: network}
        """,
    )
    assert line.startswith("gw.yaml:4: credentials.groups[0].id_pattern: invalid id_pattern")
    line = single(
        errors,
        f"""
        credentials:
          groups:
            - id_pattern: "*"
              group_key: {FLEET_KEY}
              trust: network
        """,
    )
    assert line.startswith("gw.yaml:4: credentials.groups[0].group_key: inline keys are refused")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("token_ttl: 0.5s", "credentials.token_ttl: must be at least 1s"),
        ("token_ttl: soon", "credentials.token_ttl: invalid duration 'soon'"),
        ("renew_at: 1.0", "credentials.renew_at: must be less than 1"),
        ("renew_at: 0", "credentials.renew_at: must be greater than 0"),
        ("allow_inline: true", "credentials.allow_inline: unknown key (did you mean"),
    ],
)
def test_section_settings(errors: Errors, setting: str, message: str) -> None:
    line = single(errors, f"credentials:\n  {setting}\n")
    assert line.startswith(f"gw.yaml:2: {message}"), line


def test_x509_private_key_must_be_private(errors: Errors, tmp_path: Path) -> None:
    cert, key = tmp_path / "dev3.pem", tmp_path / "dev3.key"
    cert.write_text("cert")
    key.write_text("key")
    key.chmod(0o644)
    text = """
        credentials:
          devices:
            - id: dev3
              cert_file: dev3.pem
              key_file: dev3.key
              allowed_addresses: [192.168.1.7]
        """
    assert single(errors, text) == (
        f"gw.yaml:5: credentials.devices[0].key_file: private key {key} is accessible by "
        f"group or others (mode 0644); chmod 600 {key}"
    )
    key.chmod(0o600)
    cert.unlink()
    assert single(errors, text) == (
        f"gw.yaml:4: credentials.devices[0].cert_file: file not found: {cert}"
    )


def test_check_command_summarises_credentials(
    tmp_path: Path, secrets_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    path = tmp_path / "gw.yaml"
    path.write_text(SECRETS_CONFIG.replace("\n    ", "\n").lstrip("\n"))
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "credentials: 1 devices, 0 groups, token ttl 1h, renew at 80%" in out
    secrets_path.chmod(0o644)
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:2: credentials.secrets_file: ") and "0644" in err
    assert_no_secret([err])
    assert os.stat(secrets_path).st_mode & 0o777 == 0o644  # never "fixed" behind the operator
