"""The daemon imports only what its configuration uses: modules a configuration may
never need stay out of an idle daemon's memory (bench/RESULTS.md, "Idle RSS")."""

from __future__ import annotations

import subprocess
import sys

import pytest

OPTIONAL = ["sqlite3", "gateway.store.sqlite", "wsproto", "h11", "difflib"]


@pytest.mark.parametrize("module", OPTIONAL)
def test_daemon_and_cli_do_not_import(module: str) -> None:
    code = f"import gateway.daemon, gateway.cli, sys; print({module!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_store_classes_still_importable_from_the_package() -> None:
    from gateway.store import FakeStore, MessageStore

    assert MessageStore.__module__ == "gateway.store.sqlite"
    assert FakeStore.__module__ == "gateway.store.fake"
