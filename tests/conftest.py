"""Shared test fixtures: repository paths and a helper to write config files."""

from __future__ import annotations

import logging
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO_ROOT = Path(__file__).resolve().parents[1]

# Let `pytest` run from a checkout without `pip install -e .`.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# No Hypothesis deadline and no too-slow health check, in every run: on a busy machine one
# example may take seconds, and that says nothing about the code under test (each test's own
# assertions do). CI also replays the same examples every run, so a red build always means a
# change broke something; local runs keep exploring new examples.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    """Undo what a test's ``setup_logging`` (or the CLI's) did to the root logger, so
    its handlers do not write to a closed capture or into later tests' caplog."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """write_config(yaml_text, name="gateway.yaml") -> path; the text is dedented."""

    def write(text: str, name: str = "gateway.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write
