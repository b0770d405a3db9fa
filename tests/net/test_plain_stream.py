"""gateway.net.plain_stream.PlainStream against trio's own socket streams on loopback."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio
import trio.testing

from gateway.net.plain_stream import PlainStream
from tests.waiting import FAILSAFE

WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)


async def pair() -> tuple[PlainStream, trio.SocketStream]:
    """A PlainStream connected over loopback TCP to a trio.SocketStream."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        ours = await trio.open_tcp_stream("127.0.0.1", port)
        theirs = await listener.accept()
    return PlainStream.from_trio(ours), theirs


async def test_bytes_both_ways_arrive_unchanged():
    payload = os.urandom(3_000_000)  # more than the socket buffers hold: sends must wait
    ours, theirs = await pair()
    got_there = bytearray()
    got_back = bytearray()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:

            async def echo() -> None:
                while len(got_there) < len(payload):
                    data = await theirs.receive_some(100_000)
                    got_there.extend(data)
                    await theirs.send_all(data)

            async def read_back() -> None:
                while len(got_back) < len(payload):
                    data = await ours.receive_some(70_000)
                    assert 0 < len(data) <= 70_000
                    got_back.extend(data)

            nursery.start_soon(echo)
            nursery.start_soon(read_back)
            await ours.send_all(payload)
    assert bytes(got_there) == payload and bytes(got_back) == payload
    await ours.aclose()
    await theirs.aclose()


async def test_end_of_stream_and_send_eof():
    ours, theirs = await pair()
    with trio.fail_after(WAIT):
        await ours.send_all(b"last words")
        await ours.send_eof()
        got = b""
        while data := await theirs.receive_some():
            got += data
        assert got == b"last words"
        await theirs.aclose()
        assert await ours.receive_some() == b""
    await ours.aclose()


async def test_reset_by_peer_is_broken_with_os_error_cause():
    ours, theirs = await pair()
    # Linger on, zero seconds: close() sends a reset.
    theirs.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await theirs.aclose()
    with trio.fail_after(WAIT):
        with pytest.raises(trio.BrokenResourceError) as info:
            while await ours.receive_some():
                pass
    assert isinstance(info.value.__cause__, OSError)
    await ours.aclose()


async def test_aclose_wakes_a_blocked_reader_and_refuses_further_use():
    ours, theirs = await pair()
    outcome: list[BaseException] = []
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                try:
                    await ours.receive_some()
                except trio.ClosedResourceError as exc:
                    outcome.append(exc)

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await ours.aclose()
            await ours.aclose()  # twice is fine
    assert outcome
    with pytest.raises(trio.ClosedResourceError):
        await ours.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await ours.receive_some()
    await theirs.aclose()


async def test_two_receivers_at_once_is_an_error():
    ours, theirs = await pair()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ours.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await ours.receive_some()
            nursery.cancel_scope.cancel()
    await ours.aclose()
    await theirs.aclose()


async def test_each_call_is_a_checkpoint():
    ours, theirs = await pair()
    await theirs.send_all(b"ready")
    await trio.testing.wait_all_tasks_blocked()
    for call in (lambda: ours.send_all(b"x"), lambda: ours.receive_some()):
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await call()
    assert await ours.receive_some() == b"ready"  # nothing was consumed by the cancelled call
    await ours.aclose()
    await theirs.aclose()
