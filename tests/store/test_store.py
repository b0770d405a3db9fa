"""MessageStore against real SQLite files: order, group commit, limits, expiry, restart,
and the failures it must survive (corrupt, locked, full disk)."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

import gateway.store.sqlite as sqlite_store
from gateway.config.store import StoreAndForwardSection
from gateway.store import MessageStore, StoreFull, StoreUnavailable

from .conftest import Clock, message, store_config


async def fill(store: MessageStore, device: str, count: int, size: int = 100) -> list[int]:
    return [await store.append(**message(device, n, size)) for n in range(count)]


async def test_appends_come_back_in_order_with_their_bytes(
    config: StoreAndForwardSection, clock: Clock
) -> None:
    store = await MessageStore.open(config, clock=clock)
    try:
        seqs = []
        for n in range(5):
            clock.advance(1)
            seqs.append(await store.append(**message("dev1", n)))
            seqs.append(await store.append(**message("dev2", n, protocol="amqp")))
        assert seqs == sorted(seqs) and len(set(seqs)) == 10
        assert store.backlog("dev1") == 5 and store.backlog("dev2") == 5
        assert store.backlog("nobody") == 0
        peeked = await store.peek("dev1", 3)
        assert [m.seq for m in peeked] == seqs[0:6:2]
        first = peeked[0]
        assert first.device == "dev1" and first.connector == "hub-mqtt" and first.protocol == "mqtt"
        assert first.address == "devices/dev1/messages/events/n=0"
        assert first.meta == b"\x01" and first.payload == message("dev1", 0)["payload"]
        assert first.stored_at == 1_700_000_001.0
        assert store.devices_waiting("mqtt") == ["dev1"]
        assert store.devices_waiting("amqp", "hub-mqtt") == ["dev2"]
        assert store.devices_waiting("amqp", "other") == []
        await store.delete([m.seq for m in peeked[:2]])
        assert store.backlog("dev1") == 3
        assert [m.seq for m in await store.peek("dev1", 10)] == seqs[4:10:2]
        assert await store.peek("dev1", 0) == []
        await store.delete([123456])  # unknown: ignored
        stats = store.stats()
        assert stats.messages == 8 and stats.appended == {"hub-mqtt": 10}
        # dev1's oldest is now its third message (stored at +3 s).
        assert stats.devices["dev1"].oldest_age == pytest.approx(clock.now - 1_700_000_003.0)
    finally:
        await store.aclose()


async def test_durable_settings(config: StoreAndForwardSection) -> None:
    store = await MessageStore.open(config)
    try:
        conn = store._conn
        assert conn is not None
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert (config.path.stat().st_mode & 0o077) == 0
    finally:
        await store.aclose()


async def test_group_commit_one_transaction_per_batch(tmp_path: Path) -> None:
    config = store_config(tmp_path / "store.db", batch_max=4)
    store = await MessageStore.open(config)
    statements: list[str] = []
    assert store._conn is not None
    store._conn.set_trace_callback(statements.append)
    held = threading.Event()
    release = threading.Event()

    def hold_first_commit() -> None:
        if not held.is_set():
            held.set()
            release.wait(60)

    store._before_commit = hold_first_commit
    try:
        seqs: dict[int, int] = {}
        called: list[int] = []

        async def send(n: int) -> None:
            called.append(n)
            seqs[n] = await store.append(**message("dev1", n))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, 0)
            await trio.to_thread.run_sync(held.wait, 60)
            # While the first commit is held, nine more arrive: they wait for the next ones.
            for n in range(1, 10):
                nursery.start_soon(send, n)
            await trio.testing.wait_all_tasks_blocked()
            assert len(store._queue) == 9
            release.set()
        assert store.commits == 4
        assert store.batch_sizes == [1, 4, 4, 1]
        assert [s for s in statements if s == "COMMIT"] == ["COMMIT"] * 4
        assert [seqs[n] for n in called] == sorted(seqs.values())  # order of the calls
        assert store.backlog("dev1") == 10
    finally:
        release.set()
        await store.aclose()


async def test_concurrent_appenders_share_fsyncs(config: StoreAndForwardSection) -> None:
    store = await MessageStore.open(config)
    try:
        async with trio.open_nursery() as nursery:
            for d in range(8):
                nursery.start_soon(fill, store, f"dev{d}", 25)
        assert store.stats().messages == 200
        assert store.commits < 200  # several appends per commit
        for d in range(8):
            payloads = [m.payload for m in await store.peek(f"dev{d}", 100)]
            assert payloads == [message(f"dev{d}", n)["payload"] for n in range(25)]
    finally:
        await store.aclose()


async def test_full_store_refuses_and_keeps_what_it_has(tmp_path: Path) -> None:
    config = store_config(tmp_path / "store.db", max_bytes="64KiB")
    store = await MessageStore.open(config)
    try:
        stored = 0
        with pytest.raises(StoreFull) as info:
            while True:
                await store.append(**message("dev1", stored, 1000))
                stored += 1
        assert info.value.scope == "full" and "store full" in info.value.reason
        assert stored == 64 * 1024 // (1000 + 64 + 4 + len("devices/dev1/messages/events/n=0") + 1) or stored > 50
        assert store.backlog("dev1") == stored
        assert store.stats().refused == {"full": 1}
        assert store.stats().bytes <= config.max_bytes
        # Room again after the hub took some.
        await store.delete([m.seq for m in await store.peek("dev1", 2)])
        await store.append(**message("dev1", 999, 1000))
        assert store.backlog("dev1") == stored - 1
    finally:
        await store.aclose()


async def test_device_share_keeps_room_for_the_others(tmp_path: Path) -> None:
    config = store_config(tmp_path / "store.db", max_bytes="64KiB", device_share=0.25)
    store = await MessageStore.open(config)
    try:
        flooded = 0
        with pytest.raises(StoreFull) as info:
            while True:
                await store.append(**message("flooder", flooded, 1000))
                flooded += 1
        assert info.value.scope == "device_share" and "flooder" in info.value.reason
        assert store.stats().devices["flooder"].bytes <= config.device_max_bytes
        await fill(store, "quiet", 10, 1000)  # others still get in
        assert store.stats().refused == {"device_share": 1}
    finally:
        await store.aclose()


async def test_expiry_with_a_mock_clock(
    config: StoreAndForwardSection, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    config = config.model_copy(update={"max_age": 3600.0})
    store = await MessageStore.open(config, clock=clock)
    try:
        await fill(store, "dev1", 3)
        clock.advance(1800)
        await fill(store, "dev1", 2)
        await fill(store, "dev2", 1)
        assert await store.expire() == 0
        clock.advance(1801)  # the first three are now older than an hour
        with caplog.at_level(logging.WARNING, "gateway.store"):
            assert await store.expire() == 3
        assert store.backlog("dev1") == 2 and store.backlog("dev2") == 1
        assert store.stats().expired == {"hub-mqtt": 3}
        assert store.stats().devices["dev1"].oldest_age == pytest.approx(1801)
        (line,) = [r.getMessage() for r in caplog.records if "expired" in r.getMessage()]
        assert line == "store: expired 3 messages older than max_age 3600s: dev1 (3)"
        clock.advance(3600)
        assert await store.expire() == 3
        assert store.stats().messages == 0 and store.stats().expired == {"hub-mqtt": 6}
    finally:
        await store.aclose()


async def test_periodic_expiry(config: StoreAndForwardSection, clock: Clock) -> None:
    store = await MessageStore.open(config.model_copy(update={"max_age": 10.0}), clock=clock)
    try:
        await fill(store, "dev1", 2)
        clock.advance(11)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: store.run(interval=0.01))
            with trio.fail_after(30):
                while store.backlog("dev1"):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert store.stats().expired == {"hub-mqtt": 2}
    finally:
        await store.aclose()


async def test_restart_rebuilds_the_counters(config: StoreAndForwardSection, clock: Clock) -> None:
    store = await MessageStore.open(config, clock=clock)
    await fill(store, "dev1", 5)
    clock.advance(10)
    await fill(store, "dev2", 3, 500)
    await store.append(**message("dev3/mod1", 0, protocol="amqp", connector="hub-amqp"))
    await store.delete([m.seq for m in await store.peek("dev1", 2)])
    await store.put_meta("dev1", "connect", b"\x10\x00template")
    before = store.stats()
    last = max(m.seq for m in await store.peek("dev2", 10))
    await store.aclose()
    assert not Path(f"{config.path}-wal").exists() or Path(f"{config.path}-wal").stat().st_size == 0

    store = await MessageStore.open(config, clock=clock)
    try:
        after = store.stats()
        assert after.messages == before.messages == 7
        assert after.bytes == before.bytes
        assert after.connectors == before.connectors
        assert after.devices == before.devices
        assert store.devices_waiting("amqp") == ["dev3/mod1"]
        assert await store.get_meta("dev1", "connect") == b"\x10\x00template"
        assert await store.get_meta("dev1", "other") is None
        seq = await store.append(**message("dev2", 99))
        assert seq > last  # never reused
    finally:
        await store.aclose()


async def test_totals_rebuilt_when_they_do_not_add_up(
    config: StoreAndForwardSection, caplog: pytest.LogCaptureFixture
) -> None:
    store = await MessageStore.open(config)
    await fill(store, "dev1", 4)
    await fill(store, "dev2", 2, 300)
    before = store.stats()
    await store.aclose()
    with sqlite3.connect(config.path) as conn:
        conn.execute("DELETE FROM lanes WHERE device = 'dev1'")
    with caplog.at_level(logging.WARNING, "gateway.store"):
        store = await MessageStore.open(config)
    try:
        assert "rebuilding the per-device totals from 6 messages" in caplog.text
        after = store.stats()
        assert after.bytes == before.bytes and after.connectors.keys() == before.connectors.keys()
        assert {d: (b.messages, b.bytes) for d, b in after.devices.items()} == {
            d: (b.messages, b.bytes) for d, b in before.devices.items()
        }
    finally:
        await store.aclose()


async def test_seq_not_reused_after_everything_was_deleted(config: StoreAndForwardSection) -> None:
    store = await MessageStore.open(config)
    seqs = await fill(store, "dev1", 3)
    await store.delete(seqs)
    await store.aclose()
    store = await MessageStore.open(config)
    try:
        assert await store.append(**message("dev1", 0)) > seqs[-1]
    finally:
        await store.aclose()


async def test_reject_deletes_counts_and_logs(
    config: StoreAndForwardSection, caplog: pytest.LogCaptureFixture
) -> None:
    store = await MessageStore.open(config)
    try:
        await fill(store, "dev1", 2)
        (first,) = await store.peek("dev1", 1)
        with caplog.at_level(logging.WARNING, "gateway.store"):
            await store.reject(first, "amqp:invalid-field: bad property")
        assert store.backlog("dev1") == 1 and store.stats().rejected == {"hub-mqtt": 1}
        (line,) = caplog.messages
        assert f"rejected message {first.seq} of dev1" in line
        assert "amqp:invalid-field: bad property" in line and "xxxx" not in line
        store.record_replayed("hub-mqtt", "dev1", 3)
        store.record_duplicate_suspect("hub-mqtt", "dev1")
        stats = store.stats()
        assert stats.replayed == {"hub-mqtt": 3} and stats.duplicates_suspected == {"hub-mqtt": 1}
    finally:
        await store.aclose()


async def test_cancelled_append_that_never_reached_a_batch(tmp_path: Path) -> None:
    store = await MessageStore.open(store_config(tmp_path / "store.db"))
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        if not held.is_set():
            held.set()
            release.wait(60)

    store._before_commit = hold
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fill, store, "dev1", 1)
            await trio.to_thread.run_sync(held.wait, 60)
            with trio.CancelScope() as scope:
                scope.cancel()
                await store.append(**message("dev2", 0))
            assert store._queue == [] and store._ledger.reserved_by_device["dev2"] == 0
            release.set()
        assert store.backlog("dev2") == 0 and store.backlog("dev1") == 1
        assert store._ledger.reserved == 0
    finally:
        release.set()
        await store.aclose()


async def test_closed_store_refuses(config: StoreAndForwardSection) -> None:
    store = await MessageStore.open(config)
    await store.aclose()
    await store.aclose()  # twice is fine
    with pytest.raises(StoreUnavailable) as info:
        await store.append(**message())
    assert info.value.kind == "closed"
    assert store.stats().state == "unavailable" and store.stats().refused == {"unavailable": 1}
    with pytest.raises(StoreUnavailable):
        await store.peek("dev1", 1)


# --- failures --------------------------------------------------------------------------------


async def test_corrupt_file_at_open(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 200)
    with pytest.raises(StoreUnavailable) as info:
        await MessageStore.open(store_config(path))
    assert info.value.kind == "corrupt"
    assert info.value.reason.startswith(f"store {path}: the database file is corrupt (")
    # The lock is released: once the file is moved aside, a new store opens.
    path.rename(tmp_path / "store.db.corrupt")
    store = await MessageStore.open(store_config(path))
    await store.aclose()


async def test_corrupt_pages_found_later_take_the_store_out_of_service(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = store_config(tmp_path / "store.db", max_bytes="16MiB")
    store = await MessageStore.open(config)
    await fill(store, "dev1", 300, 4000)
    await store.aclose()
    # Scribble over the middle of the table's pages.
    data = bytearray(config.path.read_bytes())
    page = 4096
    for offset in range(4 * page, len(data) - page, 7 * page):
        data[offset : offset + page] = b"\xa5" * page
    config.path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, "gateway.store"):
        with pytest.raises(StoreUnavailable) as info:
            await MessageStore.open(config)
    assert info.value.kind == "corrupt"


async def test_a_store_out_of_service_holds_no_device_back(
    config: StoreAndForwardSection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Corruption found while running: the stored messages cannot be replayed until an
    operator recovers the file, so no device waits behind them (the relays keep a device
    with a backlog answered locally, which would refuse it for good with the hub up)."""
    store = await MessageStore.open(config)
    try:
        await fill(store, "dev1", 5, 100)

        def malformed(*args: object) -> None:
            raise sqlite3.DatabaseError("database disk image is malformed")

        monkeypatch.setattr(store, "_peek_sync", malformed)
        with pytest.raises(StoreUnavailable) as info:
            await store.peek("dev1", 5)
        assert info.value.kind == "corrupt" and not store.available
        assert store.backlog("dev1") == 0
        assert store.devices_waiting("mqtt") == []
        # Operations still see what the file holds.
        stats = store.stats()
        assert stats.state == "unavailable" and stats.messages == 5
    finally:
        await store.aclose()


async def test_second_gateway_on_the_same_file_is_refused(config: StoreAndForwardSection) -> None:
    store = await MessageStore.open(config)
    try:
        with pytest.raises(StoreUnavailable) as info:
            await MessageStore.open(config)
        assert info.value.kind == "locked" and "another gateway" in info.value.reason
        assert store.available
        await store.append(**message())
    finally:
        await store.aclose()


async def test_database_locked_by_another_process(
    config: StoreAndForwardSection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT", 0.05)
    store = await MessageStore.open(config)
    other = sqlite3.connect(config.path, isolation_level=None, timeout=0)
    try:
        await store.append(**message("dev1", 0))
        other.execute("BEGIN EXCLUSIVE")
        with caplog.at_level(logging.ERROR, "gateway.store"):
            with pytest.raises(StoreUnavailable) as info:
                await store.append(**message("dev1", 1))
            with pytest.raises(StoreUnavailable):
                await store.append(**message("dev1", 2))
        assert info.value.kind == "locked"
        assert "the database is locked by another process" in info.value.reason
        assert len(caplog.records) == 1  # one line, not one per refusal
        stats = store.stats()
        assert stats.errors == {"locked": 2} and stats.refused == {"unavailable": 2}
        assert stats.state == "ok"  # a transient condition
        other.execute("ROLLBACK")
        await store.append(**message("dev1", 3))
        assert [m.address[-3:] for m in await store.peek("dev1", 5)] == ["n=0", "n=3"]
        assert store._ledger.reserved == 0
    finally:
        other.close()
        await store.aclose()


async def test_disk_full_refuses_and_recovers(config: StoreAndForwardSection) -> None:
    store = await MessageStore.open(config)
    try:
        await fill(store, "dev1", 3)
        conn = store._conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={pages}")  # the file may not grow: a full disk
        with pytest.raises(StoreUnavailable) as info:
            for n in range(3, 200):
                await store.append(**message("dev1", n, 4000))
        assert info.value.kind == "disk_full" and "the disk is full" in info.value.reason
        assert store.stats().errors == {"disk_full": 1} and store.available
        kept = store.backlog("dev1")
        assert len(await store.peek("dev1", 1000)) == kept  # nothing half-written
        conn.execute("PRAGMA max_page_count=1073741823")
        await store.append(**message("dev1", 999))
        assert store.backlog("dev1") == kept + 1
    finally:
        await store.aclose()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_really_full_disk(tiny_tmpfs: Path) -> None:
    config = store_config(tiny_tmpfs / "store.db", max_bytes="64MiB")
    store = await MessageStore.open(config)
    try:
        stored = 0
        with pytest.raises(StoreUnavailable) as info:
            while stored < 10_000:
                await store.append(**message("dev1", stored, 4000))
                stored += 1
        assert info.value.kind == "disk_full"
        assert store.backlog("dev1") == stored and len(await store.peek("dev1", 10_000)) == stored
        assert (tiny_tmpfs / "store.db.reserve").exists()
        # Whatever room is left, something else takes it.
        with open(tiny_tmpfs / "filler", "wb") as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\xff" * 65536)
                filler.flush()
        # The hub takes messages: their deletes are recorded even on the full disk
        # (the reserve file gives up its space if need be), so they are not sent again.
        while store.backlog("dev1"):
            await store.delete([m.seq for m in await store.peek("dev1", 100)])
        await store.append(**message("dev1", 0, 4000))  # room again: pages given back
        assert store.backlog("dev1") == 1 and (tiny_tmpfs / "store.db.reserve").exists()
    finally:
        await store.aclose()
    # And after a restart, the deletes are still there.
    store = await MessageStore.open(config)
    try:
        assert store.backlog("dev1") == 1
    finally:
        await store.aclose()


async def test_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreUnavailable) as info:
        await MessageStore.open(store_config(blocker / "store.db"))
    assert info.value.kind == "io" and str(blocker) in info.value.reason
