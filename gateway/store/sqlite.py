"""The message store on disk: stdlib sqlite3 in WAL mode, all disk work in one worker thread.

- Durability: ``synchronous=FULL`` in WAL mode, so a commit returned only after
  its WAL frames were fsynced; an acknowledged append survives SIGKILL and a
  power loss as far as SQLite and the disk promise.
- Group commit: ``append`` queues the message; whoever finds no commit running
  takes everything queued (up to ``batch_max``) into one transaction and one
  fsync. Appends arriving meanwhile form the next batch. Deletes after the
  hub's acknowledgement ride in the same batches.
- The event loop never waits on disk: every database call runs in a worker
  thread, one at a time (a capacity limiter of 1), over one connection.
- Memory: per-device aggregates only (see ledger.py), rebuilt at open with one
  aggregate query; messages are read from disk ``limit`` at a time.
- Errors: a corrupt database makes the store unavailable (every call raises
  StoreUnavailable); a locked database, a full disk or another I/O error fails
  the operation at hand and the store carries on. Each kind is counted and
  logged (once, then at most once a minute while it repeats).

The daemon runs ``await store.run()`` in a nursery for the periodic ``max_age``
expiry, and ``await store.aclose()`` at shutdown.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gateway.store.errors import ErrorKind, StoreError, StoreFull, StoreUnavailable
from gateway.store.ledger import Ledger
from gateway.store.limiter import RateLimiter
from gateway.store.types import StoredMessage, StoreStats, message_size

if TYPE_CHECKING:
    from gateway.config.store import StoreAndForwardSection

log = logging.getLogger("gateway.store")

SCHEMA_VERSION = 1
BUSY_TIMEOUT = 2.0  # seconds a locked database is waited for before the operation fails
CACHE_KIB = 4096  # SQLite page cache: bounds the memory a large backlog can take
EXPIRE_CHUNK = 1000
# Disk space held back in ``<path>.reserve`` (at most max_bytes / 8): released when the
# disk is full so the hub's acknowledgements can still be recorded (deletes need room).
RESERVE_BYTES = 2 * 1024 * 1024
ERROR_LOG_INTERVAL = 60.0

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        device TEXT NOT NULL,
        connector TEXT NOT NULL,
        protocol TEXT NOT NULL,
        address TEXT NOT NULL,
        meta BLOB NOT NULL,
        payload BLOB NOT NULL,
        stored_at REAL NOT NULL,
        size INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS messages_by_device ON messages (device, seq)",
    # Per device and lane totals, kept in the same transactions as the messages, so
    # opening a store reads this small table rather than every message.
    """CREATE TABLE IF NOT EXISTS lanes (
        device TEXT NOT NULL,
        protocol TEXT NOT NULL,
        connector TEXT NOT NULL,
        messages INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        PRIMARY KEY (device, protocol, connector)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS device_meta (
        device TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (device, key)
    )""",
)
_COLUMNS = "seq, device, connector, protocol, address, meta, payload, stored_at"


def classify(exc: BaseException, path: Path | str) -> StoreUnavailable:
    """A database or OS error as a StoreUnavailable with a kind and a one-line reason."""
    if isinstance(exc, StoreUnavailable):
        return exc
    kind: ErrorKind = "io"
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, sqlite3.Error):
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or (
            "malformed" in text or "not a database" in text
        ):
            kind = "corrupt"
        elif name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
            kind = "locked"
        elif name.startswith("SQLITE_FULL") or "disk is full" in text:
            kind = "disk_full"
    elif isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            kind = "disk_full"
        text = exc.strerror or text
    what = {
        "corrupt": "the database file is corrupt",
        "locked": "the database is locked by another process",
        "disk_full": "the disk is full",
        "io": "I/O error",
        "closed": "the store is closed",
    }[kind]
    return StoreUnavailable(f"store {path}: {what} ({text})", kind=kind)


# -- queued work ------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Op:
    taken: bool = False
    done: bool = False
    error: StoreError | None = None


@dataclass(slots=True, eq=False)
class _Append(_Op):
    row: tuple[Any, ...] = ()
    size: int = 0
    seq: int = 0


@dataclass(slots=True, eq=False)
class _Delete(_Op):
    seqs: tuple[int, ...] = ()
    removed: list[tuple[str, str, str, int]] = field(default_factory=list)


# -- the store --------------------------------------------------------------------------------


class MessageStore:
    """The store of SF-DESIGN: see the module docstring. Open with ``await MessageStore.open()``."""

    def __init__(self, config: StoreAndForwardSection, *, clock: Callable[[], float]) -> None:
        self.config = config
        self.path = Path(config.path)
        self._clock = clock
        self._ledger = Ledger(config.max_bytes, config.device_max_bytes)
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._queue: list[_Op] = []
        self._committing = False
        self._idle = trio.Event()
        self._next_seq = 1
        self._limiters: dict[str, RateLimiter] = {}
        self._unavailable: StoreUnavailable | None = None
        self._closed = False
        self._last_logged: dict[str, float] = {}
        self._file_bytes = 0
        self.commits = 0  # transactions committed (each one fsync of the WAL)
        self.batch_sizes: list[int] = []  # messages per group commit, the last 1000
        # Tests hold a commit here (it runs in the worker thread, inside the transaction).
        self._before_commit: Callable[[], None] | None = None

    # -- life ---------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, config: StoreAndForwardSection, *, clock: Callable[[], float] = time.time
    ) -> MessageStore:
        """Open (or create) the database and rebuild the counters from it.

        Raises StoreUnavailable (counted under ``errors``) if the file is corrupt,
        locked by another gateway, or cannot be created."""
        store = cls(config, clock=clock)
        try:
            await trio.to_thread.run_sync(store._open_sync, limiter=store._limiter)
        except Exception as exc:  # noqa: BLE001  # every failure is reported the same way
            error = classify(exc, store.path)
            store._close_sync_quietly()
            store._ledger.errors[error.kind] += 1
            raise error from None
        log.info(
            "store %s: %d messages waiting (%d bytes) from %d devices",
            store.path,
            store._ledger.messages,
            store._ledger.bytes,
            len(store._ledger.devices),
        )
        return store

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # One gateway per store file: a second one would interleave replays.
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreUnavailable(
                f"store {self.path}: the database is locked by another process "
                f"(another gateway has {lock_path} locked)",
                kind="locked",
            ) from None
        self._lock_fd = fd
        fresh = not self.path.exists()
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        self._conn = conn
        if fresh:
            os.chmod(self.path, 0o600)
        if fresh:
            # Free pages can be given back to the file system (see _room_for_appends);
            # only settable before the first table exists.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreUnavailable(
                f"store {self.path}: cannot use WAL mode (got {mode})", kind="io"
            )
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        conn.execute("PRAGMA temp_store=FILE")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"store {self.path}: written by a newer gateway (schema {version}, "
                f"this one knows {SCHEMA_VERSION})",
                kind="io",
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._load_lanes(conn)
        top = conn.execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),"
            " coalesce((SELECT max(seq) FROM messages), 0))"
        ).fetchone()[0]
        self._next_seq = int(top or 0) + 1
        self._update_file_bytes()
        if not self._ensure_reserve():
            log.warning("store %s: no room for the %d-byte reserve file on a full disk; "
                        "new messages are refused until there is", self.path,
                        self._reserve_size())  # fmt: skip

    def _load_lanes(self, conn: sqlite3.Connection) -> None:
        """The counters from the lanes table, each device's oldest time from the index;
        the table is rebuilt from the messages if it does not add up (a store written
        before it existed)."""
        lanes = conn.execute(
            "SELECT device, protocol, connector, messages, bytes FROM lanes"
        ).fetchall()
        counted = sum(row[3] for row in lanes)
        present = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        if counted != present:
            log.warning("store %s: rebuilding the per-device totals from %d messages",
                        self.path, present)  # fmt: skip
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM lanes")
                # One pass over the table: SQLite streams it, so memory stays flat.
                conn.execute(
                    "INSERT INTO lanes (device, protocol, connector, messages, bytes) "
                    "SELECT device, protocol, connector, count(*), sum(size) FROM messages "
                    "GROUP BY device, protocol, connector"
                )
                conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            lanes = conn.execute(
                "SELECT device, protocol, connector, messages, bytes FROM lanes"
            ).fetchall()
        oldest: dict[str, float] = {}
        for device, protocol, connector, count, size in lanes:
            if device not in oldest:
                row = conn.execute(
                    "SELECT stored_at FROM messages WHERE device = ? ORDER BY seq LIMIT 1",
                    (device,),
                ).fetchone()
                oldest[device] = row[0] if row else self._clock()
            self._ledger.load(device, protocol, connector, count, size, oldest[device])

    @staticmethod
    def _adjust_lanes(
        conn: sqlite3.Connection, rows: Iterable[tuple[str, str, str, int]], sign: int
    ) -> None:
        """Add (sign 1) or take away (sign -1) messages from the lanes table."""
        totals: dict[tuple[str, str, str], list[int]] = {}
        for device, protocol, connector, size in rows:
            entry = totals.setdefault((device, protocol, connector), [0, 0])
            entry[0] += 1
            entry[1] += size
        if not totals:
            return
        conn.executemany(
            "INSERT INTO lanes (device, protocol, connector, messages, bytes) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (device, protocol, connector) DO UPDATE SET "
            "messages = messages + excluded.messages, bytes = bytes + excluded.bytes",
            [(*key, sign * n, sign * b) for key, (n, b) in totals.items()],
        )
        if sign < 0:
            conn.execute("DELETE FROM lanes WHERE messages <= 0")

    async def aclose(self) -> None:
        """Finish the commit under way, checkpoint the WAL into the database, close."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._close_sync_quietly, limiter=self._limiter)
        for op in self._queue:
            op.error = StoreUnavailable(f"store {self.path}: the store is closed", kind="closed")
            op.done = True
        self._queue.clear()
        self._wake()

    def _close_sync_quietly(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    async def run(self, *, interval: float | None = None) -> None:
        """Expire messages older than ``max_age``, periodically, until cancelled."""
        if interval is None:
            interval = min(60.0, max(1.0, self.config.max_age / 10))
        while True:
            await trio.sleep(interval)
            with contextlib.suppress(StoreError):
                await self.expire()

    # -- state --------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._unavailable is None and not self._closed

    def _check(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"store {self.path}: the store is closed", kind="closed")
        if self._unavailable is not None:
            raise self._unavailable

    def _failed(self, error: StoreUnavailable) -> StoreUnavailable:
        """Count and log an error; a corrupt database takes the store out of service."""
        self._ledger.errors[error.kind] += 1
        if error.kind == "corrupt" and self._unavailable is None:
            self._unavailable = error
            log.error("%s; the store is out of service, live relaying carries on", error.reason)
            return error
        now = time.monotonic()
        last = self._last_logged.get(error.kind)
        if last is None or now - last >= ERROR_LOG_INTERVAL:
            self._last_logged[error.kind] = now
            log.error("%s", error.reason)
        return error

    # -- appending ----------------------------------------------------------------------------

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
        """Store one message; its seq once it is durably committed.

        StoreFull if there is no room (the whole store or the device's share);
        StoreUnavailable if the disk refused. Both are counted under ``refused``."""
        try:
            self._check()
        except StoreUnavailable:
            self._ledger.refused["unavailable"] += 1
            raise
        size = message_size(device, address, meta, payload)
        self._ledger.admit(device, size)  # StoreFull, counted
        op = _Append(
            row=(device, connector, protocol, address, bytes(meta), bytes(payload), self._clock()),
            size=size,
        )
        self._queue.append(op)
        try:
            await self._until_done(op)
        except BaseException:
            if not op.taken:
                self._queue.remove(op)
                self._ledger.release(device, size)
            raise
        if op.error is not None:
            self._ledger.refused["unavailable"] += 1
            raise op.error
        return op.seq

    async def delete(self, seqs: Sequence[int]) -> None:
        """Forget messages the hub accepted (unknown seqs are ignored)."""
        self._check()
        if not seqs:
            return
        op = _Delete(seqs=tuple(int(s) for s in seqs))
        self._queue.append(op)
        try:
            await self._until_done(op)
        except BaseException:
            if not op.taken:
                self._queue.remove(op)
            raise
        if op.error is not None:
            raise op.error

    async def reject(self, msg: StoredMessage, reason: str) -> None:
        """The hub refused a replayed message: delete it, count it, log it."""
        await self.delete([msg.seq])
        self._ledger.rejected[msg.connector] += 1
        log.warning(
            "store: the hub rejected message %d of %s (stored %s, %d bytes): %s; deleted",
            msg.seq,
            msg.device,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(msg.stored_at)),
            len(msg.payload),
            reason[:300],
        )

    async def _until_done(self, op: _Op) -> None:
        while not op.done:
            if self._committing:
                await self._idle.wait()
            else:
                await self._commit_batch()

    def _wake(self) -> None:
        idle, self._idle = self._idle, trio.Event()
        idle.set()

    async def _commit_batch(self) -> None:
        self._committing = True
        # Let the appenders woken by the previous commit queue their next messages
        # first, so they share this fsync instead of waiting for the one after.
        await trio.lowlevel.cancel_shielded_checkpoint()
        batch: list[_Op] = []
        appends = 0
        while self._queue and appends < self.config.batch_max:
            op = self._queue.pop(0)
            op.taken = True
            batch.append(op)
            if isinstance(op, _Append):
                op.seq = self._next_seq
                self._next_seq += 1
                appends += 1
        # Shielded: once taken, a batch's outcome must be recorded whatever happens
        # to the task that happens to run it.
        with trio.CancelScope(shield=True):
            try:
                if self._closed or self._conn is None:
                    raise StoreUnavailable(
                        f"store {self.path}: the store is closed", kind="closed"
                    )
                if self._unavailable is not None:
                    raise self._unavailable
                oldest = await trio.to_thread.run_sync(
                    self._write_sync, batch, limiter=self._limiter
                )
            except Exception as exc:  # noqa: BLE001  # reported to every op of the batch
                error = classify(exc, self.path)
                if error.kind != "closed":
                    self._failed(error)
                for op in batch:
                    op.error = error
            else:
                self._applied(batch, oldest)
                refused = next((op.error for op in batch if op.error is not None), None)
                if refused is not None:  # appends refused by a full disk, deletes done
                    self._failed(refused)
            finally:
                for op in batch:
                    op.done = True
                    if isinstance(op, _Append) and op.error is not None:
                        self._ledger.release(op.row[0], op.size)
                self._committing = False
                self._wake()

    def _write_sync(self, batch: list[_Op]) -> dict[str, float | None]:
        """One transaction for the batch (worker thread). On a full disk the appends are
        refused and the deletes still recorded, using the reserve file's space if need be:
        otherwise the hub's acknowledgements could not be recorded and every replayed
        message would be sent again and again."""
        appends = [op for op in batch if isinstance(op, _Append)]
        deletes = [op for op in batch if isinstance(op, _Delete)]
        if appends and not self._room_for_appends():
            self._refuse(appends, self._disk_full("no room left beside the reserve"))
            appends = []
        if not appends and not deletes:
            return {}
        try:
            return self._transaction(appends, deletes)
        except (sqlite3.Error, OSError) as exc:
            error = classify(exc, self.path)
            if error.kind != "disk_full" or not deletes:
                raise
            self._refuse(appends, error)
            self._release_reserve()
            return self._transaction([], deletes)

    @staticmethod
    def _refuse(appends: list[_Append], error: StoreUnavailable) -> None:
        for op in appends:
            op.error = error

    def _disk_full(self, detail: str) -> StoreUnavailable:
        return StoreUnavailable(f"store {self.path}: the disk is full ({detail})", kind="disk_full")

    def _transaction(
        self, appends: list[_Append], deletes: list[_Delete]
    ) -> dict[str, float | None]:
        conn = self._conn
        if conn is None:
            raise StoreUnavailable(f"store {self.path}: the store is closed", kind="closed")
        conn.execute("BEGIN IMMEDIATE")
        try:
            if appends:
                conn.executemany(
                    "INSERT INTO messages (seq, device, connector, protocol, address, meta, "
                    "payload, stored_at, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(op.seq, *op.row, op.size) for op in appends],
                )
                self._adjust_lanes(
                    conn, ((op.row[0], op.row[2], op.row[1], op.size) for op in appends), 1
                )
            touched: set[str] = set()
            for op in deletes:
                op.removed = self._delete_rows(conn, op.seqs)
                touched.update(row[0] for row in op.removed)
            # The new oldest time of devices whose first messages went (index lookups).
            oldest: dict[str, float | None] = {}
            for device in touched:
                row = conn.execute(
                    "SELECT stored_at FROM messages WHERE device = ? ORDER BY seq LIMIT 1",
                    (device,),
                ).fetchone()
                oldest[device] = None if row is None else row[0]
            if self._before_commit is not None:
                self._before_commit()
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._update_file_bytes()
        return oldest

    # -- the reserve: disk space kept back so deletes work on a full disk -------------------

    @property
    def _reserve_path(self) -> Path:
        return self.path.with_name(self.path.name + ".reserve")

    def _reserve_size(self) -> int:
        return max(64 * 1024, min(RESERVE_BYTES, self.config.max_bytes // 8))

    def _ensure_reserve(self) -> bool:
        """Create the reserve file if it is missing; False if the disk has no room for it."""
        path = self._reserve_path
        size = self._reserve_size()
        try:
            if path.stat().st_size >= size:
                return True
        except FileNotFoundError:
            pass
        try:
            with open(path, "wb") as handle:
                chunk = b"\0" * 65536
                for _ in range(0, size, len(chunk)):
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()
            return False
        return True

    def _release_reserve(self) -> None:
        with contextlib.suppress(OSError):
            self._reserve_path.unlink()

    def _room_for_appends(self) -> bool:
        """Appends may go ahead while the reserve is held, or can be made again (after
        giving the pages of deleted messages back to the file system)."""
        if self._ensure_reserve():
            return True
        conn = self._require_conn()
        # Pages of deleted messages go back to the file system, then try again.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA incremental_vacuum").fetchall()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return self._ensure_reserve()

    def _delete_rows(
        self, conn: sqlite3.Connection, seqs: Sequence[int]
    ) -> list[tuple[str, str, str, int]]:
        removed: list[tuple[str, str, str, int]] = []
        for start in range(0, len(seqs), 500):
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            removed.extend(
                conn.execute(
                    f"DELETE FROM messages WHERE seq IN ({marks}) "
                    "RETURNING device, protocol, connector, size",
                    chunk,
                ).fetchall()
            )
        self._adjust_lanes(conn, removed, -1)
        return removed

    def _rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    def _update_file_bytes(self) -> None:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{self.path}{suffix}").st_size
        self._file_bytes = total

    def _applied(self, batch: list[_Op], oldest: dict[str, float | None]) -> None:
        """A batch committed: bring the counters up to date (event loop thread)."""
        appends = sum(1 for op in batch if isinstance(op, _Append) and op.error is None)
        if appends or any(isinstance(op, _Delete) for op in batch):
            self.commits += 1
        if appends:
            self.batch_sizes.append(appends)
            del self.batch_sizes[:-1000]
        for op in batch:
            if isinstance(op, _Append) and op.error is None:
                device, connector, protocol = op.row[0], op.row[1], op.row[2]
                self._ledger.release(device, op.size)
                self._ledger.add(device, protocol, connector, op.size, op.row[6])
                self._ledger.appended[connector] += 1
            elif isinstance(op, _Delete):
                for device, protocol, connector, size in op.removed:
                    self._ledger.remove(device, protocol, connector, size)
        for device, when in oldest.items():
            self._ledger.set_oldest(device, when)

    # -- reading ------------------------------------------------------------------------------

    def now(self) -> float:
        """The store's clock: the one `StoredMessage.stored_at` is read from."""
        return self._clock()

    def backlog(self, device: str) -> int:
        """Messages waiting for this device (memory only, no disk). None once the store is
        out of service (corrupt): they cannot be replayed until the file is recovered, so
        no device is held in a local session behind them (stats() still counts them)."""
        if self._unavailable is not None:
            return 0
        return self._ledger.backlog(device)

    def devices_waiting(self, protocol: str, connector: str | None = None) -> list[str]:
        """Devices with messages of ``protocol`` (and ``connector``) waiting, the longest
        waiting first (memory only); none once the store is out of service."""
        if self._unavailable is not None:
            return []
        return self._ledger.devices_waiting(protocol, connector)

    async def peek(
        self, device: str, limit: int, *, protocol: str | None = None
    ) -> list[StoredMessage]:
        """Up to ``limit`` of the device's messages, oldest first (not removed)."""
        self._check()
        if limit <= 0 or not self._ledger.backlog(device):
            return []
        try:
            rows = await trio.to_thread.run_sync(
                self._peek_sync, device, limit, protocol, limiter=self._limiter
            )
        except Exception as exc:  # noqa: BLE001
            raise self._failed(classify(exc, self.path)) from None
        return [StoredMessage(*row) for row in rows]

    def _peek_sync(self, device: str, limit: int, protocol: str | None) -> list[tuple[Any, ...]]:
        conn = self._require_conn()
        if protocol is None:
            cursor = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE device = ? ORDER BY seq LIMIT ?",
                (device, limit),
            )
        else:
            cursor = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE device = ? AND protocol = ? "
                "ORDER BY seq LIMIT ?",
                (device, protocol, limit),
            )
        return cursor.fetchall()

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable(f"store {self.path}: the store is closed", kind="closed")
        return self._conn

    # -- per-device metadata ------------------------------------------------------------------

    async def put_meta(self, device: str, key: str, value: bytes) -> None:
        """Keep a small value for a device (e.g. its MQTT CONNECT), durably."""
        self._check()
        try:
            await trio.to_thread.run_sync(
                self._put_meta_sync, device, key, bytes(value), limiter=self._limiter
            )
        except Exception as exc:  # noqa: BLE001
            raise self._failed(classify(exc, self.path)) from None

    def _put_meta_sync(self, device: str, key: str, value: bytes) -> None:
        conn = self._require_conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO device_meta (device, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT (device, key) DO UPDATE SET value = excluded.value",
                (device, key, value),
            )
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    async def get_meta(self, device: str, key: str) -> bytes | None:
        self._check()
        try:
            row = await trio.to_thread.run_sync(
                self._get_meta_sync, device, key, limiter=self._limiter
            )
        except Exception as exc:  # noqa: BLE001
            raise self._failed(classify(exc, self.path)) from None
        return row

    def _get_meta_sync(self, device: str, key: str) -> bytes | None:
        row = (
            self._require_conn()
            .execute("SELECT value FROM device_meta WHERE device = ? AND key = ?", (device, key))
            .fetchone()
        )
        return None if row is None else bytes(row[0])

    # -- expiry -------------------------------------------------------------------------------

    async def expire(self) -> int:
        """Delete messages older than ``max_age`` now (counted by connector, one log line)."""
        self._check()
        cutoff = self._clock() - self.config.max_age
        due = [
            device
            for device, entry in self._ledger.devices.items()
            if entry.oldest is not None and entry.oldest < cutoff
        ]
        if not due:
            return 0
        try:
            removed, oldest = await trio.to_thread.run_sync(
                self._expire_sync, due, cutoff, limiter=self._limiter
            )
        except Exception as exc:  # noqa: BLE001
            raise self._failed(classify(exc, self.path)) from None
        self.commits += 1
        by_device: dict[str, int] = {}
        for device, protocol, connector, size in removed:
            self._ledger.remove(device, protocol, connector, size)
            self._ledger.expired[connector] += 1
            by_device[device] = by_device.get(device, 0) + 1
        for device, when in oldest.items():
            self._ledger.set_oldest(device, when)
        if removed:
            shown = ", ".join(f"{d} ({n})" for d, n in sorted(by_device.items())[:10])
            more = f" and {len(by_device) - 10} more" if len(by_device) > 10 else ""
            log.warning(
                "store: expired %d messages older than max_age %gs: %s%s",
                len(removed),
                self.config.max_age,
                shown,
                more,
            )
        return len(removed)

    def _expire_sync(
        self, devices: Iterable[str], cutoff: float
    ) -> tuple[list[tuple[str, str, str, int]], dict[str, float]]:
        conn = self._require_conn()
        removed: list[tuple[str, str, str, int]] = []
        oldest: dict[str, float] = {}
        conn.execute("BEGIN IMMEDIATE")
        try:
            for device in devices:
                # Oldest first by seq, stopping at the first young one: expiry removes
                # the head of a device's queue, never a hole in its order.
                while True:
                    rows = conn.execute(
                        "SELECT seq, stored_at FROM messages WHERE device = ? "
                        "ORDER BY seq LIMIT ?",
                        (device, EXPIRE_CHUNK),
                    ).fetchall()
                    old: list[int] = []
                    young: float | None = None
                    for seq, stored_at in rows:
                        if stored_at >= cutoff:
                            young = stored_at
                            break
                        old.append(seq)
                    if old:
                        removed.extend(self._delete_rows(conn, old))
                    if young is not None:
                        oldest[device] = young
                    if young is not None or len(rows) < EXPIRE_CHUNK:
                        break
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._update_file_bytes()
        return removed, oldest

    # -- replay helpers -----------------------------------------------------------------------

    def replay_limiter(self, connector: str) -> RateLimiter:
        """The token bucket replays to ``connector`` go through (one per connector)."""
        limiter = self._limiters.get(connector)
        if limiter is None:
            limiter = self._limiters[connector] = RateLimiter(self.config.replay_rate)
        return limiter

    def record_replayed(self, connector: str, device: str, n: int = 1) -> None:
        self._ledger.replayed[connector] += n

    def record_duplicate_suspect(self, connector: str, device: str, n: int = 1) -> None:
        """A message that may have reached the hub twice (sent, then the gateway
        lost the acknowledgement before deleting it)."""
        self._ledger.duplicates[connector] += n

    # -- statistics ---------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        now = self._clock()
        ledger = self._ledger
        unavailable = self._unavailable or (
            StoreUnavailable(f"store {self.path}: the store is closed", kind="closed")
            if self._closed
            else None
        )
        return ledger.stats(
            now,
            state="ok" if unavailable is None else "unavailable",
            reason=None if unavailable is None else unavailable.reason,
            path=str(self.path),
            commits=self.commits,
            replay_rate=self.config.replay_rate,
            file_bytes=self._file_bytes,
        )

    def __repr__(self) -> str:
        return f"MessageStore({self.path}, {self._ledger.messages} messages)"


__all__ = ["MessageStore", "StoreFull", "StoreUnavailable", "classify"]
