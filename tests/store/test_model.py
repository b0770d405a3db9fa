"""Random sequences of append / peek / delete / restart against a plain model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.store import MessageStore, StoreFull

from .conftest import message, store_config

DEVICES = ("dev1", "dev2", "dev3/mod1")
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.sampled_from(DEVICES), st.integers(0, 3000)),
        st.tuples(st.just("peek"), st.sampled_from(DEVICES), st.integers(0, 6)),
        st.tuples(st.just("delete"), st.sampled_from(DEVICES), st.lists(st.integers(0, 5))),
        st.tuples(st.just("restart"), st.just(""), st.just(0)),
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None)
@given(OPS)
def test_store_matches_model(ops: list[tuple[str, str, object]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(_check, Path(tmp), ops)


async def _check(tmp: Path, ops: list[tuple[str, str, object]]) -> None:
    config = store_config(tmp / "store.db", max_bytes="64KiB", device_share=0.5)
    store = await MessageStore.open(config)
    model: dict[str, list[tuple[int, bytes]]] = {d: [] for d in DEVICES}
    last_seq = 0
    try:
        for n, (op, device, arg) in enumerate(ops):
            if op == "append":
                assert isinstance(arg, int)
                kwargs = message(device, n, arg)
                used = sum(len(p) + 64 + len(device) + 36 for _, p in model[device])
                try:
                    seq = await store.append(**kwargs)
                except StoreFull:
                    assert used + arg > config.device_max_bytes * 0.9 or (
                        store.stats().bytes + arg > config.max_bytes * 0.9
                    )
                    continue
                assert seq > last_seq
                last_seq = seq
                model[device].append((seq, kwargs["payload"]))
            elif op == "peek":
                assert isinstance(arg, int)
                got = await store.peek(device, arg)
                assert [(m.seq, m.payload) for m in got] == model[device][:arg]
            elif op == "delete":
                assert isinstance(arg, list)
                rows = model[device]
                picked = {rows[i][0] for i in arg if i < len(rows)}
                await store.delete(sorted(picked))
                model[device] = [r for r in rows if r[0] not in picked]
            else:
                await store.aclose()
                store = await MessageStore.open(config)
            for d in DEVICES:
                assert store.backlog(d) == len(model[d])
            stats = store.stats()
            assert stats.messages == sum(len(rows) for rows in model.values())
            assert stats.bytes == sum(s.bytes for s in stats.devices.values())
            assert set(stats.devices) == {d for d in DEVICES if model[d]}
        for d in DEVICES:
            got = await store.peek(d, 1000)
            assert [(m.seq, m.payload) for m in got] == model[d]
        # The persisted per-device totals agree with the messages themselves.
        conn = store._conn
        assert conn is not None
        lanes = conn.execute("SELECT device, protocol, connector, messages, bytes FROM lanes "
                             "ORDER BY 1, 2, 3").fetchall()  # fmt: skip
        counted = conn.execute("SELECT device, protocol, connector, count(*), sum(size) "
                               "FROM messages GROUP BY 1, 2, 3 ORDER BY 1, 2, 3").fetchall()  # fmt: skip
        assert lanes == counted
    finally:
        await store.aclose()
