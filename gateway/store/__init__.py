"""Store-and-forward: telemetry of opted-in devices kept on disk while the hub is
unreachable, replayed in order when it is back (docs/store-and-forward.md).

A foundations-layer package: it knows the configuration, not the relays. The
relays append, peek and delete through ``MessageStore``; operations read
``stats()``. ``FakeStore`` has the same API in memory, for tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.store.errors import ErrorKind, RefusalReason, StoreError, StoreFull, StoreUnavailable
from gateway.store.limiter import RateLimiter
from gateway.store.types import Backlog, StoredMessage, StoreStats

if TYPE_CHECKING:
    from gateway.store.fake import FakeStore
    from gateway.store.sqlite import MessageStore


def __getattr__(name: str) -> Any:
    # The stores themselves (and sqlite3) load on first use: a daemon configured
    # without store_and_forward never pays their memory.
    if name == "MessageStore":
        from gateway.store.sqlite import MessageStore

        return MessageStore
    if name == "FakeStore":
        from gateway.store.fake import FakeStore

        return FakeStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Backlog",
    "ErrorKind",
    "FakeStore",
    "MessageStore",
    "RateLimiter",
    "RefusalReason",
    "StoreError",
    "StoreFull",
    "StoreStats",
    "StoreUnavailable",
    "StoredMessage",
]
