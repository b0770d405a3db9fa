"""Fixtures for the credential tests: keys, a private secrets file, config parsing."""

from __future__ import annotations

import base64
import os
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from gateway.config import ConfigError, GatewayConfig, parse_config_text

# The worked example key of docs/iothub-protocol.md (32 bytes).
DEV1_KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
DEV2_KEY = base64.b64encode(bytes(range(32))).decode()
ENV_KEY = base64.b64encode(b"module key from the environment!").decode()
# The enrollment group key of Microsoft's DPS symmetric-key example (64 bytes).
FLEET_KEY = (
    "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=="
)
ALL_KEYS = (DEV1_KEY, DEV2_KEY, ENV_KEY, FLEET_KEY)

HUB = "myhub.azure-devices.net"


def write_secrets(path: Path, secrets: Mapping[str, str], mode: int = 0o600) -> Path:
    path.write_text("".join(f"{name}: {value}\n" for name, value in secrets.items()))
    os.chmod(path, mode)
    return path


@pytest.fixture
def secrets_path(tmp_path: Path) -> Path:
    """A 0600 secrets file with dev1-key, dev2-key and fleet-key."""
    return write_secrets(
        tmp_path / "secrets.yaml",
        {"dev1-key": DEV1_KEY, "dev2-key": DEV2_KEY, "fleet-key": FLEET_KEY},
    )


ConfigParser = Callable[..., GatewayConfig]


@pytest.fixture
def parse(tmp_path: Path) -> ConfigParser:
    """parse(yaml_text, env={...}) -> GatewayConfig, as file gw.yaml next to the secrets."""

    def run(text: str, env: Mapping[str, str] | None = None) -> GatewayConfig:
        return parse_config_text(
            textwrap.dedent(text).lstrip("\n"), "gw.yaml", base_dir=tmp_path, env=env or {}
        )

    return run


@pytest.fixture
def errors(parse: ConfigParser) -> Callable[..., list[str]]:
    """errors(yaml_text, env={...}) -> the ConfigError lines."""

    def run(text: str, env: Mapping[str, str] | None = None) -> list[str]:
        with pytest.raises(ConfigError) as info:
            parse(text, env)
        return info.value.errors

    return run
