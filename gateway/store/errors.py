"""What the store raises. ``reason`` is one line, safe to log and to show (no secrets)."""

from __future__ import annotations

from typing import Literal

# Why an append was refused (the ``reason`` label of iotgw_store_refused_total).
RefusalReason = Literal["full", "device_share", "unavailable"]
# What went wrong on disk (the ``kind`` label of iotgw_store_errors_total).
ErrorKind = Literal["corrupt", "locked", "disk_full", "io", "closed"]


class StoreError(Exception):
    """Base of the store's errors; ``reason`` is a one-line operator message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StoreFull(StoreError):
    """The whole store, or this device's share of it, has no room for the message.
    Nothing stored is dropped to make room: the device gets back-pressure."""

    def __init__(self, reason: str, *, scope: Literal["full", "device_share"] = "full") -> None:
        super().__init__(reason)
        self.scope = scope


class StoreUnavailable(StoreError):
    """The store cannot be used: corrupt file, locked by another process, disk full,
    an I/O error, or closed. ``kind`` says which."""

    def __init__(self, reason: str, *, kind: ErrorKind = "io") -> None:
        super().__init__(reason)
        self.kind = kind
