"""An in-memory store with the API of MessageStore, for the relays' unit tests.

Nothing touches disk and nothing is durable. Extras for tests: ``fail_appends``
(raise that error from every append), ``hold_appends`` (appends wait until
``release_appends()``), ``messages(device)`` and ``appended_log``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from gateway.store.errors import StoreError, StoreUnavailable
from gateway.store.ledger import Ledger
from gateway.store.limiter import RateLimiter
from gateway.store.types import StoredMessage, StoreStats, message_size

if TYPE_CHECKING:
    from gateway.config.store import StoreAndForwardSection


class FakeStore:
    """MessageStore's behaviour (order, limits, counters) without SQLite."""

    def __init__(
        self,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        device_share: float = 1.0,
        max_age: float = 7 * 86400.0,
        replay_rate: float = 1000.0,
        clock: Callable[[], float] = time.time,
        path: str = ":memory:",
    ) -> None:
        self.path = Path(path)
        self.max_age = max_age
        self.replay_rate = replay_rate
        self._clock = clock
        self._ledger = Ledger(max_bytes, max(1, int(max_bytes * device_share)))
        self._rows: dict[str, list[StoredMessage]] = {}
        self._meta: dict[tuple[str, str], bytes] = {}
        self._next_seq = 1
        self._limiters: dict[str, RateLimiter] = {}
        self._closed = False
        self.fail_appends: StoreError | None = None
        self._hold: trio.Event | None = None
        self.appended_log: list[StoredMessage] = []
        self.deleted_log: list[int] = []
        self.commits = 0

    @classmethod
    async def open(
        cls, config: StoreAndForwardSection, *, clock: Callable[[], float] = time.time
    ) -> FakeStore:
        return cls(
            max_bytes=config.max_bytes,
            device_share=config.device_share,
            max_age=config.max_age,
            replay_rate=config.replay_rate,
            clock=clock,
            path=str(config.path),
        )

    async def aclose(self) -> None:
        self._closed = True
        await trio.lowlevel.checkpoint()

    async def run(self, *, interval: float | None = None) -> None:
        while True:
            await trio.sleep(interval or 60.0)
            await self.expire()

    @property
    def available(self) -> bool:
        return not self._closed

    def _check(self) -> None:
        if self._closed:
            raise StoreUnavailable("store :memory:: the store is closed", kind="closed")

    # -- test knobs ---------------------------------------------------------------------------

    def hold_appends(self) -> None:
        """Appends wait (not yet 'on disk') until release_appends()."""
        self._hold = trio.Event()

    def release_appends(self) -> None:
        if self._hold is not None:
            self._hold.set()
            self._hold = None

    def messages(self, device: str) -> list[StoredMessage]:
        return list(self._rows.get(device, ()))

    # -- the API --------------------------------------------------------------------------------

    async def append(
        self,
        *,
        device: str,
        connector: str,
        protocol: str,
        address: str,
        meta: bytes,
        payload: bytes,
    ) -> int:
        await trio.lowlevel.checkpoint()
        if self._closed or self.fail_appends is not None:
            self._ledger.refused["unavailable"] += 1
            if self.fail_appends is not None:
                if isinstance(self.fail_appends, StoreUnavailable):
                    self._ledger.errors[self.fail_appends.kind] += 1
                raise self.fail_appends
            self._check()
        size = message_size(device, address, meta, payload)
        self._ledger.admit(device, size)
        try:
            if self._hold is not None:
                await self._hold.wait()
        except BaseException:
            self._ledger.release(device, size)
            raise
        self._ledger.release(device, size)
        msg = StoredMessage(
            self._next_seq, device, connector, protocol, address, bytes(meta), bytes(payload),
            self._clock(),
        )  # fmt: skip
        self._next_seq += 1
        self._rows.setdefault(device, []).append(msg)
        self._ledger.add(device, protocol, connector, size, msg.stored_at)
        self._ledger.appended[connector] += 1
        self.appended_log.append(msg)
        self.commits += 1
        return msg.seq

    def now(self) -> float:
        """The store's clock: the one `StoredMessage.stored_at` is read from."""
        return self._clock()

    def backlog(self, device: str) -> int:
        return self._ledger.backlog(device)

    def devices_waiting(self, protocol: str, connector: str | None = None) -> list[str]:
        return self._ledger.devices_waiting(protocol, connector)

    async def peek(
        self, device: str, limit: int, *, protocol: str | None = None
    ) -> list[StoredMessage]:
        await trio.lowlevel.checkpoint()
        self._check()
        rows = [m for m in self._rows.get(device, ()) if protocol in (None, m.protocol)]
        return rows[: max(0, limit)]

    async def delete(self, seqs: Sequence[int]) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        wanted = set(seqs)
        for device in list(self._rows):
            kept = []
            for msg in self._rows[device]:
                if msg.seq in wanted:
                    self._ledger.remove(device, msg.protocol, msg.connector, msg.size)
                    self.deleted_log.append(msg.seq)
                else:
                    kept.append(msg)
            if kept:
                self._rows[device] = kept
                self._ledger.set_oldest(device, kept[0].stored_at)
            else:
                del self._rows[device]

    async def reject(self, msg: StoredMessage, reason: str) -> None:
        await self.delete([msg.seq])
        self._ledger.rejected[msg.connector] += 1

    async def put_meta(self, device: str, key: str, value: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._check()
        self._meta[(device, key)] = bytes(value)

    async def get_meta(self, device: str, key: str) -> bytes | None:
        await trio.lowlevel.checkpoint()
        self._check()
        return self._meta.get((device, key))

    async def expire(self) -> int:
        await trio.lowlevel.checkpoint()
        cutoff = self._clock() - self.max_age
        expired = 0
        for device in list(self._rows):
            rows = self._rows[device]
            while rows and rows[0].stored_at < cutoff:
                msg = rows.pop(0)
                self._ledger.remove(device, msg.protocol, msg.connector, msg.size)
                self._ledger.expired[msg.connector] += 1
                expired += 1
            if rows:
                self._ledger.set_oldest(device, rows[0].stored_at)
            else:
                del self._rows[device]
        return expired

    def replay_limiter(self, connector: str) -> RateLimiter:
        limiter = self._limiters.get(connector)
        if limiter is None:
            limiter = self._limiters[connector] = RateLimiter(self.replay_rate)
        return limiter

    def record_replayed(self, connector: str, device: str, n: int = 1) -> None:
        self._ledger.replayed[connector] += n

    def record_duplicate_suspect(self, connector: str, device: str, n: int = 1) -> None:
        self._ledger.duplicates[connector] += n

    def stats(self) -> StoreStats:
        now = self._clock()
        ledger = self._ledger
        return ledger.stats(
            now,
            state="unavailable" if self._closed else "ok",
            reason="store :memory:: the store is closed" if self._closed else None,
            path=str(self.path),
            commits=self.commits,
            replay_rate=self.replay_rate,
            file_bytes=0,
        )
