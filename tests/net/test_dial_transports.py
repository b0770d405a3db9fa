"""Dialling over WebSockets and through HTTP proxies, against hubsim's WebSocket
listener and Debian's tinyproxy: what the hub receives, and the error a user sees
for each common mistake (proxy needs auth, proxy blocks the port, TLS inspection,
upgrade refused)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote_plus

import pytest
import trio
import trustme

from gateway.hubsim import HubSim
from gateway.net.dial import DialError, dial_connector
from gateway.net.http_proxy import ProxyConnectError, proxy_tcp_opener
from gateway.net.websocket_stream import WebSocketStream
from tests.waiting import FAILSAFE

from .proxies import needs_squid, needs_tinyproxy, squid, tinyproxy

HUB = "myhub.azure-devices.net"
WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def sas(resource: str, key: str) -> str:
    expiry = int(time.time()) + 3600
    sr = quote_plus(resource)
    sig = hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    return f"SharedAccessSignature sr={sr}&sig={quote_plus(base64.b64encode(sig).decode())}&se={expiry}"


def mqtt_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_connect(client_id: str, username: str, password: str) -> bytes:
    body = mqtt_string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60)
    body += mqtt_string(client_id) + mqtt_string(username) + mqtt_string(password)
    return bytes([0x10]) + remaining(len(body)) + body


def mqtt_publish(topic: str, payload: bytes, packet_id: int) -> bytes:
    body = mqtt_string(topic) + struct.pack("!H", packet_id) + payload
    return bytes([0x32]) + remaining(len(body)) + body


async def receive_exactly(stream: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, "stream ended"
        data += chunk
    return data


@pytest.fixture
def keys() -> dict[str, str]:
    return {"dev1": new_key()}


@pytest.fixture
def hub(keys: dict[str, str]) -> Iterator[HubSim]:
    sim = HubSim(keys, hub_host=HUB, ws_port=0)
    with sim:
        yield sim
    sim.close()


def profile(ca_file: str | Path) -> SimpleNamespace:
    return SimpleNamespace(
        ca_file=ca_file, cert_file=None, key_file=None, server_name=None, min_version="1.2",
        ciphers=None,
    )  # fmt: skip


def ws_connector(port: int, protocol: str = "mqtt", **extra: Any) -> SimpleNamespace:
    fields: dict[str, Any] = dict(
        name="iothub", protocol=protocol, host="127.0.0.1", port=port, connect_timeout=WAIT,
        allow_plaintext=False, transport="websockets", tls_profile="hub", proxy=None,
    )  # fmt: skip
    fields.update(extra)
    return SimpleNamespace(**fields)


async def publish_through(stream: Any, keys: dict[str, str]) -> None:
    token = sas(f"{HUB}/devices/dev1", keys["dev1"])
    await stream.send_all(mqtt_connect("dev1", f"{HUB}/dev1/?api-version=2021-04-12", token))
    assert await receive_exactly(stream, 4) == b"\x20\x02\x00\x00"  # CONNACK accepted
    await stream.send_all(mqtt_publish("devices/dev1/messages/events/", b"via ws", 7))
    assert await receive_exactly(stream, 4) == b"\x40\x02\x00\x07"  # PUBACK 7


async def d2c(hub: HubSim) -> Any:
    return await trio.to_thread.run_sync(
        hub.recorder.wait_for, lambda: hub.recorder.d2c and hub.recorder.d2c[-1], 10
    )


async def test_mqtt_over_websockets_direct(hub: HubSim, keys: dict[str, str]) -> None:
    with trio.fail_after(WAIT):
        stream, report = await dial_connector(ws_connector(hub.ws_port), profile(hub.ca_file))
        assert isinstance(stream, WebSocketStream) and stream.subprotocol == "mqtt"
        await publish_through(stream, keys)
        record = await d2c(hub)
        assert (record.device_id, record.raw, record.protocol) == ("dev1", b"via ws", "mqtt")
        await stream.aclose()


async def test_host_header_names_the_tls_server_name(keys: dict[str, str]) -> None:
    # hubsim's certificate is for the hub name and 127.0.0.1: the profile names the hub.
    seen: list[str] = []
    with HubSim(keys, hub_host=HUB, ws_port=0) as sim:
        import gateway.hubsim.websocket as hub_ws

        original = hub_ws.WebSocketBridge._on_request

        def spy(self: Any, request: Any) -> bool:
            seen.append(request.host)
            return original(self, request)

        hub_ws.WebSocketBridge._on_request = spy  # type: ignore[method-assign]
        try:
            named = profile(sim.ca_file)
            named.server_name = HUB
            with trio.fail_after(WAIT):
                stream, _ = await dial_connector(ws_connector(sim.ws_port), named)
                await stream.aclose()
        finally:
            hub_ws.WebSocketBridge._on_request = original  # type: ignore[method-assign]
    sim.close()
    assert seen == [f"{HUB}:{sim.ws_port}"]


@needs_tinyproxy
async def test_mqtt_over_websockets_through_tinyproxy_with_auth(
    hub: HubSim, keys: dict[str, str], tmp_path: Path
) -> None:
    secret = tmp_path / "proxy-password"
    secret.write_text("s3cret\n")
    with trio.fail_after(WAIT):
        async with tinyproxy(tmp_path, connect_ports=[hub.ws_port], auth=("gw", "s3cret")) as p:
            proxy = SimpleNamespace(url=p.url, username="gw", password_file=secret)
            connector = ws_connector(hub.ws_port, proxy=proxy)
            stream, report = await dial_connector(connector, profile(hub.ca_file))
            assert report.address == f"proxy {p.host}:{p.port}"
            await publish_through(stream, keys)
            assert (await d2c(hub)).raw == b"via ws"
            await stream.aclose()
            assert any(f"CONNECT 127.0.0.1:{hub.ws_port}" in line for line in p.log)


@needs_tinyproxy
async def test_proxy_needs_auth(hub: HubSim, tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        async with tinyproxy(tmp_path, connect_ports=[hub.ws_port], auth=("gw", "s3cret")) as p:
            connector = ws_connector(hub.ws_port, proxy=SimpleNamespace(url=p.url))
            with pytest.raises(DialError) as info:
                await dial_connector(connector, profile(hub.ca_file))
    failure = info.value.failures[0]
    assert failure.reason == "proxy_auth_required"
    assert "HTTP/1.0 407 Proxy Authentication Required" in failure.detail
    assert "set proxy.username and proxy.password_file" in failure.detail


@needs_tinyproxy
async def test_proxy_blocks_the_port(hub: HubSim, tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        async with tinyproxy(tmp_path, connect_ports=[443]) as p:
            connector = ws_connector(hub.ws_port, proxy=SimpleNamespace(url=p.url))
            with pytest.raises(DialError) as info:
                await dial_connector(connector, profile(hub.ca_file))
    failure = info.value.failures[0]
    assert failure.reason == "proxy_refused"
    assert "HTTP/1.1 403 Access violation" in failure.detail
    assert "allow CONNECT to port 443" in failure.detail


@needs_tinyproxy
async def test_tls_inspection_names_the_ca_to_add(hub: HubSim, tmp_path: Path) -> None:
    # The gateway trusts one CA; what arrives through the proxy is signed by
    # another (hubsim's throwaway CA standing in for the proxy's inspection CA).
    other = trustme.CA(organization_name="Gateway Trusted CA")
    trusted = tmp_path / "trusted.pem"
    other.cert_pem.write_to_path(str(trusted))
    with trio.fail_after(WAIT):
        async with tinyproxy(tmp_path, connect_ports=[hub.ws_port]) as p:
            connector = ws_connector(hub.ws_port, proxy=SimpleNamespace(url=p.url))
            with pytest.raises(DialError) as info:
                await dial_connector(connector, profile(trusted))
    failure = info.value.failures[0]
    assert failure.reason == "certificate_verify_failed"
    assert "certificate verification failed" in failure.detail
    assert "was issued by '" in failure.detail
    assert "add that CA's certificate (PEM) to tls_profiles.hub.ca_file" in failure.detail


async def test_upgrade_refused_is_a_connector_error(keys: dict[str, str]) -> None:
    with HubSim(keys, hub_host=HUB, amqp_port=None, ws_port=0) as mqtt_only:
        with trio.fail_after(WAIT), pytest.raises(DialError) as info:
            await dial_connector(
                ws_connector(mqtt_only.ws_port, protocol="amqp"), profile(mqtt_only.ca_file)
            )
    mqtt_only.close()
    failure = info.value.failures[0]
    assert failure.reason == "websocket_refused"
    assert "refused: HTTP 400" in failure.detail


async def test_env_proxy_honours_no_proxy() -> None:
    direct_calls: list[Any] = []

    async def direct(endpoint: Any, timeout: float) -> Any:
        direct_calls.append(endpoint)
        raise ProxyConnectError("refused", "direct")

    connector = SimpleNamespace(proxy="env")
    env = {"HTTPS_PROXY": "http://127.0.0.1:1", "NO_PROXY": ".internal"}
    opener = proxy_tcp_opener(connector, direct, env)
    assert opener is not None
    with pytest.raises(ProxyConnectError, match="direct"):
        await opener(SimpleNamespace(host="hub.internal", port=443), 5)
    assert len(direct_calls) == 1
    with pytest.raises(ProxyConnectError) as info:
        await opener(SimpleNamespace(host="hub.azure-devices.net", port=443), 5)
    assert "connect to proxy 127.0.0.1:1 failed" in info.value.detail
    assert proxy_tcp_opener(SimpleNamespace(proxy=None), direct) is None
    assert proxy_tcp_opener(SimpleNamespace(proxy="none"), direct) is None


@needs_squid
async def test_amqp_header_over_websockets_through_squid_with_auth(
    hub: HubSim, tmp_path: Path
) -> None:
    secret = tmp_path / "proxy-password"
    secret.write_text("s3cret\n")
    with trio.fail_after(WAIT):
        async with squid(tmp_path, connect_ports=[hub.ws_port], auth=("gw", "s3cret")) as p:
            proxy = SimpleNamespace(url=p.url, username="gw", password_file=secret)
            connector = ws_connector(hub.ws_port, protocol="amqp", proxy=proxy)
            stream, report = await dial_connector(connector, profile(hub.ca_file))
            assert stream.subprotocol == "AMQPWSB10"
            await stream.send_all(b"AMQP\x03\x01\x00\x00")
            assert await receive_exactly(stream, 8) == b"AMQP\x03\x01\x00\x00"
            await stream.aclose()


@needs_squid
async def test_mqtt_over_websockets_through_squid(
    hub: HubSim, keys: dict[str, str], tmp_path: Path
) -> None:
    with trio.fail_after(WAIT):
        async with squid(tmp_path, connect_ports=[hub.ws_port]) as p:
            connector = ws_connector(hub.ws_port, proxy=SimpleNamespace(url=p.url))
            stream, _ = await dial_connector(connector, profile(hub.ca_file))
            await publish_through(stream, keys)
            assert (await d2c(hub)).raw == b"via ws"
            await stream.aclose()


@needs_squid
async def test_squid_refusals(hub: HubSim, tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        async with squid(tmp_path, connect_ports=[443], auth=("gw", "s3cret")) as p:
            connector = ws_connector(hub.ws_port, proxy=SimpleNamespace(url=p.url))
            with pytest.raises(DialError) as info:
                await dial_connector(connector, profile(hub.ca_file))
    failure = info.value.failures[0]
    # squid checks the port before asking for credentials.
    assert failure.reason == "proxy_refused"
    assert "HTTP/1.1 403 Forbidden" in failure.detail
