"""Fixtures for the SDK suite: where the SDKs are. Stacks are per test module (harness.py).

Outside CI a missing SDK environment skips its tests with the reason; in CI
(``CI`` set) it fails them, since `.ci/run` and scripts/test.sh install everything.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .harness import NODE_DIR, node_ready, sdk_python


def _absent(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the SDK tests)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def sdk_py() -> Path:
    python = sdk_python()
    if python is None:
        _absent("no SDK virtual environment (.venv-sdk): scripts/test.sh builds it")
    assert python is not None
    return python


@pytest.fixture(scope="session")
def node_sdk() -> Path:
    if not node_ready():
        _absent("node or tests/sdk/node/node_modules missing: scripts/test.sh runs npm ci")
    return NODE_DIR
