"""The shared listener: bind, admission (networks, connection limit), device TLS, isolation."""

from __future__ import annotations

import logging
import socket
import ssl
from ipaddress import ip_network

import pytest
import trio
import trustme

from gateway.config import parse_config_text
from gateway.net.listeners import ListenerSettings, ListenerStats, is_allowed, serve_listener
from gateway.net.tls import server_context
from tests.waiting import FAILSAFE

WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)


class Observer:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_device_connect(self, listener, protocol):
        self.events.append(("connect", listener, protocol))

    def on_device_disconnect(self, listener, protocol):
        self.events.append(("disconnect", listener, protocol))

    def on_device_refused(self, listener, reason):
        self.events.append(("refused", listener, reason))


class EchoHandler:
    """Echoes until EOF; `hold` keeps connections open until released."""

    def __init__(self, hold: bool = False) -> None:
        self.peers: list[tuple[str, int]] = []
        self.release = trio.Event()
        self.hold = hold
        self.active = 0
        self.changed = trio.Event()

    async def __call__(self, stream, peer):
        self.peers.append(peer)
        self.active += 1
        self._notify()
        try:
            if self.hold:
                await self.release.wait()
            while data := await stream.receive_some():
                if data == b"boom":
                    raise RuntimeError("handler bug")
                await stream.send_all(data)
        finally:
            self.active -= 1
            self._notify()

    def _notify(self):
        self.changed.set()
        self.changed = trio.Event()

    async def wait_active(self, n: int):
        with trio.fail_after(WAIT):
            while self.active != n:
                await self.changed.wait()


async def serve(nursery, handler, **settings):
    stats = ListenerStats()
    observer = Observer()
    options = dict(name="test", host="127.0.0.1", port=0, protocol="mqtt")
    options.update(settings)

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        await serve_listener(
            ListenerSettings(**options),
            handler,
            observer=observer,
            stats=stats,
            task_status=task_status,
        )

    bound = await nursery.start(run)
    return bound, stats, observer


async def echo_once(port: int, data: bytes = b"hello", host: str = "127.0.0.1") -> bytes:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(WAIT):
            return await stream.receive_some()


async def closed_without_reading(port: int) -> bool:
    """Connect and report whether the server closed on us straight away."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        with trio.fail_after(WAIT):
            try:
                return await stream.receive_some() == b""
            except trio.BrokenResourceError:
                return True  # reset: closed before reading our bytes


async def test_binds_port_zero_and_serves(nursery):
    handler = EchoHandler()
    bound, stats, observer = await serve(nursery, handler)
    [(host, port)] = bound
    assert host == "127.0.0.1" and port > 0
    assert await echo_once(port) == b"hello"
    assert handler.peers[0][0] == "127.0.0.1"
    await handler.wait_active(0)
    assert stats.accepted == 1 and stats.open == 0
    assert observer.events == [("connect", "test", "mqtt"), ("disconnect", "test", "mqtt")]


async def test_ipv6(nursery):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    handler = EchoHandler()
    bound, _, _ = await serve(nursery, handler, host="::1")
    assert bound[0][0] == "::1"
    assert await echo_once(bound[0][1], host="::1") == b"hello"
    assert handler.peers[0][0] == "::1"


async def test_max_connections(nursery):
    handler = EchoHandler(hold=True)
    bound, stats, observer = await serve(nursery, handler, max_connections=2)
    port = bound[0][1]
    held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
    await handler.wait_active(2)
    assert await closed_without_reading(port)
    assert stats.refused["max_connections"] == 1
    assert ("refused", "test", "max_connections") in observer.events
    handler.release.set()
    await held[0].aclose()
    await handler.wait_active(1)
    assert await echo_once(port) == b"hello"  # room again
    await held[1].aclose()


async def test_allowed_networks(nursery):
    handler = EchoHandler()
    bound, stats, _ = await serve(nursery, handler, allowed_networks=(ip_network("10.0.0.0/8"),))
    assert await closed_without_reading(bound[0][1])
    assert stats.refused["network"] == 1 and handler.peers == []
    handler2 = EchoHandler()
    bound2, _, _ = await serve(nursery, handler2, allowed_networks=(ip_network("127.0.0.0/8"),))
    assert await echo_once(bound2[0][1]) == b"hello"


def test_is_allowed():
    nets = [ip_network("192.168.1.0/24"), ip_network("fd00::/8")]
    assert is_allowed("192.168.1.20", nets)
    assert is_allowed("::ffff:192.168.1.20", nets)  # IPv4 peer on a dual-stack socket
    assert is_allowed("fd00::1", nets)
    assert not is_allowed("192.168.2.1", nets)
    assert not is_allowed("not-an-address", nets)
    assert is_allowed("203.0.113.9", [])


async def test_a_failing_handler_affects_no_one_else(nursery, caplog):
    caplog.set_level(logging.ERROR)
    handler = EchoHandler()
    bound, stats, _ = await serve(nursery, handler)
    port = bound[0][1]
    survivor = await trio.open_tcp_stream("127.0.0.1", port)
    await handler.wait_active(1)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"boom")
    with trio.fail_after(WAIT):
        assert await stream.receive_some() == b""
    await survivor.send_all(b"still")
    with trio.fail_after(WAIT):
        assert await survivor.receive_some() == b"still"
    assert stats.handler_errors == 1
    assert "handler bug" in caplog.text
    await survivor.aclose()


@pytest.fixture(scope="module")
def device_tls(tmp_path_factory):
    directory = tmp_path_factory.mktemp("device-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("gateway.local", "127.0.0.1")
    cert_file, key_file, ca_file = directory / "gw.pem", directory / "gw.key", directory / "ca.pem"
    cert_file.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    return ca, cert_file, key_file, ca_file


def tls_profile(cert_file, key_file):
    from types import SimpleNamespace

    return SimpleNamespace(
        ca_file=None,
        cert_file=cert_file,
        key_file=key_file,
        server_name=None,
        min_version="1.2",
        ciphers=None,
    )


async def test_device_side_tls(nursery, device_tls):
    ca, cert_file, key_file, _ = device_tls
    handler = EchoHandler()
    ctx = server_context(tls_profile(cert_file, key_file))
    bound, stats, _ = await serve(nursery, handler, ssl_context=ctx, tls_handshake_timeout=0.5)
    port = bound[0][1]
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, client_ctx, server_hostname="gateway.local")
    await tls.send_all(b"secret")
    with trio.fail_after(WAIT):
        assert await tls.receive_some() == b"secret"
    await tls.aclose()
    # A device speaking plaintext to a TLS listener, and one that says nothing: both refused.
    assert await closed_without_reading_after(port, b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")
    assert await closed_without_reading(port)
    assert stats.refused["tls_handshake"] == 2
    assert handler.peers and len(handler.peers) == 1


async def closed_without_reading_after(port: int, data: bytes) -> bool:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(WAIT):
            try:
                while await stream.receive_some():
                    pass  # the TLS alert, then EOF
            except trio.BrokenResourceError:
                pass
        return True


async def test_settings_from_config(nursery, device_tls, tmp_path):
    _, cert_file, key_file, _ = device_tls
    config = parse_config_text(
        f"""
admin: {{enabled: false}}
tls_profiles:
  devices: {{cert_file: {cert_file}, key_file: {key_file}}}
listeners:
  - name: mqtts
    protocol: mqtt
    bind: "127.0.0.1:0"
    tls_profile: devices
    max_connections: 7
    allowed_networks: ["127.0.0.0/8", "::1"]
    handshake_timeout: 3s
""",
        "t.yaml",
    )
    settings = ListenerSettings.from_config(config.listeners[0], config)
    assert (settings.name, settings.host, settings.port, settings.protocol) == (
        "mqtts",
        "127.0.0.1",
        0,
        "mqtt",
    )
    assert settings.max_connections == 7 and settings.tls_handshake_timeout == 3.0
    assert settings.allowed_networks == (ip_network("127.0.0.0/8"), ip_network("::1/128"))
    assert settings.ssl_context is not None
