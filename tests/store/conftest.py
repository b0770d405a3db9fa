"""Fixtures for the store tests: a config on a temporary file, a settable clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config.store import StoreAndForwardSection


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def store_config(path: Path, **overrides: Any) -> StoreAndForwardSection:
    values: dict[str, Any] = {"path": path, "max_bytes": "1MiB", "device_share": 1.0}
    values.update(overrides)
    return StoreAndForwardSection.model_validate(values)


@pytest.fixture
def config(tmp_path: Path) -> StoreAndForwardSection:
    return store_config(tmp_path / "store.db")


def message(device: str = "dev1", n: int = 0, size: int = 100, **extra: Any) -> dict[str, Any]:
    """Keyword arguments of one append."""
    values: dict[str, Any] = {
        "device": device,
        "connector": "hub-mqtt",
        "protocol": "mqtt",
        "address": f"devices/{device}/messages/events/n={n}",
        "meta": b"\x01",
        "payload": (f"{device}:{n}:".encode() + b"x" * size)[:size] if size else b"",
    }
    values.update(extra)
    return values
