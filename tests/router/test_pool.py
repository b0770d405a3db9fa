from __future__ import annotations

import pytest
import trio

from gateway.net.pool import Backoff, ConnectorPool, PoolUnavailable, SlotState


class FakeHub:
    """Scripted upstream: each connect attempt consults `plan`."""

    def __init__(self) -> None:
        self.attempts: list[float] = []
        self.fail = False
        self.hang = False
        self.live: dict[int, trio.Event] = {}
        self.opened = 0

    async def connect(self, slot_id: int, on_up) -> None:
        self.attempts.append(trio.current_time())
        await trio.sleep(0.01)
        if self.hang:
            await trio.sleep_forever()
        if self.fail:
            raise OSError("connection refused")
        self.opened += 1
        end = trio.Event()
        self.live[slot_id] = end
        on_up(("conn", slot_id, self.opened))
        await end.wait()

    def drop(self, slot_id: int) -> None:
        self.live.pop(slot_id).set()


class Recorder:
    def __init__(self) -> None:
        self.states: list[tuple[str, str]] = []
        self.reconnects = 0

    def on_connector_state(self, connector: str, state: str, detail: str) -> None:
        self.states.append((state, detail))

    def on_reconnect(self, connector: str) -> None:
        self.reconnects += 1


def test_backoff_grows_with_jitter_and_cap() -> None:
    b = Backoff(1.0, 30.0, rng=lambda: 1.0)
    assert [b.next_delay() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    b = Backoff(1.0, 30.0, rng=lambda: 0.0)
    assert [b.next_delay() for _ in range(3)] == [0.5, 1, 2]
    b.reset()
    assert b.next_delay() == 0.5
    b = Backoff(1.0, 30.0)
    for _ in range(100):
        assert 0.5 <= b.next_delay() <= 30


async def start_pool(nursery, hub: FakeHub, **kw) -> ConnectorPool:
    kw.setdefault("rng", lambda: 1.0)
    pool = ConnectorPool("iothub", hub.connect, **kw)
    await nursery.start(pool.run)
    return pool


async def test_on_demand_and_reuse(autojump_clock) -> None:
    hub = FakeHub()
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, max_connections=2, max_devices_per_connection=3)
        assert hub.attempts == []
        a = await pool.acquire("d1")
        b = await pool.acquire("d2")
        assert a.conn is b.conn and len(hub.attempts) == 1
        n.cancel_scope.cancel()


async def test_limits_spread_and_full(autojump_clock) -> None:
    hub = FakeHub()
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, max_connections=2, max_devices_per_connection=2)
        leases = [await pool.acquire(i) for i in range(4)]
        conns = {lease.conn for lease in leases}
        assert len(conns) == 2
        with pytest.raises(PoolUnavailable) as e:
            await pool.acquire("x")
        assert e.value.condition == "amqp:resource-limit-exceeded"
        leases[0].release()
        leases[0].release()  # idempotent
        again = await pool.acquire("y")
        assert again.conn is leases[0].conn
        n.cancel_scope.cancel()


async def test_concurrent_acquires_share_connecting_slot(autojump_clock) -> None:
    hub = FakeHub()
    got = []
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, max_connections=4, max_devices_per_connection=10)
        async def take(i: int) -> None:
            got.append(await pool.acquire(i))

        async with trio.open_nursery() as inner:
            for i in range(10):
                inner.start_soon(take, i)
        leases = got
        assert len({lease.conn for lease in leases}) == 1
        assert len(hub.attempts) == 1
        n.cancel_scope.cancel()


async def test_connect_failure_backoff_and_recovery(autojump_clock) -> None:
    hub = FakeHub()
    hub.fail = True
    rec = Recorder()
    async with trio.open_nursery() as n:
        pool = await start_pool(
            n, hub, max_connections=1, backoff_initial=1.0, backoff_max=8.0, observer=rec
        )
        with pytest.raises(PoolUnavailable) as e:
            await pool.acquire("d")
        assert "connection refused" in e.value.description
        # Backing off: fails fast, no new attempt.
        with pytest.raises(PoolUnavailable) as e:
            await pool.acquire("d")
        assert "retrying in" in e.value.description
        await trio.sleep(30)
        gaps = [round(b - a, 2) for a, b in zip(hub.attempts, hub.attempts[1:], strict=False)]
        # each gap = backoff delay + the 0.01 s attempt itself
        assert gaps[:5] == [1.01, 2.01, 4.01, 8.01, 8.01]
        hub.fail = False
        await trio.sleep(9)
        assert pool.slots[0].state == SlotState.UP
        lease = await pool.acquire("d")
        assert lease.valid
        assert rec.reconnects >= 5 and rec.states[-1][0] == "up"
        n.cancel_scope.cancel()


async def test_connect_timeout(autojump_clock) -> None:
    hub = FakeHub()
    hub.hang = True
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, max_connections=1, connect_timeout=5.0)
        t0 = trio.current_time()
        with pytest.raises(PoolUnavailable) as e:
            await pool.acquire("d")
        assert "connect timeout" in e.value.description
        assert 5.0 <= trio.current_time() - t0 <= 6.5
        n.cancel_scope.cancel()


async def test_loss_invalidates_leases_and_reconnects(autojump_clock) -> None:
    hub = FakeHub()
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, max_connections=1, backoff_initial=1.0)
        lease = await pool.acquire("d")
        first = lease.conn
        hub.drop(0)
        await lease.lost.wait()
        assert not lease.valid
        await trio.sleep(2)
        assert pool.slots[0].state == SlotState.UP
        again = await pool.acquire("d")
        assert again.conn is not first and again.generation == lease.generation + 1
        n.cancel_scope.cancel()


async def test_not_on_demand_connects_at_start(autojump_clock) -> None:
    hub = FakeHub()
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, on_demand=False)
        await trio.sleep(1)
        assert len(hub.attempts) == 1 and pool.slots[0].state == SlotState.UP
        n.cancel_scope.cancel()


async def test_acquire_before_run() -> None:
    pool = ConnectorPool("c", FakeHub().connect)
    with pytest.raises(PoolUnavailable):
        await pool.acquire()


async def test_retired_connection_leaves_the_pool(autojump_clock) -> None:
    hub = FakeHub()
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, max_connections=1, max_devices_per_connection=1)
        lease = await pool.acquire("d1")
        lease.retire()
        # Retired: not leased again, even before it closed.
        with pytest.raises(PoolUnavailable):
            await pool.acquire("d2")
        hub.drop(0)
        await trio.sleep(0.001)
        assert pool.slots == []
        # No backoff: the next device gets a fresh connection at once.
        again = await pool.acquire("d2")
        assert again.conn is not lease.conn and len(hub.attempts) == 2
        n.cancel_scope.cancel()


async def test_closed_pool_stops_reconnecting(autojump_clock) -> None:
    hub = FakeHub()
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, max_connections=1)
        await pool.acquire("d")
        pool.close()
        hub.drop(0)
        await trio.sleep(60)
        assert len(hub.attempts) == 1
        with pytest.raises(PoolUnavailable):
            await pool.acquire("d")
        n.cancel_scope.cancel()
