"""HTTP CONNECT proxies: choosing one (config, HTTPS_PROXY, NO_PROXY), tunnelling
through Debian's tinyproxy with and without Basic auth, and every way a proxy
can say no or answer garbage (a tiny trio server in the test plays those)."""

from __future__ import annotations

import base64
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from gateway.net.http_proxy import (
    ProxyConnectError,
    ProxyEndpoint,
    no_proxy_matches,
    open_tunnel,
    parse_proxy_url,
    proxy_from_env,
    resolve_proxy,
)
from tests.waiting import FAILSAFE

from .proxies import loopback_address, needs_tinyproxy, tinyproxy

WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)


# -- choosing the proxy --------------------------------------------------------------


def test_parse_proxy_url() -> None:
    assert parse_proxy_url("http://proxy.corp:3128") == ("proxy.corp", 3128, None, None)
    assert parse_proxy_url("proxy.corp:8080") == ("proxy.corp", 8080, None, None)
    assert parse_proxy_url("http://proxy.corp") == ("proxy.corp", 80, None, None)
    assert parse_proxy_url("http://u%40x:p%3Aw@[::1]:3128/") == ("::1", 3128, "u@x", "p:w")
    with pytest.raises(ValueError, match="only http://"):
        parse_proxy_url("https://proxy.corp:443")
    with pytest.raises(ValueError) as info:
        parse_proxy_url("socks5://bob:hunter2@proxy:1080")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "direct"),
    [
        ("hub.azure-devices.net", 443, "*", True),
        ("hub.azure-devices.net", 443, "azure-devices.net", True),
        ("hub.azure-devices.net", 443, ".azure-devices.net", True),
        ("hub.azure-devices.net", 443, "*.azure-devices.net", True),
        ("hub.azure-devices.net", 443, "hub.azure-devices.net", True),
        ("hub.azure-devices.net", 443, "HUB.Azure-Devices.NET.", True),
        ("hub.azure-devices.net", 443, "devices.net", False),
        ("hub.azure-devices.net", 443, "s.net", False),
        ("hub.azure-devices.net", 443, "zure-devices.net", False),
        ("hub.azure-devices.net", 443, "localhost, 10.0.0.1", False),
        ("hub.azure-devices.net", 443, "localhost,azure-devices.net", True),
        ("hub.azure-devices.net", 443, "azure-devices.net:443", True),
        ("hub.azure-devices.net", 443, "azure-devices.net:5671", False),
        ("10.1.2.3", 443, "10.1.2.3", True),
        ("10.1.2.3", 443, "10.1.2.4", False),
        ("::1", 443, "[::1]", True),
        ("::1", 443, "[::1]:443", True),
        ("hub.example", 443, "", False),
        ("hub.example", 443, " , ", False),
    ],
)
def test_no_proxy(host: str, port: int, no_proxy: str, direct: bool) -> None:
    assert no_proxy_matches(host, port, no_proxy) is direct


def test_proxy_from_env() -> None:
    env = {"HTTPS_PROXY": "http://proxy.corp:3128", "NO_PROXY": "localhost,.internal"}
    proxy = proxy_from_env("hub.azure-devices.net", 443, env)
    assert proxy is not None and (proxy.host, proxy.port) == ("proxy.corp", 3128)
    assert proxy_from_env("db.internal", 443, env) is None
    assert proxy_from_env("hub.azure-devices.net", 443, {}) is None
    # Lower case wins, as curl has it.
    env = {"https_proxy": "http://lower:1", "HTTPS_PROXY": "http://upper:2"}
    assert proxy_from_env("h", 443, env).host == "lower"  # type: ignore[union-attr]
    with_creds = proxy_from_env("h", 443, {"HTTPS_PROXY": "http://bob:pw%21@p:3128"})
    assert with_creds is not None and with_creds.username == "bob"
    assert with_creds.read_password() == "pw!"
    assert "pw!" not in repr(with_creds) and "pw" not in str(with_creds)
    with pytest.raises(ProxyConnectError, match="HTTPS_PROXY"):
        proxy_from_env("h", 443, {"HTTPS_PROXY": "https://p:443"})


def test_resolve_proxy(tmp_path: Path) -> None:
    secret = tmp_path / "proxy-password"
    secret.write_text("s3cret\n")
    setting = SimpleNamespace(url="http://proxy:3128", username="alice", password_file=secret)
    proxy = resolve_proxy(setting, "hub", 443)
    assert proxy == ProxyEndpoint("proxy", 3128, "alice", secret)
    assert proxy is not None and proxy.read_password() == "s3cret"
    assert proxy.authorization() == b"Basic " + base64.b64encode(b"alice:s3cret")
    assert resolve_proxy(None, "hub", 443) is None
    assert resolve_proxy("none", "hub", 443) is None
    env = {"HTTPS_PROXY": "http://envproxy:8080"}
    assert resolve_proxy("env", "hub", 443, env) == ProxyEndpoint(
        "envproxy", 8080, source="HTTPS_PROXY"
    )
    missing = ProxyEndpoint("proxy", 3128, "alice", tmp_path / "nope")
    with pytest.raises(ProxyConnectError, match="password_file"):
        missing.authorization()


# -- a fake proxy that answers what the test says --------------------------------------


Handler = Callable[[trio.SocketStream, bytes], Awaitable[None]]


async def serve_fake(nursery: trio.Nursery, handler: Handler) -> tuple[str, int, list[bytes]]:
    """A one-shot-per-connection server: reads the request head, calls `handler`."""
    host = loopback_address()
    requests: list[bytes] = []

    async def conn(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(4096)
            if not data:
                return
            head += data
        requests.append(head)
        try:
            await handler(stream, head)
        finally:
            await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, conn, 0, host=host))
    port = listeners[0].socket.getsockname()[1]
    return host, port, requests


def answer(raw: bytes) -> Handler:
    async def handler(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(raw)

    return handler


async def fake_failure(raw: bytes, proxy_kwargs: dict | None = None) -> ProxyConnectError:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            host, port, _ = await serve_fake(nursery, answer(raw))
            proxy = ProxyEndpoint(host, port, **(proxy_kwargs or {}))
            with pytest.raises(ProxyConnectError) as info:
                await open_tunnel(proxy, "hub.example", 443)
            nursery.cancel_scope.cancel()
    return info.value


async def test_407_without_credentials_says_what_to_set() -> None:
    err = await fake_failure(
        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
        b'Proxy-Authenticate: Basic realm="corp"\r\nContent-Length: 12\r\n\r\nnot allowed!'
    )
    assert err.reason == "proxy_auth_required" and err.status == 407
    assert err.status_line == "HTTP/1.1 407 Proxy Authentication Required"
    assert "HTTP/1.1 407 Proxy Authentication Required" in err.detail
    assert "set proxy.username and proxy.password_file" in err.detail


async def test_407_with_credentials_says_they_were_refused(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2")
    err = await fake_failure(
        b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n",
        {"username": "bob", "password_file": secret},
    )
    assert err.reason == "proxy_auth_required"
    assert "refused the credentials" in err.detail
    assert "hunter2" not in err.detail and "hunter2" not in str(err)


@pytest.mark.parametrize(
    ("raw", "status", "words"),
    [
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", 403, "CONNECT to port 443"),
        (b"HTTP/1.1 502 Bad Gateway\r\n\r\n<html>", 502, "could not reach the hub"),
        (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n", 503, "could not"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", 400, "400 Bad Request"),
    ],
)
async def test_refusals_carry_the_status_line(raw: bytes, status: int, words: str) -> None:
    err = await fake_failure(raw)
    assert err.reason == "proxy_refused" and err.status == status
    assert err.status_line in err.detail and words in err.detail


async def test_200_with_a_body_is_not_a_tunnel() -> None:
    err = await fake_failure(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 21\r\n\r\n"
        b"<html>Welcome!</html>"
    )
    assert err.reason == "proxy_protocol"
    assert "a body instead of a tunnel" in err.detail


async def test_200_with_a_body_announced_but_not_yet_sent() -> None:
    err = await fake_failure(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert err.reason == "proxy_protocol" and "instead of a tunnel" in err.detail


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH_9.2p1\r\n\r\n",
        b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
        b"HTTP/1.1 2OO\r\n\r\n",
    ],
    ids=["ssh", "tls", "bad-status"],
)
async def test_garbage_answer(raw: bytes) -> None:
    err = await fake_failure(raw)
    assert err.reason == "proxy_protocol" and "not HTTP" in err.detail


async def test_oversized_answer_head() -> None:
    err = await fake_failure(b"HTTP/1.1 200 OK\r\nX-Junk: " + b"a" * 40000 + b"\r\n\r\n")
    assert err.reason == "proxy_protocol"


async def test_proxy_hangs_up_without_answering() -> None:
    err = await fake_failure(b"")
    assert err.reason == "proxy_protocol" and "without answering" in err.detail


async def test_proxy_not_listening() -> None:
    host = loopback_address()
    with trio.fail_after(WAIT), pytest.raises(ProxyConnectError) as info:
        await open_tunnel(ProxyEndpoint(host, 1), "hub.example", 443)
    assert info.value.reason == "refused"
    assert f"connect to proxy {host}:1 failed" in info.value.detail


async def test_request_carries_target_and_basic_auth(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:

            async def tunnel(stream: trio.SocketStream, head: bytes) -> None:
                await stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await stream.send_all(await stream.receive_some(100))  # echo

            host, port, requests = await serve_fake(nursery, tunnel)
            proxy = ProxyEndpoint(host, port, "alice", secret)
            tcp = await open_tunnel(proxy, "hub.example", 8883)
            await tcp.send_all(b"ping")
            assert await tcp.receive_some(100) == b"ping"
            await tcp.aclose()
            nursery.cancel_scope.cancel()
    head = requests[0]
    assert head.startswith(b"CONNECT hub.example:8883 HTTP/1.1\r\n")
    assert b"Host: hub.example:8883\r\n" in head
    token = base64.b64encode(b"alice:s3cret")
    assert b"Proxy-Authorization: Basic " + token + b"\r\n" in head


# -- tinyproxy ---------------------------------------------------------------------------


async def echo_server(nursery: trio.Nursery) -> tuple[str, int]:
    host = loopback_address()

    async def echo(stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(data)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host=host))
    return host, listeners[0].socket.getsockname()[1]


@needs_tinyproxy
async def test_tinyproxy_tunnel(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            host, port = await echo_server(nursery)
            async with tinyproxy(tmp_path, connect_ports=[port]) as proxy:
                tcp = await open_tunnel(ProxyEndpoint(proxy.host, proxy.port), host, port)
                await tcp.send_all(b"through the tunnel")
                got = b""
                while len(got) < len(b"through the tunnel"):
                    got += await tcp.receive_some(100)
                assert got == b"through the tunnel"
                await tcp.aclose()
            nursery.cancel_scope.cancel()


@needs_tinyproxy
async def test_tinyproxy_basic_auth(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_text("s3cret\n")
    bad = tmp_path / "bad"
    bad.write_text("wrong\n")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            host, port = await echo_server(nursery)
            async with tinyproxy(tmp_path, connect_ports=[port], auth=("alice", "s3cret")) as p:
                with pytest.raises(ProxyConnectError) as info:
                    await open_tunnel(ProxyEndpoint(p.host, p.port), host, port)
                assert info.value.reason == "proxy_auth_required", info.value.detail
                assert info.value.status == 407
                assert "set proxy.username and proxy.password_file" in info.value.detail
                with pytest.raises(ProxyConnectError) as info:
                    await open_tunnel(ProxyEndpoint(p.host, p.port, "alice", bad), host, port)
                assert info.value.reason == "proxy_auth_required"
                assert "refused the credentials" in info.value.detail
                tcp = await open_tunnel(ProxyEndpoint(p.host, p.port, "alice", good), host, port)
                await tcp.send_all(b"authorised")
                assert await tcp.receive_some(100) == b"authorised"
                await tcp.aclose()
            nursery.cancel_scope.cancel()


@needs_tinyproxy
async def test_tinyproxy_blocks_connect_to_other_ports(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            host, port = await echo_server(nursery)
            async with tinyproxy(tmp_path, connect_ports=[443]) as proxy:
                with pytest.raises(ProxyConnectError) as info:
                    await open_tunnel(ProxyEndpoint(proxy.host, proxy.port), host, port)
            nursery.cancel_scope.cancel()
    assert info.value.reason == "proxy_refused"
    assert info.value.status == 403
    assert info.value.status_line.startswith("HTTP/1.1 403")
    assert "CONNECT to port 443" in info.value.detail
