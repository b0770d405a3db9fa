"""FakeStore behaves like MessageStore where the relays can tell (same scenario, both)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from gateway.store import FakeStore, MessageStore, StoreFull, StoreUnavailable

from .conftest import Clock, message, store_config


@pytest.fixture(params=["sqlite", "fake"])
async def any_store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
) -> AsyncIterator[MessageStore | FakeStore]:
    config = store_config(tmp_path / "store.db", max_bytes="64KiB", device_share=0.5)
    opener = MessageStore.open if request.param == "sqlite" else FakeStore.open
    store = await opener(config, clock=clock)
    try:
        yield store
    finally:
        await store.aclose()


async def test_same_behaviour(any_store: MessageStore | FakeStore, clock: Clock) -> None:
    store = any_store
    seqs = [await store.append(**message("dev1", n, 1000)) for n in range(3)]
    clock.advance(5)
    await store.append(**message("dev2", 0, 1000, protocol="amqp", connector="hub-amqp"))
    assert seqs == sorted(seqs)
    assert store.backlog("dev1") == 3 and store.devices_waiting("mqtt") == ["dev1"]
    assert store.devices_waiting("amqp", "hub-amqp") == ["dev2"]
    peeked = await store.peek("dev1", 2)
    assert [m.seq for m in peeked] == seqs[:2]
    await store.delete([peeked[0].seq])
    await store.reject(peeked[1], "refused")
    assert store.backlog("dev1") == 1
    with pytest.raises(StoreFull) as info:
        for n in range(100):
            await store.append(**message("dev1", n, 1000))
    assert info.value.scope == "device_share"
    await store.put_meta("dev1", "k", b"v")
    assert await store.get_meta("dev1", "k") == b"v" and await store.get_meta("dev1", "x") is None
    store.record_replayed("hub-mqtt", "dev1", 2)
    stats = store.stats()
    assert stats.rejected == {"hub-mqtt": 1} and stats.replayed == {"hub-mqtt": 2}
    assert stats.refused == {"device_share": 1}
    assert stats.connectors["hub-amqp"].messages == 1
    assert stats.connectors["hub-amqp"].oldest_age == 0
    assert stats.devices["dev2"].messages == 1
    limiter = store.replay_limiter("hub-mqtt")
    assert limiter is store.replay_limiter("hub-mqtt")
    await limiter.acquire()
    clock.advance(8 * 86400)
    waiting = store.stats().messages
    assert waiting > 0 and await store.expire() == waiting
    assert store.stats().messages == 0
    await store.aclose()
    with pytest.raises(StoreUnavailable):
        await store.append(**message())


async def test_fake_knobs() -> None:
    store = FakeStore()
    store.fail_appends = StoreUnavailable("disk on fire", kind="io")
    with pytest.raises(StoreUnavailable):
        await store.append(**message())
    assert store.stats().errors == {"io": 1} and store.stats().refused == {"unavailable": 1}
    store.fail_appends = None
    store.hold_appends()
    done: list[int] = []

    async def send() -> None:
        done.append(await store.append(**message()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        assert done == [] and store.backlog("dev1") == 0
        store.release_appends()
    assert done == [1] and store.messages("dev1")[0].seq == 1
    assert [m.seq for m in store.appended_log] == [1]
    await store.delete([1])
    assert store.deleted_log == [1]
