"""Store-and-forward: telemetry of opted-in devices kept on disk while the hub is
unreachable, replayed in order when it is back (docs/store-and-forward.md).

A foundations-layer package: it knows the configuration, not the relays. The
relays append, peek and delete through ``MessageStore``; operations read
``stats()``. ``FakeStore`` has the same API in memory, for tests.
"""

from __future__ import annotations

from gateway.store.errors import ErrorKind, RefusalReason, StoreError, StoreFull, StoreUnavailable
from gateway.store.fake import FakeStore
from gateway.store.limiter import RateLimiter
from gateway.store.sqlite import MessageStore
from gateway.store.types import Backlog, StoredMessage, StoreStats

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
