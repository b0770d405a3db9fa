"""TLS contexts from tls_profiles, and connect failures classified into short reasons.

The peer is the stdlib/OpenSSL server side driven by trio, with trustme certificates.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trustme

from gateway.config import parse_config_text
from gateway.net.dial import open_endpoint_stream
from gateway.net.tls import (
    ClientContextCache,
    TLSConnectError,
    classify_tls_error,
    client_context,
    server_context,
    server_name_for,
)
from tests.waiting import FAILSAFE

WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)


def profile(**fields):
    base = dict(
        ca_file=None,
        cert_file=None,
        key_file=None,
        server_name=None,
        min_version="1.2",
        ciphers=None,
    )
    base.update(fields)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("hub.example", "127.0.0.1")
    client = ca.issue_cert("device-gateway")
    files = SimpleNamespace(ca=ca, dir=directory)
    files.ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(files.ca_file))
    for name, cert in (("server", server), ("client", client)):
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_path))
        setattr(files, f"{name}_cert", cert_path)
        setattr(files, f"{name}_key", key_path)
    return files


class TLSServer:
    """A blocking stdlib TLS server on 127.0.0.1:0 in a thread; echoes one message.

    The stdlib server sends OpenSSL's alerts (unknown CA, protocol version) on a
    failed handshake the way real servers do.
    """

    def __init__(self, context: ssl.SSLContext | None, *, mode: str = "tls") -> None:
        self.context = context
        self.mode = mode  # tls | silent | garbage
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed: the test is over
            conn.settimeout(WAIT)
            if self.mode == "silent":
                self.held.append(conn)  # accepts TCP, never answers the handshake
                continue
            try:
                if self.mode == "garbage":
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                    continue
                assert self.context is not None
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(1024))
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def make_server_context(pki, *, require_client_cert=False, max_version=None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(pki.ca_file))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


@pytest.fixture
def servers():
    made: list[TLSServer] = []

    def make(context, **kwargs) -> TLSServer:
        server = TLSServer(context, **kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


async def connect(port, ctx, server_name, timeout=WAIT, host="127.0.0.1"):
    return await open_endpoint_stream(
        host, port, ssl_context=ctx, server_hostname=server_name, timeout=timeout
    )


async def failure(coro) -> TLSConnectError:
    with pytest.raises(TLSConnectError) as info:
        await coro
    return info.value


# -- contexts ------------------------------------------------------------------------------------


def test_client_context_defaults_verify_against_the_system_store():
    ctx = client_context(None, default_server_name="myhub.azure-devices.net")
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    if Path("/etc/ssl/certs").is_dir() and any(Path("/etc/ssl/certs").iterdir()):
        assert ctx.cert_store_stats()["x509_ca"] > 0


def test_client_context_with_a_ca_file_trusts_only_it(pki):
    ctx = client_context(profile(ca_file=pki.ca_file, min_version="1.3"))
    assert ctx.cert_store_stats()["x509_ca"] == 1
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3


def test_client_context_refuses_an_empty_server_name():
    with pytest.raises(ValueError):
        client_context(None, default_server_name="")


def test_client_context_ciphers_and_bad_version():
    ctx = client_context(profile(ciphers="ECDHE+AESGCM"))
    names = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert names and all("GCM" in n for n in names)
    with pytest.raises(ValueError):
        client_context(profile(min_version="1.0"))


def test_server_context(pki):
    with pytest.raises(ValueError):
        server_context(profile())
    plain = server_context(profile(cert_file=pki.server_cert, key_file=pki.server_key))
    assert plain.verify_mode == ssl.CERT_NONE
    mutual = server_context(
        profile(cert_file=pki.server_cert, key_file=pki.server_key, ca_file=pki.ca_file)
    )
    assert mutual.verify_mode == ssl.CERT_REQUIRED


def test_contexts_treat_a_cut_without_close_notify_as_an_error(pki):
    # Off whatever the interpreter's default (3.11.2, Debian 12's, turns it on).
    contexts = [
        client_context(None, default_server_name="myhub.azure-devices.net"),
        server_context(profile(cert_file=pki.server_cert, key_file=pki.server_key)),
    ]
    for ctx in contexts:
        assert not ctx.options & ssl.OP_IGNORE_UNEXPECTED_EOF


def test_server_name_for():
    connector = SimpleNamespace(host="myhub.azure-devices.net")
    assert server_name_for(connector, None) == "myhub.azure-devices.net"
    assert server_name_for(connector, profile()) == "myhub.azure-devices.net"
    assert server_name_for(connector, profile(server_name="other.example")) == "other.example"


def test_context_cache_shares_equal_profiles(pki):
    cache = ClientContextCache()
    a = cache.get(profile(ca_file=pki.ca_file))
    assert cache.get(profile(ca_file=str(pki.ca_file))) is a
    assert cache.get(profile(ca_file=pki.ca_file, min_version="1.3")) is not a


def test_config_profiles_work_unchanged(pki):
    config = parse_config_text(
        f"""
admin: {{enabled: false}}
tls_profiles:
  hub:
    ca_file: {pki.ca_file}
    cert_file: {pki.client_cert}
    key_file: {pki.client_key}
    server_name: hub.example
    min_version: "1.3"
connectors:
  - {{name: c, protocol: mqtt, host: 127.0.0.1, tls_profile: hub}}
""",
        "t.yaml",
    )
    tls_profile = config.tls_profiles["hub"]
    ctx = client_context(tls_profile, default_server_name="127.0.0.1")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert server_name_for(config.connectors[0], tls_profile) == "hub.example"


# -- connecting ----------------------------------------------------------------------------------


async def test_connects_and_verifies(servers, pki):
    server = servers(make_server_context(pki))
    stream = await connect(server.port, client_context(profile(ca_file=pki.ca_file)), "hub.example")
    await stream.send_all(b"ping")
    assert await stream.receive_some() == b"ping"
    await stream.aclose()


async def test_client_certificate_is_presented(servers, pki):
    server = servers(make_server_context(pki, require_client_cert=True))
    ctx = client_context(
        profile(ca_file=pki.ca_file, cert_file=pki.client_cert, key_file=pki.client_key)
    )
    stream = await connect(server.port, ctx, "hub.example")
    await stream.send_all(b"x")
    assert await stream.receive_some() == b"x"
    await stream.aclose()


async def test_plaintext_when_no_context(nursery):
    async def echo(stream):
        await stream.send_all(await stream.receive_some())

    listeners = await nursery.start(trio.serve_tcp, echo, 0)
    port = listeners[0].socket.getsockname()[1]
    stream = await connect(port, None, None)
    assert isinstance(stream, trio.SocketStream)
    await stream.send_all(b"clear")
    assert await stream.receive_some() == b"clear"
    await stream.aclose()


async def test_hostname_mismatch(servers, pki):
    server = servers(make_server_context(pki))
    err = await failure(
        connect(server.port, client_context(profile(ca_file=pki.ca_file)), "wrong.example")
    )
    assert err.reason == "hostname_mismatch" and "wrong.example" in err.detail


async def test_untrusted_certificate(servers, pki):
    server = servers(make_server_context(pki))
    err = await failure(connect(server.port, client_context(None), "hub.example"))
    assert err.reason == "certificate_verify_failed"


async def test_server_rejects_our_client_certificate(servers, pki, tmp_path):
    # A client certificate from a CA the server does not trust; TLS 1.2 so the
    # server's "unknown CA" alert arrives during the handshake.
    stranger = trustme.CA().issue_cert("device-gateway")
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    stranger.cert_chain_pems[0].write_to_path(str(cert))
    stranger.private_key_pem.write_to_path(str(key))
    ctx = make_server_context(pki, require_client_cert=True, max_version=ssl.TLSVersion.TLSv1_2)
    server = servers(ctx)
    client = client_context(profile(ca_file=pki.ca_file, cert_file=cert, key_file=key))
    err = await failure(connect(server.port, client, "hub.example"))
    assert err.reason == "peer_rejected_certificate", err.detail


async def test_server_requires_a_client_certificate_we_lack(servers, pki):
    ctx = make_server_context(pki, require_client_cert=True, max_version=ssl.TLSVersion.TLSv1_2)
    server = servers(ctx)
    err = await failure(
        connect(server.port, client_context(profile(ca_file=pki.ca_file)), "hub.example")
    )
    assert err.reason == "protocol"  # OpenSSL answers with a generic handshake_failure alert


async def test_version_too_old_for_our_minimum(servers, pki):
    ctx = make_server_context(pki, max_version=ssl.TLSVersion.TLSv1_2)
    server = servers(ctx)
    err = await failure(
        connect(
            server.port,
            client_context(profile(ca_file=pki.ca_file, min_version="1.3")),
            "hub.example",
        )
    )
    assert err.reason == "protocol"


async def test_not_tls_at_all(servers, pki):
    server = servers(None, mode="garbage")
    err = await failure(
        connect(server.port, client_context(profile(ca_file=pki.ca_file)), "hub.example")
    )
    assert err.reason in ("protocol", "closed")


async def test_handshake_timeout(servers, pki):
    server = servers(None, mode="silent")
    err = await failure(
        connect(
            server.port, client_context(profile(ca_file=pki.ca_file)), "hub.example", timeout=0.2
        )
    )
    assert err.reason == "timeout" and "TLS handshake" in err.detail


async def test_refused():
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        err = await failure(connect(port, None, None))
    assert err.reason == "refused"


async def test_dns_failure():
    err = await failure(connect(1, None, None, host="no-such-host.invalid"))
    assert err.reason == "dns"


def test_classify_plain_errors():
    assert classify_tls_error(trio.TooSlowError()) == "timeout"
    assert classify_tls_error(ConnectionResetError()) == "closed"
    assert classify_tls_error(OSError(113, "No route to host")) == "network"
    assert classify_tls_error(trio.BrokenResourceError()) == "closed"
    assert classify_tls_error(RuntimeError("?")) == "error"
