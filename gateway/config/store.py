"""The ``store_and_forward:`` section: where and how much telemetry the gateway keeps
for opted-in devices while the hub is unreachable (see docs/store-and-forward.md).

Absent: the feature is off and nothing changes for any device. Present: it only
applies to ``credentials`` entries with ``store_and_forward: true``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from gateway.config.base import Section, resolve_file
from gateway.config.durations import Duration
from gateway.config.sizes import ByteSize

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MIN_MAX_BYTES = 64 * 1024
DEFAULT_MAX_AGE = 7 * 86400.0


class StoreAndForwardSection(Section):
    """The message store (SQLite, WAL mode) and its limits."""

    path: Path = Field(
        description="the database file (created if missing); relative to the config file"
    )
    max_bytes: ByteSize = Field(
        DEFAULT_MAX_BYTES,
        ge=MIN_MAX_BYTES,
        description="stored messages may take this much (payload, address and properties); "
        "a full store refuses new messages, it never drops stored ones",
        json_schema_extra={"default": "64MiB"},
    )
    max_age: Duration = Field(
        DEFAULT_MAX_AGE, gt=0, description="messages older than this expire (counted, logged)",
        json_schema_extra={"default": "7d"},
    )
    device_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="at most this fraction of max_bytes per device, so one device cannot "
        "fill the store for the others",
    )
    replay_rate: float = Field(
        50.0, gt=0, description="messages per second per connector when replaying to the hub"
    )
    batch_max: int = Field(
        256, ge=1, le=10000, description="group commit: at most this many messages per fsync"
    )

    @field_validator("path", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("path", mode="after")
    @classmethod
    def _absolute(cls, value: Path, info: ValidationInfo) -> Path:
        return resolve_file(value, (info.context or {}).get("base_dir"))

    @property
    def device_max_bytes(self) -> int:
        """The most one device may have stored."""
        return max(1, int(self.max_bytes * self.device_share))


# The name the store API uses for it.
StoreAndForwardConfig = StoreAndForwardSection
