from __future__ import annotations

import io
import socket

import pytest
import trio

from gateway.ops import status
from gateway.ops.registry import ConnectionInfo, LinkInfo
from tests.waiting import FAILSAFE

from .conftest import AdminFixture


def populate(admin: AdminFixture) -> None:
    reg = admin.registry
    dev = reg.add_connection(
        ConnectionInfo(
            id="c1", kind="device", endpoint="amqp", protocol="amqp", remote="192.168.1.7:40001"
        )
    )
    dev.device_ids.update({"dev1"})
    for _ in range(3):
        dev.count_in(1000)
    reg.add_connection(
        ConnectionInfo(
            id="u1",
            kind="upstream",
            endpoint="iothub",
            protocol="amqp",
            remote="myhub.azure-devices.net:5671",
        )
    )
    reg.add_link(
        LinkInfo(
            id="l1",
            connection_id="c1",
            name="sender-link",
            role="sender",
            address="devices/dev1/messages/events",
            route="devices/",
            direction="in",
            upstream_link_id="l2",
        )
    )
    reg.add_link(
        LinkInfo(
            id="l2",
            connection_id="u1",
            name="sender-link#1",
            role="sender",
            address="devices/dev1/messages/events",
            route="devices/",
            direction="in",
        )
    )
    reg.set_routes([
        {"kind": "link", "prefix": "$cbs", "direction": "both", "connector": "iothub"},
        {"kind": "link", "prefix": "devices/", "direction": "both", "connector": "iothub"},
        {"kind": "mqtt", "hub": "*", "connector": "iothub-mqtt"},
    ])  # fmt: skip
    reg.register_connector(
        "iothub", protocol="amqp", target="myhub.azure-devices.net:5671", on_demand=True
    )
    reg.set_connector_state("iothub", "connected")
    reg.register_connector("iothub-mqtt", protocol="mqtt", target="myhub.azure-devices.net:8883")


async def run_status(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with trio.fail_after(FAILSAFE):
        code = await trio.to_thread.run_sync(lambda: status.main(argv, out=out))
    return code, out.getvalue()


async def test_all_tables(admin: AdminFixture) -> None:
    populate(admin)
    code, text = await run_status(["--admin", admin.url, "--all"])
    assert code == 0
    lines = text.splitlines()
    for title in ("Connections", "Links", "Routes", "Connectors"):
        assert title in lines
    conn_row = next(line for line in lines if line.strip().startswith("c1 "))
    assert conn_row.split()[:8] == [
        "c1",
        "device",
        "amqp",
        "amqp",
        "192.168.1.7:40001",
        "dev1",
        "open",
        "1",
    ]
    assert conn_row.split()[8:12] == ["3", "0", "3000", "0"]
    link_row = next(line for line in lines if line.strip().startswith("l1 "))
    assert "devices/dev1/messages/events" in link_row and "l2" in link_row
    assert any("$cbs" in line and "iothub" in line for line in lines)
    assert any(line.split()[:2] == ["mqtt", "-"] for line in lines if "iothub-mqtt" in line)
    connector_row = next(line for line in lines if line.strip().startswith("iothub "))
    assert connector_row.split()[:6] == [
        "iothub",
        "amqp",
        "myhub.azure-devices.net:5671",
        "yes",
        "connected",
        "1",
    ]
    # Column headings are underlined like qdstat's.
    idx = lines.index("Connections")
    assert lines[idx + 1].split()[:3] == ["id", "kind", "endpoint"]
    assert set(lines[idx + 2].strip()) == {"="}


async def test_single_sections_and_json(admin: AdminFixture) -> None:
    populate(admin)
    code, text = await run_status(["--admin", admin.url.removeprefix("http://"), "-l"])
    assert code == 0 and text.splitlines()[0] == "Links" and "Connections" not in text
    code, text = await run_status(["--admin", admin.url, "--connectors", "--routes"])
    assert "Routes" in text and "Connectors" in text and "Links" not in text
    code, text = await run_status(["--admin", admin.url, "--json", "-c"])
    assert code == 0 and '"connections"' in text and '"192.168.1.7:40001"' in text


async def test_empty_gateway(admin: AdminFixture) -> None:
    code, text = await run_status(["--admin", admin.url, "-c"])
    assert code == 0 and "(none)" in text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_admin_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert status.main(["--admin", url, "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"iot-gateway status: cannot reach the admin endpoint at {url}")


async def test_wrong_endpoint_is_a_clear_error(
    admin: AdminFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = await run_status(["--admin", admin.url + "/nothing-here"])
    assert code == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_render_table() -> None:
    text = status.render_table("T", ["a", "bb"], [[1, None], ["long-value", True]])
    assert text.splitlines() == [
        "T",
        "  a           bb",
        "  ===============",
        "  1           -",
        "  long-value  yes",
    ]
