"""`iot-gateway status`: -c CONFIG finds the admin endpoint; no section = one-screen summary."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import trio

from gateway.ops import status
from gateway.ops.status_summary import SummaryError, admin_url_from_config
from tests.waiting import FAILSAFE

from .conftest import AdminFixture
from .test_status import populate


async def run_status(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with trio.fail_after(FAILSAFE):
        code = await trio.to_thread.run_sync(lambda: status.main(argv, out=out))
    return code, out.getvalue()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("127.0.0.1:9191", "http://127.0.0.1:9191"),
        ("0.0.0.0:9090", "http://127.0.0.1:9090"),
        ('"[::]:9090"', "http://[::1]:9090"),
        ('"[fd00::5]:9000"', "http://[fd00::5]:9000"),
    ],
)
def test_admin_url_from_config(tmp_path: Path, listen: str, url: str) -> None:
    path = write(tmp_path / "gw.yaml", f"admin:\n  listen: {listen}\n")
    assert admin_url_from_config(path) == url


def test_admin_url_needs_only_the_admin_section(tmp_path: Path) -> None:
    # Key files this user cannot read, unknown keys: only admin.listen matters here.
    path = write(tmp_path / "gw.yaml", "tls_profiles: {x: {ca_file: /root/none.pem}}\n"
                                       "future_section: {a: 1}\n")  # fmt: skip
    assert admin_url_from_config(path) == "http://127.0.0.1:9090"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("admin: {enabled: false}\n", "admin.enabled is false"),
        ("admin: {listen: nowhere}\n", "admin.listen: invalid address"),
        ("admin: [\n", "not a YAML configuration"),
    ],
)
def test_admin_url_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SummaryError, match=message):
        admin_url_from_config(write(tmp_path / "gw.yaml", text))


def test_missing_config_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert status.main(["-c", str(tmp_path / "none.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


async def test_summary_through_config(admin: AdminFixture, tmp_path: Path) -> None:
    populate(admin)
    admin.metrics.on_message("devices/", "in", 100, count=7)
    admin.metrics.on_attach_refused("amqp:not-found")
    config = write(tmp_path / "gateway.yaml", f"admin:\n  listen: 127.0.0.1:{admin.port}\n")
    code, text = await run_status(["-c", str(config), "--rate-window", "0"])
    assert code == 0, text
    rows = {line[:24].strip(): line[24:].strip() for line in text.splitlines()[3:]}
    assert rows["Admin endpoint"] == admin.url
    assert rows["Device connections"].startswith("1 (amqp 1)")
    assert rows["Messages to hub"] == "7"
    assert rows["Attaches refused"] == "1"
    assert rows["Ready"].startswith("no (")  # the fixture's listener is not bound
    assert rows["Routes"] == "2 link, 1 mqtt"
    assert "iothub (amqp) connected" in text
    assert rows["Soonest token expiry"] == "no gateway-held tokens"


async def test_summary_rates(admin: AdminFixture, tmp_path: Path) -> None:
    code, text = await run_status(["--admin", admin.url, "--rate-window", "0.2"])
    assert code == 0 and "(0.0/s)" in text and "(rates over" in text


async def test_dash_c_without_a_file_still_means_connections(admin: AdminFixture) -> None:
    populate(admin)
    code, text = await run_status(["--admin", admin.url, "-c"])
    assert code == 0 and text.splitlines()[0] == "Connections"
    code, text = await run_status(["-c", "--admin", admin.url])
    assert code == 0 and text.splitlines()[0] == "Connections"
    code, text = await run_status(["--admin", admin.url, "--connections", "--links"])
    assert "Connections" in text and "Links" in text


async def test_config_plus_section(admin: AdminFixture, tmp_path: Path) -> None:
    populate(admin)
    config = write(tmp_path / "gateway.yaml", f"admin:\n  listen: 0.0.0.0:{admin.port}\n")
    code, text = await run_status(["-c", str(config), "--routes"])
    assert code == 0 and text.splitlines()[0] == "Routes"
