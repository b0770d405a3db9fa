"""The store_and_forward: section, byte sizes, the credential opt-in and its cross-check."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.auth.credentials import CredentialStore
from gateway.config import ConfigError, GatewayConfig, parse_config_text, parse_size

KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="


def parse(text: str, tmp_path: Path) -> GatewayConfig:
    return parse_config_text(textwrap.dedent(text), str(tmp_path / "gw.yaml"))


def errors(text: str, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, tmp_path)
    return [line.replace(str(tmp_path) + "/", "") for line in info.value.errors]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64MiB", 64 * 1024 * 1024),
        ("512KiB", 512 * 1024),
        ("1GiB", 1024**3),
        ("1GB", 10**9),
        ("5MB", 5_000_000),
        ("2kb", 2000),
        ("4096B", 4096),
        ("4096", 4096),
        (" 1.5 MiB ", 1572864),
        (123456, 123456),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "MiB", "10 parsecs", "1TiB", "-1MiB", True, None, "1e3"])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(bad)  # type: ignore[arg-type]


def test_absent_section_is_off(tmp_path: Path) -> None:
    config = parse("credentials:\n  devices:\n    - {id: dev1, key: env:K, trust: network}\n"
                   .replace("env:K", KEY).replace("credentials:\n", "credentials:\n  allow_inline_secrets: true\n"),
                   tmp_path)  # fmt: skip
    assert config.store_and_forward is None
    assert config.credentials is not None
    assert config.credentials.devices[0].store_and_forward is False
    entry = CredentialStore.from_config(config.credentials).lookup("dev1")
    assert entry is not None and entry.store_and_forward is False


def test_defaults_and_units(tmp_path: Path) -> None:
    config = parse("store_and_forward: {path: state/store.db}\n", tmp_path)
    section = config.store_and_forward
    assert section is not None
    assert section.path == tmp_path / "state" / "store.db"  # relative to the config file
    assert section.max_bytes == 64 * 1024 * 1024
    assert section.max_age == 7 * 86400
    assert section.device_share == 0.25 and section.device_max_bytes == 16 * 1024 * 1024
    assert section.replay_rate == 50 and section.batch_max == 256
    config = parse(
        """
        store_and_forward:
          path: /var/lib/iot-gateway/store.db
          max_bytes: 1GB
          max_age: 1d12h
          device_share: 0.5
          replay_rate: 10
          batch_max: 32
        """,
        tmp_path,
    )
    section = config.store_and_forward
    assert section is not None and section.path == Path("/var/lib/iot-gateway/store.db")
    assert section.max_bytes == 10**9 and section.max_age == 36 * 3600
    assert section.device_max_bytes == 500_000_000
    assert (section.replay_rate, section.batch_max) == (10, 32)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("max_bytes: 64 parsecs", "store_and_forward.max_bytes: invalid size '64 parsecs'"),
        ("max_bytes: 1KiB", "store_and_forward.max_bytes: "),
        ("max_age: soon", "store_and_forward.max_age: invalid duration 'soon'"),
        ("max_age: 0s", "store_and_forward.max_age: "),
        ("device_share: 1.5", "store_and_forward.device_share: "),
        ("device_share: 0", "store_and_forward.device_share: "),
        ("replay_rate: 0", "store_and_forward.replay_rate: "),
        ("batch_max: 0", "store_and_forward.batch_max: "),
        ("colour: blue", "store_and_forward.colour: "),
    ],
)
def test_bad_values_name_file_line_and_key(tmp_path: Path, line: str, expected: str) -> None:
    text = f"log: {{level: info}}\nstore_and_forward:\n  path: s.db\n  {line}\n"
    (error,) = errors(text, tmp_path)
    assert error.startswith(f"gw.yaml:4: {expected}"), error


def test_path_is_required(tmp_path: Path) -> None:
    (error,) = errors("store_and_forward: {max_bytes: 1MiB}\n", tmp_path)
    assert error.startswith("gw.yaml:1: store_and_forward.path: "), error
    (error,) = errors('store_and_forward: {path: " "}\n', tmp_path)
    assert error.startswith("gw.yaml:1: store_and_forward.path: "), error
    assert "must not be empty" in error


OPT_IN = """\
credentials:
  allow_inline_secrets: true
  devices:
    - {id: dev1, key: KEY, trust: network}
    - {id: dev2, key: KEY, trust: network, store_and_forward: true}
    - {id: dev3/mod1, key: KEY, trust: network, store_and_forward: true}
  groups:
    - {id_pattern: "sensor-*", group_key: KEY, trust: network, store_and_forward: true}
    - {id_pattern: "*", group_key: KEY, trust: network}
""".replace("KEY", KEY)


def test_opt_in_without_the_section_names_both(tmp_path: Path) -> None:
    found = errors(OPT_IN, tmp_path)
    assert found == [
        f"gw.yaml:{line}: credentials.{where}.store_and_forward: store_and_forward: true needs "
        "the top-level store_and_forward: section (at least its path)"
        for line, where in ((5, "devices[1]"), (6, "devices[2]"), (8, "groups[0]"))
    ]


def test_opt_in_reaches_the_credential_store(tmp_path: Path) -> None:
    config = parse(OPT_IN + "store_and_forward: {path: s.db}\n", tmp_path)
    store = CredentialStore.from_config(config.credentials)
    flags = {
        name: getattr(store.lookup_identity(name), "store_and_forward", None)
        for name in ("dev1", "dev2", "dev3/mod1", "sensor-7", "other")
    }
    assert flags == {
        "dev1": False, "dev2": True, "dev3/mod1": True, "sensor-7": True, "other": False
    }  # fmt: skip
    rows = {row["id"]: row["store_and_forward"] for row in store.describe()}
    assert rows == {"dev1": False, "dev2": True, "dev3/mod1": True, "sensor-*": True, "*": False}


def test_opt_in_must_be_a_boolean(tmp_path: Path) -> None:
    text = OPT_IN.replace("store_and_forward: true}", "store_and_forward: maybe}", 1)
    found = errors(text + "store_and_forward: {path: s.db}\n", tmp_path)
    assert len(found) == 1 and found[0].startswith(
        "gw.yaml:5: credentials.devices[1].store_and_forward: "
    ), found


def test_check_summary_line(tmp_path: Path) -> None:
    from gateway.config.summary import render_summary

    config = parse(OPT_IN + "store_and_forward: {path: s.db, max_age: 1d}\n", tmp_path)
    text = render_summary(config)
    assert (
        f"store and forward: {tmp_path / 's.db'}, max 64MiB (25% per device), max age 1d, "
        "replay 50/s per connector; 3 credentials entries opted in"
    ) in text
