"""Is the wall clock set? A Raspberry Pi has no real-time clock: until NTP has
synced it may read 1970, or the time of the last shutdown. SAS tokens the
gateway signs then carry a wrong expiry (already expired for the hub, or
valid far too long), and certificate checks judge validity periods wrongly.

Pure: the caller passes ``now`` (Unix seconds). A clock that reads earlier
than this build's date is "obviously unset"; the gateway issues no token
then (`gateway.auth.credentials.ClockNotSetError`) and reports itself not
ready, and carries on by itself once the clock has been set.

``BUILD_DATE`` is a constant, moved to the release date at every release
(docs/operations.md, "Releasing"); between releases it stays at or before the
date the code was written, so it never refuses a correct clock.
"""

from __future__ import annotations

import calendar
import time

__all__ = ["BUILD_DATE", "BUILD_EPOCH", "clock_is_set", "clock_problem"]

# The date of this release (UTC, YYYY-MM-DD): no correct clock reads earlier.
BUILD_DATE = "2026-12-01"
BUILD_EPOCH = calendar.timegm(time.strptime(BUILD_DATE, "%Y-%m-%d"))


def clock_is_set(now: float, *, build_epoch: float = BUILD_EPOCH) -> bool:
    """False while ``now`` is before this build's date: the clock cannot be right."""
    return now >= build_epoch


def clock_problem(now: float, *, build_epoch: float = BUILD_EPOCH) -> str | None:
    """Why the clock cannot be trusted (one line), or None when it can."""
    if clock_is_set(now, build_epoch=build_epoch):
        return None
    reads = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(max(now, 0)))
    built = time.strftime("%Y-%m-%d", time.gmtime(build_epoch))
    return f"the system clock reads {reads}, before this build's date {built}: not set yet (NTP)"
