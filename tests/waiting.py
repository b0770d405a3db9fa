"""Waits bounded by progress, not by the wall clock.

A test on a busy machine (two cores shared with other builds and CPU hogs) may take many times
as long as on a quiet one, so no test decides correctness by how long something took. A wait
either ends because what it waits for happened, or fails because nothing happened for
``STALL`` seconds (a hang), never because the whole took longer than some budget.
``FAILSAFE`` bounds one step that should be quick (one round trip, one handshake): it is there
only so that a hang fails the test instead of reaching pytest-timeout, and is large enough that
no slowness short of a hang reaches it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio

# One quick step (a round trip, a handshake, a process start) never takes this long unless
# something hangs.
FAILSAFE = 60.0
# A long run (thousands of messages, hundreds of devices) fails only after this long without
# any progress at all.
STALL = 60.0


class Stalled(AssertionError):
    """Nothing progressed for the stall period: something hangs."""


class Progress:
    """Pushes the deadline of a `fail_without_progress` block on each `tick`."""

    def __init__(self, scope: trio.CancelScope, stall: float) -> None:
        self._scope = scope
        self.stall = stall
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1
        self._scope.deadline = trio.current_time() + self.stall


@contextmanager
def fail_without_progress(stall: float = STALL, what: str = "progress") -> Iterator[Progress]:
    """A `trio.fail_after` whose deadline moves on every ``progress.tick()``: the block may take
    as long as it needs, and fails (`Stalled`) only after `stall` seconds with no tick."""
    scope = trio.CancelScope(deadline=trio.current_time() + stall)
    progress = Progress(scope, stall)
    with scope:
        yield progress
    if scope.cancelled_caught:
        raise Stalled(f"no {what} for {stall:g} s (after {progress.ticks} steps)")


async def wait_for_progress(done: Callable[[], bool], progress: Callable[[], Any], *,
                            stall: float = STALL, poll: float = 0.02,
                            what: str = "progress") -> None:  # fmt: skip
    """Poll until ``done()``; fail only if ``progress()`` (any comparable snapshot, e.g. a count)
    has not changed for `stall` seconds. For state that gives no event to wait on."""
    last = progress()
    with fail_without_progress(stall, what) as p:
        while not done():
            await trio.sleep(poll)  # polling a state that has no event; bounded by progress
            now = progress()
            if now != last:
                last = now
                p.tick()


def wait_for_progress_sync(done: Callable[[], bool], progress: Callable[[], Any], *,
                           step: Callable[[float], None] | None = None, stall: float = STALL,
                           poll: float = 0.02, what: str = "progress") -> None:  # fmt: skip
    """`wait_for_progress` for blocking code (threads, proton's BlockingConnection): ``step(t)``
    waits up to t seconds for something to happen (default: sleep t)."""
    last = progress()
    moved = time.monotonic()
    while not done():
        if step is None:
            time.sleep(poll)  # polling a state that has no event; bounded by progress
        else:
            step(poll)
        now = progress()
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > stall:
            raise Stalled(f"no {what} for {stall:g} s")
