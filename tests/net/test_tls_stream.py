"""gateway.net.tls_stream.TLSStream against OpenSSL's server side (trio.SSLStream, stdlib ssl).

Each test runs a trio TLS server on 127.0.0.1:0 with trustme certificates and
connects with `open_tls_stream`; what the server receives is compared byte
for byte, and the ends of a connection (close_notify, a close without it, a
reset, a failed verification) must look as they do from trio.SSLStream.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Awaitable, Callable

import pytest
import trio
import trustme

from gateway.net.tls import strict_eof
from gateway.net.tls_stream import TLSStream, _eof_as_such, open_tls_stream
from tests.waiting import FAILSAFE

WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)
HOST = "hub.example"

ServerHandler = Callable[[trio.SSLStream], Awaitable[None]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    strict_eof(ctx)
    ca.issue_cert(HOST).configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    strict_eof(ctx)  # as the gateway's own contexts (gateway.net.tls)
    ca.configure_trust(ctx)
    return ctx


async def serve(nursery: trio.Nursery, ctx: ssl.SSLContext, handler: ServerHandler) -> int:
    """Serve one connection with `handler` on its trio.SSLStream; returns the port."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]

    async def accept_one() -> None:
        tcp = await listener.accept()
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        try:
            await handler(stream)
        finally:
            await trio.aclose_forcefully(stream)

    nursery.start_soon(accept_one)
    return listener.socket.getsockname()[1]


async def serve_plain_listener(nursery: trio.Nursery) -> trio.SocketListener:
    """A listener that accepts nothing: the kernel completes the TCP handshake only."""
    return (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]


async def connect(port: int, ctx: ssl.SSLContext, name: str = HOST) -> TLSStream:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    return await open_tls_stream(tcp, ctx, name)


@pytest.mark.parametrize("tls_version", ["1.2", "1.3"])
async def test_bytes_both_ways_arrive_unchanged(ca, server_ctx, tls_version):
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    version = ssl.TLSVersion.TLSv1_2 if tls_version == "1.2" else ssl.TLSVersion.TLSv1_3
    ctx.minimum_version = ctx.maximum_version = version
    payload = os.urandom(300_000)
    received = bytearray()

    async def echo(stream: trio.SSLStream) -> None:
        while len(received) < len(payload):
            data = await stream.receive_some(70_000)
            assert data
            received.extend(data)
            await stream.send_all(data)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_ctx, echo)
            client = await connect(port, ctx)
            assert client.version() == f"TLSv{tls_version}"
            back = bytearray()

            async def reader() -> None:
                while len(back) < len(payload):
                    data = await client.receive_some(100_000)
                    assert data and len(data) <= 100_000
                    back.extend(data)

            nursery.start_soon(reader)
            for offset in range(0, len(payload), 4096):
                await client.send_all(payload[offset : offset + 4096])
            while len(back) < len(payload):
                await trio.sleep(0.001)
            await client.aclose()
            nursery.cancel_scope.cancel()
    assert bytes(received) == payload
    assert bytes(back) == payload


async def test_records_already_received_come_in_one_read(server_ctx, client_ctx):
    """Many small records written back to back are returned by one receive_some."""
    sent = trio.Event()
    records = [bytes([i]) * 20 for i in range(50)]

    async def burst(stream: trio.SSLStream) -> None:
        await stream.do_handshake()
        for record in records:
            await stream.send_all(record)
        sent.set()
        await trio.sleep_forever()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_ctx, burst)
            client = await connect(port, client_ctx)
            await sent.wait()
            # The server's send_all returns once the kernel has the bytes; on
            # loopback they are readable by then.
            got = b""
            reads = 0
            while len(got) < 1000:
                got += await client.receive_some(65536)
                reads += 1
            assert got == b"".join(records)
            assert reads <= 2  # a read may race the last records into the socket
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_max_bytes_is_respected_and_nothing_is_lost(server_ctx, client_ctx):
    payload = os.urandom(50_000)

    async def send(stream: trio.SSLStream) -> None:
        await stream.send_all(payload)
        await trio.sleep_forever()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_ctx, send)
            client = await connect(port, client_ctx)
            got = bytearray()
            while len(got) < len(payload):
                data = await client.receive_some(1000)
                assert 0 < len(data) <= 1000
                got.extend(data)
            assert bytes(got) == payload
            await client.aclose()
            nursery.cancel_scope.cancel()


async def test_close_notify_reads_as_end_of_stream(server_ctx, client_ctx):
    async def hello_then_close(stream: trio.SSLStream) -> None:
        await stream.send_all(b"bye")
        await stream.aclose()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_ctx, hello_then_close)
            client = await connect(port, client_ctx)
            got = b""
            while True:
                data = await client.receive_some()
                if not data:
                    break
                got += data
            assert got == b"bye"
            assert await client.receive_some() == b""
            await client.aclose()


async def test_close_without_close_notify_is_broken_with_ssl_eof_cause(server_ctx, client_ctx):
    async def hello_then_drop(stream: trio.SSLStream) -> None:
        await stream.send_all(b"partial")
        await stream.transport_stream.aclose()  # no close_notify

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_ctx, hello_then_drop)
            client = await connect(port, client_ctx)
            got = b""
            with pytest.raises(trio.BrokenResourceError) as info:
                while True:
                    got += await client.receive_some()
            assert got == b"partial"
            assert isinstance(info.value.__cause__, ssl.SSLEOFError)
            with pytest.raises(trio.BrokenResourceError):
                await client.receive_some()
            await client.aclose()


def test_unexpected_eof_reason_reads_as_ssl_eof_error():
    # What Python 3.11.2 (Debian 12's) raises for a cut without close_notify; later versions
    # raise SSLEOFError themselves, so the test above cannot show this conversion there.
    plain = ssl.SSLError(1, "[SSL: UNEXPECTED_EOF_WHILE_READING] unexpected eof while reading")
    plain.reason = "UNEXPECTED_EOF_WHILE_READING"
    eof = _eof_as_such(plain)
    assert isinstance(eof, ssl.SSLEOFError) and eof.__cause__ is plain
    other = ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC]")
    other.reason = "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"
    assert _eof_as_such(other) is other


async def test_untrusted_certificate_fails_the_handshake(server_ctx):
    other = ssl.create_default_context()
    trustme.CA().configure_trust(other)
    server_saw: list[BaseException] = []

    async def handshake(stream: trio.SSLStream) -> None:
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            server_saw.append(exc)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_ctx, handshake)
            with pytest.raises(trio.BrokenResourceError) as info:
                await connect(port, other)
            assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert server_saw, "the hub should see the handshake fail (an alert), not hang"


async def test_wrong_host_name_fails_the_handshake(server_ctx, client_ctx):
    async def handshake(stream: trio.SSLStream) -> None:
        with pytest.raises(trio.BrokenResourceError):
            await stream.do_handshake()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_ctx, handshake)
            with pytest.raises(trio.BrokenResourceError) as info:
                await connect(port, client_ctx, name="other.example")
            cause = info.value.__cause__
            assert isinstance(cause, ssl.SSLCertVerificationError)
            assert cause.verify_code == 62  # X509_V_ERR_HOSTNAME_MISMATCH


async def test_peer_that_never_answers_the_handshake_is_cancellable(client_ctx):
    async with trio.open_nursery() as nursery:
        listener = await serve_plain_listener(nursery)
        port = listener.socket.getsockname()[1]
        with trio.move_on_after(0.2) as scope:
            await connect(port, client_ctx)
        assert scope.cancelled_caught
        nursery.cancel_scope.cancel()


async def test_aclose_wakes_a_blocked_reader_with_closed_resource(server_ctx, client_ctx):
    async def idle(stream: trio.SSLStream) -> None:
        await stream.do_handshake()
        await trio.sleep_forever()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_ctx, idle)
            client = await connect(port, client_ctx)
            outcome: list[BaseException] = []

            async def reader() -> None:
                try:
                    await client.receive_some()
                except trio.ClosedResourceError as exc:
                    outcome.append(exc)

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()
            await client.aclose()  # closing twice is fine
            await trio.testing.wait_all_tasks_blocked()
            assert outcome
            with pytest.raises(trio.ClosedResourceError):
                await client.send_all(b"x")
            nursery.cancel_scope.cancel()


async def test_reset_by_peer_is_broken_with_os_error_cause(server_ctx, client_ctx):
    async def reset(stream: trio.SSLStream) -> None:
        await stream.do_handshake()
        sock = stream.transport_stream.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_ctx, reset)
            client = await connect(port, client_ctx)
            with pytest.raises(trio.BrokenResourceError) as info:
                while True:
                    await client.receive_some()
            assert isinstance(info.value.__cause__, OSError | ssl.SSLError)
            await client.aclose()


async def test_each_call_is_a_checkpoint(server_ctx, client_ctx):
    """receive_some and send_all yield even when no waiting was needed."""

    async def echo(stream: trio.SSLStream) -> None:
        while data := await stream.receive_some():
            await stream.send_all(data)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, server_ctx, echo)
            client = await connect(port, client_ctx)
            with trio.CancelScope() as scope:
                scope.cancel()
                with pytest.raises(trio.Cancelled):
                    await client.send_all(b"x")
            with trio.CancelScope() as scope:
                scope.cancel()
                with pytest.raises(trio.Cancelled):
                    await client.receive_some()
            await client.aclose()
            nursery.cancel_scope.cancel()
