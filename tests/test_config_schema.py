"""config/schema.json is generated from the model and must not drift."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.config import export_schema
from gateway.config.schema import REGENERATE, SCHEMA_PATH, main, render_schema


def test_schema_file_is_up_to_date(repo_root: Path) -> None:
    path = repo_root / "config" / "schema.json"
    assert SCHEMA_PATH == path
    assert path.exists(), f"config/schema.json is missing; run: {REGENERATE}"
    assert path.read_text(encoding="utf-8") == render_schema(), (
        f"config/schema.json is out of date with gateway/config; run: {REGENERATE}"
    )


def test_schema_covers_every_section_and_forbids_unknown_keys() -> None:
    schema = export_schema()
    assert set(schema["properties"]) == {
        "gateway",
        "admin",
        "log",
        "tls_profiles",
        "listeners",
        "connectors",
        "link_routes",
        "mqtt_routes",
        "credentials",
        "proxy",
        "store_and_forward",
    }
    assert schema["additionalProperties"] is False
    for name, definition in schema["$defs"].items():
        if definition.get("type") == "object":
            assert definition.get("additionalProperties") is False, name
    # Defaults are in their YAML spelling where it matters.
    assert schema["$defs"]["AdminSection"]["properties"]["listen"]["default"] == "127.0.0.1:9090"
    assert json.loads(render_schema()) == schema


def test_schema_check_command(tmp_path: Path, capsys) -> None:
    stale = tmp_path / "schema.json"
    stale.write_text("{}\n")
    assert main(["--check", "--output", str(stale)]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert main(["--output", str(stale)]) == 0
    assert main(["--check", "--output", str(stale)]) == 0
