"""EngineDriver (the trio pump of an AMQP engine) against python-qpid-proton.

The peer is proton's engine (Transport + Connection, no sockets of its own)
on the other end of an in-memory trio stream pair; time is trio's MockClock,
so idle timeouts and heartbeats are exercised in virtual time, and proton's
own ``tick`` judges whether our heartbeats came in time.
"""

from __future__ import annotations

from typing import Any

import proton
import pytest
import trio
import trio.testing

from gateway.amqp import Connection, RemoteOpen
from gateway.net.amqp_connector import EngineDriver

EMPTY_FRAME = b"\x00\x00\x00\x08\x02\x00\x00\x00"


class ProtonClient:
    """A proton client connection driven over one end of a trio stream."""

    def __init__(self, idle_timeout: float | None = None) -> None:
        self.conn = proton.Connection()
        self.conn.container = "proton-peer"
        self.transport = proton.Transport(proton.Transport.CLIENT)
        if idle_timeout is not None:
            self.transport.idle_timeout = idle_timeout
        self.transport.bind(self.conn)
        self.conn.open()
        self.received = bytearray()

    def output(self) -> bytes:
        out = bytearray()
        while (n := self.transport.pending()) > 0:
            out += self.transport.peek(n)
            self.transport.pop(n)
        return bytes(out)

    def push(self, data: bytes) -> None:
        self.received += data
        self.transport.push(data)

    @property
    def failed(self) -> Any:
        cond = self.transport.condition
        return cond.name if cond is not None else None


def serve(stream: trio.abc.Stream, *, idle_timeout: float | None,
          events: list[Any]) -> EngineDriver:  # fmt: skip
    engine = Connection("server", "gateway", idle_timeout=idle_timeout)
    engine.open()
    return EngineDriver(stream, engine, events.extend, name="d1")


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.mark.trio
async def test_heartbeats_keep_a_proton_peer_happy(autojump_clock: trio.testing.MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    events: list[Any] = []
    driver = serve(ours, idle_timeout=None, events=events)
    peer = ProtonClient(idle_timeout=1.0)  # proton wants a frame at least every second

    async def run_peer() -> None:
        start = trio.current_time()
        await theirs.send_all(peer.output())
        while trio.current_time() - start < 20.0:  # virtual seconds
            with trio.move_on_after(0.1):
                data = await theirs.receive_some(65536)
                assert data, "the gateway closed the connection"
                peer.push(data)
            peer.transport.tick(trio.current_time())
            assert peer.failed is None, f"proton gave up: {peer.failed}"
            out = peer.output()  # proton's own heartbeats, and nothing else
            if out:
                await theirs.send_all(out)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            await run_peer()
            nursery.cancel_scope.cancel()
    assert any(type(ev) is RemoteOpen for ev in events)
    # 20 s of silence from the application: heartbeats at least every 0.5 s.
    assert bytes(peer.received).count(EMPTY_FRAME) >= 20
    assert driver.error is None


@pytest.mark.trio
async def test_idle_timeout_closes_a_silent_peer(autojump_clock: trio.testing.MockClock) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    events: list[Any] = []
    driver = serve(ours, idle_timeout=2.0, events=events)
    peer = ProtonClient()
    await theirs.send_all(peer.output())  # header and open, then nothing at all
    with trio.fail_after(60):
        started = trio.current_time()
        await driver.run()
        elapsed = trio.current_time() - started
        await ours.aclose()  # as the listener does once the driver returns
        # proton reads our close with the error.
        while data := await theirs.receive_some(65536):
            peer.push(data)
    assert driver.error is not None
    assert str(driver.error.condition) == "amqp:resource-limit-exceeded"
    assert 2.0 <= elapsed < 3.0
    assert peer.conn.remote_condition is not None
    assert peer.conn.remote_condition.name == "amqp:resource-limit-exceeded"


@pytest.mark.trio
async def test_many_drivers_share_one_timer(autojump_clock: trio.testing.MockClock) -> None:
    """Idle deadlines of many connections fire each at its own time."""
    drivers = []
    async with trio.open_nursery() as nursery:
        for i in range(20):
            ours, theirs = trio.testing.memory_stream_pair()
            driver = serve(ours, idle_timeout=1.0 + i * 0.5, events=[])
            await theirs.send_all(ProtonClient().output())
            drivers.append((driver, theirs))

            async def run(driver: EngineDriver = driver) -> None:
                started = trio.current_time()
                await driver.run()
                driver.name = f"{trio.current_time() - started:.2f}"

            nursery.start_soon(run)
    for i, (driver, _) in enumerate(drivers):
        assert str(driver.error.condition) == "amqp:resource-limit-exceeded"
        assert 1.0 + i * 0.5 <= float(driver.name) < 1.0 + i * 0.5 + 1.0
