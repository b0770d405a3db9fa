"""Dialling a connector: endpoints in order, every address of each, TLS per endpoint.

Real loopback sockets throughout (several 127.x addresses). Names that must
resolve to several addresses, or to different ones between connects, go
through a resolver installed at trio's getaddrinfo seam
(`trio.socket.set_custom_hostname_resolver`); numeric hosts never reach it.
"""

from __future__ import annotations

import socket
import ssl
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trustme

from gateway.net import dial
from gateway.net.dial import (
    DialError,
    DialReport,
    Endpoint,
    connector_endpoints,
    dial_budget,
    dial_connector,
)
from gateway.net.hooks import set_dial_hook
from gateway.net.pool import ConnectorPool
from gateway.net.tls import TLSConnectError
from tests.waiting import FAILSAFE

WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)


class Resolver(trio.abc.HostnameResolver):
    """Names -> addresses, changeable between connects; counts lookups."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.lookups: list[str] = []

    async def getaddrinfo(self, host: Any, port: Any, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> list[Any]:  # fmt: skip
        name = host.decode() if isinstance(host, bytes) else host
        self.lookups.append(name)
        if name not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for address in self.names[name]:
            if ":" in address:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, int(port), 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port))))
        return out

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:
        raise NotImplementedError


def connector(hosts: list[str], port: int, **extra: Any) -> SimpleNamespace:
    endpoints = []
    for entry in hosts:
        host, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        endpoints.append(SimpleNamespace(host=host, port=int(entry_port or port)))
    fields = dict(name="hub", host=endpoints[0].host, port=port, endpoints=endpoints,
                  connect_timeout=WAIT, allow_plaintext=True)  # fmt: skip
    fields.update(extra)
    return SimpleNamespace(**fields)


def refusing(host: str) -> tuple[socket.socket, int]:
    """A bound, not listening port: connects to it are refused; keep the socket open."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    return sock, sock.getsockname()[1]


class Server:
    """Echo server on one loopback address; optional TLS; counts accepted connections."""

    def __init__(self, host: str, context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.context = context
        self.accepted = 0
        self.port = 0

    async def start(self, nursery: trio.Nursery, port: int = 0) -> Server:
        listeners = await trio.open_tcp_listeners(port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, self._handle, listeners)
        return self

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        peer: trio.abc.Stream = stream
        try:
            if self.context is not None:
                peer = trio.SSLStream(stream, self.context, server_side=True)
            async for data in peer:
                await peer.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass
        finally:
            await trio.aclose_forcefully(peer)


async def echo(stream: trio.abc.Stream) -> bytes:
    await stream.send_all(b"ping")
    with trio.fail_after(WAIT):
        return await stream.receive_some(100)


@pytest.fixture
def reports():
    seen: list[DialReport] = []
    token = set_dial_hook(seen.append)
    yield seen
    from gateway.net import hooks

    hooks._dial.reset(token)


# ------------------------------------------------------------------- endpoints


def test_endpoints_from_host_or_hosts():
    assert connector_endpoints(SimpleNamespace(host="h", port=5671)) == [Endpoint("h", 5671)]
    c = connector(["a", "b:5672"], 5671, connect_timeout=3.0)
    assert connector_endpoints(c) == [Endpoint("a", 5671), Endpoint("b", 5672)]
    assert dial_budget(c) == 6.0 + dial.DIAL_GRACE
    assert str(Endpoint("::1", 5671)) == "[::1]:5671"


# ----------------------------------------------------------------------- dials


async def test_dead_endpoint_skipped_live_one_used(nursery, reports):
    dead, dead_port = refusing("127.0.0.2")
    live = await Server("127.0.0.3").start(nursery)
    with dead:
        c = connector([f"127.0.0.2:{dead_port}", f"127.0.0.3:{live.port}"], 0)
        stream, report = await dial_connector(c, None)
        async with stream:
            assert await echo(stream) == b"ping"
    assert report.endpoint == Endpoint("127.0.0.3", live.port)
    assert report.address == "127.0.0.3"
    [skipped] = report.skipped
    assert str(skipped) == f"127.0.0.2:{dead_port}: connect refused (127.0.0.2)"
    assert skipped.reason == "refused"
    assert reports == [report]


async def test_every_endpoint_down_is_one_dial_error(reports):
    a, a_port = refusing("127.0.0.2")
    b, b_port = refusing("127.0.0.3")
    with a, b:
        c = connector([f"127.0.0.2:{a_port}", f"127.0.0.3:{b_port}"], 0)
        with pytest.raises(DialError) as info:
            await dial_connector(c, None)
    err = info.value
    assert isinstance(err, TLSConnectError) and err.reason == "refused"
    assert [f.endpoint.host for f in err.failures] == ["127.0.0.2", "127.0.0.3"]
    assert "connect refused (127.0.0.3)" in err.detail
    assert reports[-1].endpoint is None and len(reports[-1].skipped) == 2


async def test_unknown_name_is_a_dns_failure_then_next_endpoint(nursery):
    trio.socket.set_custom_hostname_resolver(Resolver({}))
    live = await Server("127.0.0.3").start(nursery)
    c = connector(["nowhere.invalid", "127.0.0.3"], live.port)
    stream, report = await dial_connector(c, None)
    await stream.aclose()
    assert [str(f) for f in report.skipped] == [f"nowhere.invalid:{live.port}: dns: name not found"]
    assert report.skipped[0].reason == "dns"


async def test_every_address_of_a_name_tried_in_order(nursery):
    """A name with a dead IPv6 and a dead IPv4 address before the live one."""
    live = await Server("127.0.0.4").start(nursery)
    with socket.socket(socket.AF_INET6) as hold6, socket.socket() as hold4:
        # Hold the live port on the dead addresses: bound, not listening = refused.
        hold6.bind(("::1", live.port))
        hold4.bind(("127.0.0.2", live.port))
        resolver = Resolver({"hub.test": ["::1", "127.0.0.2", "127.0.0.4"]})
        trio.socket.set_custom_hostname_resolver(resolver)
        stream, report = await dial_connector(connector(["hub.test"], live.port), None)
    async with stream:
        assert await echo(stream) == b"ping"
    assert report.endpoint == Endpoint("hub.test", live.port) and report.address == "127.0.0.4"
    assert report.skipped == []
    assert live.accepted == 1


async def test_a_name_with_no_live_address_reports_each_address(nursery):
    with socket.socket(socket.AF_INET6) as hold6, socket.socket() as hold4:
        hold6.bind(("::1", 0))
        port = hold6.getsockname()[1]
        hold4.bind(("127.0.0.2", port))
        trio.socket.set_custom_hostname_resolver(Resolver({"hub.test": ["::1", "127.0.0.2"]}))
        with pytest.raises(DialError) as info:
            await dial_connector(connector(["hub.test"], port), None)
    [failure] = info.value.failures
    assert failure.detail == "connect refused (::1); connect refused (127.0.0.2)"


async def test_name_resolved_again_on_every_connect(nursery):
    old = await Server("127.0.0.2").start(nursery)
    new = await Server("127.0.0.3").start(nursery, old.port)
    resolver = Resolver({"hub.test": ["127.0.0.2"]})
    trio.socket.set_custom_hostname_resolver(resolver)
    c = connector(["hub.test"], old.port)
    stream, first = await dial_connector(c, None)
    async with stream:
        assert await echo(stream) == b"ping"  # the server has seen it
    resolver.names["hub.test"] = ["127.0.0.3"]  # the hub moved (a failover)
    stream, second = await dial_connector(c, None)
    async with stream:
        assert await echo(stream) == b"ping"
    assert (first.address, second.address) == ("127.0.0.2", "127.0.0.3")
    assert resolver.lookups == ["hub.test", "hub.test"]
    assert (old.accepted, new.accepted) == (1, 1)


# ------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return SimpleNamespace(ca=ca, ca_file=ca_file)


def tls_server_context(pki: Any, *names: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pki.ca.issue_cert(*names).configure_cert(ctx)
    return ctx


def tls_profile(pki: Any, server_name: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(ca_file=pki.ca_file, cert_file=None, key_file=None,
                           server_name=server_name, min_version="1.2", ciphers=None)  # fmt: skip


async def test_certificate_checked_against_each_endpoint_host(nursery, pki):
    """The first endpoint's certificate is for another name: skipped, the second is used."""
    a = await Server("127.0.0.2", tls_server_context(pki, "hub-b.test")).start(nursery)
    b = await Server("127.0.0.3", tls_server_context(pki, "hub-b.test")).start(nursery, a.port)
    trio.socket.set_custom_hostname_resolver(
        Resolver({"hub-a.test": ["127.0.0.2"], "hub-b.test": ["127.0.0.3"]})
    )
    c = connector(["hub-a.test", "hub-b.test"], a.port, allow_plaintext=False)
    stream, report = await dial_connector(c, tls_profile(pki))
    async with stream:
        assert await echo(stream) == b"ping"
    assert report.endpoint == Endpoint("hub-b.test", a.port)
    [skipped] = report.skipped
    assert skipped.reason == "hostname_mismatch"
    assert skipped.detail.endswith("(127.0.0.2)")
    assert b.accepted == 1

    # A profile server_name is checked at every endpoint instead.
    stream, report = await dial_connector(c, tls_profile(pki, server_name="hub-b.test"))
    await stream.aclose()
    assert report.endpoint == Endpoint("hub-a.test", a.port) and report.skipped == []


async def test_plaintext_needs_allow_plaintext():
    c = connector(["127.0.0.2"], 1, allow_plaintext=False)
    with pytest.raises(TLSConnectError) as info:
        await dial_connector(c, None)
    assert not isinstance(info.value, DialError)


@pytest.fixture
def silent() -> Any:
    """A port on 127.0.0.5 whose accept queue is full: connects to it hang (SYNs dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.5", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.5", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    yield port
    for sock in [*fillers, listener]:
        sock.close()


async def test_a_silent_address_gets_its_share_then_the_next_is_tried(nursery, silent):
    with socket.socket() as probe:  # the fixture really makes connects hang
        probe.settimeout(0.2)
        with pytest.raises(TimeoutError):
            probe.connect(("127.0.0.5", silent))
    live = await Server("127.0.0.3").start(nursery, silent)
    trio.socket.set_custom_hostname_resolver(Resolver({"hub.test": ["127.0.0.5", "127.0.0.3"]}))
    # Half of connect_timeout for the silent address, the rest for the next one.
    stream, report = await dial_connector(connector(["hub.test"], silent, connect_timeout=2.0),
                                          None)  # fmt: skip
    async with stream:
        assert await echo(stream) == b"ping"
    assert (report.address, report.skipped, live.accepted) == ("127.0.0.3", [], 1)

    # A silent endpoint is skipped after connect_timeout.
    c = connector([f"127.0.0.5:{silent}", f"127.0.0.3:{silent}"], 0, connect_timeout=0.5)
    stream, report = await dial_connector(c, None)
    await stream.aclose()
    assert [(str(f), f.reason) for f in report.skipped] == [
        (f"127.0.0.5:{silent}: connect timeout (127.0.0.5)", "timeout")
    ]
    assert report.endpoint == Endpoint("127.0.0.3", silent)


async def test_ipv6_literal_endpoint(nursery):
    live = await Server("::1").start(nursery)
    dead, dead_port = refusing("::1")
    with dead:
        c = SimpleNamespace(name="hub", connect_timeout=WAIT, allow_plaintext=True, endpoints=[
            SimpleNamespace(host="::1", port=dead_port),
            SimpleNamespace(host="::1", port=live.port),
        ])  # fmt: skip
        stream, report = await dial_connector(c, None)
    async with stream:
        assert await echo(stream) == b"ping"
    assert str(report.endpoint) == f"[::1]:{live.port}" and report.address == "::1"
    assert [str(f) for f in report.skipped] == [f"[::1]:{dead_port}: connect refused (::1)"]


async def test_a_silent_address_is_cut_short_while_others_remain(nursery, silent, monkeypatch):
    """Each address but the last gets at most ADDRESS_TIMEOUT, however long connect_timeout."""
    monkeypatch.setattr(dial, "ADDRESS_TIMEOUT", 0.3)
    await Server("127.0.0.3").start(nursery, silent)
    trio.socket.set_custom_hostname_resolver(Resolver({"hub.test": ["127.0.0.5", "127.0.0.3"]}))
    started = trio.current_time()
    stream, report = await dial_connector(connector(["hub.test"], silent, connect_timeout=60.0),
                                          None)  # fmt: skip
    await stream.aclose()
    assert report.address == "127.0.0.3"
    assert trio.current_time() - started < 20.0  # an equal share would have been 30 s


async def test_rounds_in_order_with_the_pool_backoff_between(autojump_clock, reports):
    """Each connect tries every endpoint in order; the connector's backoff separates
    the rounds (mock clock; the opener stands in for the sockets)."""
    attempts: list[tuple[float, str]] = []

    async def opener(endpoint: Endpoint, timeout: float) -> tuple[trio.SocketStream, str]:
        attempts.append((trio.current_time(), endpoint.host))
        if endpoint.host == "silent.test":
            await trio.sleep(timeout)
            raise TLSConnectError("timeout", "connect timeout (10.0.0.2)")
        raise ConnectionRefusedError(111, "Connection refused")

    c = connector(["a.test", "silent.test", "c.test"], 5671, connect_timeout=10.0)

    async def connect(slot: int, on_up: Any) -> None:
        await dial_connector(c, None, tcp=opener)

    pool = ConnectorPool("hub", connect, max_connections=1, connect_timeout=dial_budget(c),
                         backoff_initial=1.0, backoff_max=4.0, on_demand=False,
                         rng=lambda: 1.0)  # fmt: skip
    async with trio.open_nursery() as n:
        await n.start(pool.run)
        await trio.sleep(60)
        n.cancel_scope.cancel()
    hosts = [host for _, host in attempts]
    rounds = len(hosts) // 3
    assert rounds >= 3 and hosts[: 3 * rounds] == ["a.test", "silent.test", "c.test"] * rounds
    starts = [at for at, host in attempts if host == "a.test"]
    # A round: a refused at once, silent.test's 10 s, c refused; then 1, 2, 4, 4 s of backoff.
    assert [round(b - a, 3) for a, b in zip(starts, starts[1:], strict=False)][:3] == [
        11.0,
        12.0,
        14.0,
    ]
    assert all(r.endpoint is None and len(r.skipped) == 3 for r in reports)
    assert [f.reason for f in reports[0].skipped] == ["refused", "timeout", "refused"]
