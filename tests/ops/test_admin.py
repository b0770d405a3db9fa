"""The admin endpoint, exercised with clients we did not write (http.client, urllib, raw sockets)."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gateway.ops.admin import AdminLimits, serve_admin
from gateway.ops.registry import ConnectionInfo, LinkInfo, Registry
from tests.waiting import FAILSAFE

from .conftest import AdminFixture


def get(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, Any, bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=FAILSAFE) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


async def aget(url: str, method: str = "GET", headers: dict[str, str] | None = None):
    with trio.fail_after(FAILSAFE):
        return await trio.to_thread.run_sync(get, url, method, headers)


async def test_healthz_and_404(admin: AdminFixture) -> None:
    status, headers, body = await aget(admin.url + "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["Content-Type"].startswith("text/plain")
    status, _, _ = await aget(admin.url + "/nope")
    assert status == 404
    status, _, body = await aget(admin.url + "/healthz?verbose=1")
    assert status == 200


async def test_readyz_flips(admin: AdminFixture) -> None:
    status, _, body = await aget(admin.url + "/readyz")
    assert status == 503 and b"listener not bound: amqp" in body
    admin.registry.set_listener_bound("amqp", [("127.0.0.1", 5672)])
    status, _, body = await aget(admin.url + "/readyz")
    assert status == 503 and body == b"connector not connected: iothub (unknown)\n"
    admin.registry.set_connector_state("iothub", "connected")
    status, _, body = await aget(admin.url + "/readyz")
    assert (status, body) == (200, b"ready\n")
    admin.registry.set_connector_state("iothub", "backoff", "hub unreachable")
    status, _, _ = await aget(admin.url + "/readyz")
    assert status == 503
    admin.registry.set_connector_state("iothub", "connected")
    admin.readiness.draining = True
    status, _, body = await aget(admin.url + "/readyz")
    assert (status, body) == (503, b"draining\n")


async def test_metrics_endpoint_counts(admin: AdminFixture) -> None:
    m = admin.metrics
    m.on_device_connect("amqp", "amqp")
    for _ in range(7):
        m.on_message("devices/", "in", 100)
    m.on_disposition("accepted", "in")
    status, headers, body = await aget(admin.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }
    assert values[("iotgw_messages_total", (("direction", "in"), ("route", "devices/")))] == 7
    assert (
        values[("iotgw_message_bytes_total", (("direction", "in"), ("route", "devices/")))] == 700
    )
    assert (
        values[("iotgw_device_connections_open", (("listener", "amqp"), ("protocol", "amqp")))] == 1
    )
    # A scraper that asks for OpenMetrics gets it.
    status, headers, body = await aget(
        admin.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


async def test_api_json(admin: AdminFixture) -> None:
    reg = admin.registry
    conn = reg.add_connection(
        ConnectionInfo(
            id="c1", kind="device", endpoint="amqp", protocol="amqp", remote="127.0.0.1:40000"
        )
    )
    conn.device_ids.add("dev1")
    conn.count_in(10)
    reg.add_link(
        LinkInfo(
            id="l1",
            connection_id="c1",
            name="snd",
            role="sender",
            address="devices/dev1/messages/events",
            route="devices/",
            direction="in",
        )
    )
    reg.set_routes([{"prefix": "devices/", "direction": "both", "connector": "iothub"}])
    reg.register_connector("iothub", protocol="amqp", target="hub:5671", on_demand=True)
    reg.set_listener_bound("amqp", [("0.0.0.0", 5672)])
    for path, key, expected in [
        ("/api/connections", "id", "c1"),
        ("/api/links", "name", "snd"),
        ("/api/routes", "prefix", "devices/"),
        ("/api/connectors", "target", "hub:5671"),
        ("/api/listeners", "addresses", ["0.0.0.0:5672"]),
    ]:
        status, headers, body = await aget(admin.url + path)
        assert status == 200 and headers["Content-Type"] == "application/json"
        data = json.loads(body)
        assert data[0][key] == expected, path
    status, _, body = await aget(admin.url + "/api/connections")
    assert json.loads(body)[0]["messages_in"] == 1 and json.loads(body)[0]["links"] == 1


async def test_non_get_is_405_and_head_has_no_body(admin: AdminFixture) -> None:
    status, headers, _ = await aget(admin.url + "/healthz", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, _, _ = await aget(admin.url + "/api/links", method="DELETE")
    assert status == 405

    def head() -> tuple[int, str | None, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", admin.port, timeout=FAILSAFE)
        conn.request("HEAD", "/healthz")
        resp = conn.getresponse()
        out = (resp.status, resp.getheader("Content-Length"), resp.read())
        conn.close()
        return out

    assert await trio.to_thread.run_sync(head) == (200, "3", b"")


async def test_keep_alive_serves_many_requests_on_one_connection(admin: AdminFixture) -> None:
    def many() -> list[int]:
        conn = http.client.HTTPConnection("127.0.0.1", admin.port, timeout=FAILSAFE)
        statuses = []
        for path in ["/healthz", "/metrics", "/api/links", "/missing", "/readyz"] * 4:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        sock = conn.sock
        conn.close()
        assert sock is not None  # still the same, open connection at the end
        return statuses

    with trio.fail_after(FAILSAFE):
        statuses = await trio.to_thread.run_sync(many)
    assert statuses == [200, 200, 200, 404, 503] * 4


async def raw_exchange(port: int, data: bytes, *, shut_write: bool = False) -> bytes:
    """Send bytes, then read until the server closes the connection."""
    with trio.fail_after(FAILSAFE):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            if data:
                await stream.send_all(data)
            if shut_write:
                await stream.send_eof()
            out = b""
            while chunk := await stream.receive_some(65536):
                out += chunk
            return out


async def test_garbage_gets_400_and_server_survives(admin: AdminFixture) -> None:
    out = await raw_exchange(admin.port, b"\x16\x03\x01\x02\x00garbage that is not http\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    out = await raw_exchange(
        admin.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"ok\n")


async def test_oversize_head_and_body_are_refused(admin: AdminFixture) -> None:
    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"
    out = await raw_exchange(admin.port, huge)
    assert out.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    body = b"x" * 20000
    req = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    out = await raw_exchange(admin.port, req)
    assert out.startswith(b"HTTP/1.1 413 ")


async def test_client_closing_early_is_harmless(admin: AdminFixture) -> None:
    out = await raw_exchange(admin.port, b"GET /metr", shut_write=True)
    assert out == b"" or out.startswith(b"HTTP/1.1 400")
    status, _, _ = await aget(admin.url + "/healthz")
    assert status == 200


@pytest.mark.parametrize(
    "admin", [AdminLimits(header_timeout=0.3, idle_timeout=0.3)], indirect=True
)
async def test_slow_and_idle_clients_are_dropped(admin: AdminFixture) -> None:
    # A client that starts a request head and stalls is answered 408 and closed.
    out = await raw_exchange(admin.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    assert out.startswith(b"HTTP/1.1 408 ")
    # An idle connection is closed without a response.
    assert await raw_exchange(admin.port, b"") == b""
    status, _, _ = await aget(admin.url + "/healthz")
    assert status == 200


@pytest.mark.parametrize("admin", [AdminLimits(max_connections=2)], indirect=True)
async def test_connections_beyond_the_cap_are_closed(admin: AdminFixture) -> None:
    with trio.fail_after(FAILSAFE):
        held = [await trio.open_tcp_stream("127.0.0.1", admin.port) for _ in range(2)]
        # Until the server has accepted both held connections an extra one may
        # still be served; once it has, extras are closed without a response.
        while True:
            extra = await trio.open_tcp_stream("127.0.0.1", admin.port)
            try:
                await extra.send_all(
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                reply = await extra.receive_some(4096)
            except trio.BrokenResourceError:
                reply = b""
            finally:
                await extra.aclose()
            if reply == b"":
                break
            assert reply.startswith(b"HTTP/1.1 200 ")
        for stream in held:
            await stream.aclose()
    # Slots free up once the server has seen the held connections close.
    with trio.fail_after(FAILSAFE):
        while True:
            try:
                status, _, _ = await aget(admin.url + "/healthz")
                break
            except (OSError, http.client.HTTPException):
                await trio.sleep(0.01)  # polling with a deadline
    assert status == 200


async def test_serves_on_a_config_hostport() -> None:
    config = pytest.importorskip("gateway.config")
    listen = config.HostPort.parse("127.0.0.1:0")
    registry = Registry()
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(serve_admin, listen, registry, None, lambda: (True, "ready"))
        assert addrs[0][0] == "127.0.0.1" and addrs[0][1] > 0
        status, _, body = await aget(f"http://127.0.0.1:{addrs[0][1]}/readyz")
        assert (status, body) == (200, b"ready\n")
        nursery.cancel_scope.cancel()
