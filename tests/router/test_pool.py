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
        try:
            await end.wait()
        finally:
            if self.live.get(slot_id) is end:
                del self.live[slot_id]

    def drop(self, slot_id: int) -> None:
        self.live.pop(slot_id).set()

    def drop_all(self) -> None:
        for slot_id in list(self.live):
            self.drop(slot_id)


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


async def ask_every(pool: ConnectorPool, period: float) -> None:
    """A device that keeps asking for a connection (an SDK retrying its attach)."""
    while True:
        try:
            (await pool.acquire("asker")).release()
        except PoolUnavailable:
            pass
        await trio.sleep(period)


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
        assert pool.backing_off and not pool.usable
        n.start_soon(ask_every, pool, 0.5)  # retried while a device wants it
        await trio.sleep(30)
        gaps = [round(b - a, 2) for a, b in zip(hub.attempts, hub.attempts[1:], strict=False)]
        # each gap = backoff delay + the 0.01 s attempt itself
        assert gaps[:5] == [1.01, 2.01, 4.01, 8.01, 8.01]
        hub.fail = False
        await trio.sleep(9)
        assert pool.slots[0].state == SlotState.UP
        assert pool.usable and not pool.backing_off
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
        with pytest.raises(PoolUnavailable):  # its device asks again: it is wanted back
            await pool.acquire("d")
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


# ---- hub outages, idle connections (issue: connections multiplied and were kept) ----


async def test_hub_restarts_with_one_device_keep_one_connection(autojump_clock) -> None:
    """The hub goes away and comes back 10 times; a device holds a lease whenever it
    can and asks again every 0.2 s when it cannot. One connection, never more."""
    hub = FakeHub()
    most = 0

    async def device() -> None:
        while True:
            try:
                lease = await pool.acquire("d1")
            except PoolUnavailable:
                await trio.sleep(0.2)
                continue
            await lease.lost.wait()
            lease.release()

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, len(pool.slots), len(hub.live))
            await trio.sleep(0.05)

    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, max_connections=4, backoff_initial=0.5, backoff_max=4.0)
        n.start_soon(device)
        n.start_soon(watch)
        for _ in range(10):
            while not hub.live:  # up again, with the device on it
                await trio.sleep(0.1)
            hub.fail = True
            hub.drop_all()
            await trio.sleep(3)  # the outage
            hub.fail = False
        await trio.sleep(10)
        assert most == 1
        assert len(hub.live) == 1 and len(pool.slots) == 1
        assert sum(len(s.leases) for s in pool.slots) == 1
        n.cancel_scope.cancel()


async def test_no_new_connection_while_one_backs_off(autojump_clock) -> None:
    hub = FakeHub()
    hub.fail = True
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, max_connections=4, backoff_initial=1.0, backoff_max=8.0)
        n.start_soon(ask_every, pool, 0.1)
        for _ in range(300):
            await trio.sleep(0.1)
            assert len(pool.slots) <= 1
        # 30 s of backoff doubling from 1 s up to 8 s: a handful of attempts, not hundreds.
        assert 4 <= len(hub.attempts) <= 7
        n.cancel_scope.cancel()


async def test_connection_closed_after_idle_close(autojump_clock) -> None:
    hub = FakeHub()
    closed = []
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, idle_close=60.0, close=closed.append)
        lease = await pool.acquire("d1")
        await trio.sleep(100)  # in use: never idle
        lease.release()
        await trio.sleep(59)
        assert closed == [] and pool.usable
        again = await pool.acquire("d2")  # a device came back: the count starts again
        assert again.conn is lease.conn
        again.release()
        await trio.sleep(59)
        assert closed == []
        await trio.sleep(2)
        assert closed == [lease.conn]
        assert not pool.usable  # closing: not leased again
        hub.drop(0)  # the owner's close ends the connection
        await trio.sleep(0.001)
        assert pool.slots == [] and not pool.backing_off
        await trio.sleep(120)
        assert len(hub.attempts) == 1  # no reconnect
        n.cancel_scope.cancel()


async def test_idle_close_without_a_close_function_cancels_the_connection(autojump_clock) -> None:
    hub = FakeHub()
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, idle_close=5.0)
        (await pool.acquire("d1")).release()
        await trio.sleep(6)
        assert hub.live == {} and pool.slots == []
        n.cancel_scope.cancel()


async def test_no_device_no_retries(autojump_clock) -> None:
    hub = FakeHub()
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, backoff_initial=1.0, backoff_max=8.0, idle_close=600.0)
        await trio.sleep(60)
        assert hub.attempts == []  # on demand: nothing without a device
        (await pool.acquire("d1")).release()  # the device leaves...
        hub.fail = True
        hub.drop(0)  # ...and then the hub goes
        await trio.sleep(120)
        assert len(hub.attempts) == 1 and pool.slots == []
        # A device that asks once while the hub is down gets one attempt, and
        # its retry within the backoff one more; then nothing.
        with pytest.raises(PoolUnavailable):
            await pool.acquire("d2")
        with pytest.raises(PoolUnavailable):
            await pool.acquire("d2")
        await trio.sleep(120)
        assert len(hub.attempts) == 3 and pool.slots == []
        n.cancel_scope.cancel()


async def test_lost_connection_retried_for_its_devices_only(autojump_clock) -> None:
    """Devices on a lost connection are wanted back while they ask for it."""
    hub = FakeHub()
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, backoff_initial=1.0, backoff_max=1.0)
        lease = await pool.acquire("d1")
        hub.fail = True
        hub.drop(0)
        await lease.lost.wait()
        await trio.sleep(10)  # its device never asked again
        assert len(hub.attempts) == 1 and pool.slots == []
        n.cancel_scope.cancel()


async def test_idle_scale_leaves_no_connection_behind(autojump_clock) -> None:
    hub = FakeHub()
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, max_connections=4, max_devices_per_connection=2,
                                idle_close=60.0)  # fmt: skip
        leases = [await pool.acquire(i) for i in range(8)]
        assert len(hub.live) == 4
        for lease in leases:
            lease.release()
        await trio.sleep(61)
        assert hub.live == {} and pool.slots == []
        n.cancel_scope.cancel()


async def test_not_on_demand_keeps_one_connection(autojump_clock) -> None:
    hub = FakeHub()
    async with trio.open_nursery() as n:
        pool = await start_pool(n, hub, on_demand=False, max_devices_per_connection=1,
                                idle_close=10.0, backoff_initial=1.0, backoff_max=1.0)  # fmt: skip
        a = await pool.acquire("d1")
        b = await pool.acquire("d2")
        a.release()
        b.release()
        await trio.sleep(30)
        assert list(hub.live) == [0]  # the second one closed, the kept one stays
        hub.fail = True
        hub.drop(0)
        await trio.sleep(10)  # no device, still retried: it is the one kept
        assert len(hub.attempts) >= 10
        hub.fail = False
        await trio.sleep(2)
        assert list(hub.live) != [] and pool.usable
        n.cancel_scope.cancel()
