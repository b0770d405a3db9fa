"""When to wait a moment before reading the hub's next acknowledgements.

Under sustained load a hub answers message after message: one PUBACK, or one
disposition, per write. Read as they come, each costs the gateway a wake-up
and the device a read of its own, for a few dozen bytes. Waiting `wait`
seconds before the next read lets one wake-up carry several answers, the way
a network card moderates its interrupts.

The wait is taken only under sustained load and when it should not slow the
flow: answers must have kept coming, no gap over 10 ms, for `sustained`
seconds (a burst now and then is relayed as it comes); the messages in flight
must keep the hub busy for `depth` times the wait (so the hub still has work
while the gateway holds its answers); and answers must come at least two per
wait (so the wait gathers something). At light load none of this holds and
every answer is relayed at once.

The hub's pace is estimated from the gaps between answers, and a wait, or the
gateway being descheduled, stretches those gaps. So a read after a wait that
answers most of what was in flight (the hub ran dry during the wait) drops the
estimate and stops waiting for `quiet` seconds, twice as long after each
such wait in a row. A hub faster than the gateway thus sees a wait now and
then, not a stall per window.

The caller counts: `in_flight` is the messages sent to the hub that it has not
answered yet; `answered` the ones a read answered. Times are the caller's
clock (seconds); this module reads none.
"""

from __future__ import annotations

__all__ = ["AckBatching"]

# A sample's weight in the running estimate of the time per answer.
_WEIGHT = 0.25
# Longest gap one sample may count, so an idle spell is forgotten within a few reads;
# a longer one also ends a spell of sustained load.
_MAX_GAP = 0.01
# Waits in a row that found the hub idle double the quiet spell, up to 2**7 times.
_MAX_BACKOFF = 8


class AckBatching:
    """The wait before one connection's next read of the hub (0: read now)."""

    __slots__ = (
        "wait", "depth", "quiet", "sustained", "_last_at", "_per_answer", "_held_for",
        "_quiet_until", "_idle_waits", "_busy_since",
    )  # fmt: skip

    def __init__(
        self, wait: float, *, depth: float = 2.0, quiet: float = 0.01, sustained: float = 0.05
    ) -> None:
        self.wait = wait
        self.depth = depth
        self.quiet = quiet
        self.sustained = sustained
        self._last_at: float | None = None
        self._per_answer = 0.0  # running estimate, seconds per answer; 0 = none yet
        self._held_for = 0  # messages in flight when the last wait began (0: no wait)
        self._quiet_until = 0.0
        self._idle_waits = 0  # waits in a row during which the hub ran dry
        self._busy_since = 0.0  # answers have come without a long gap since then

    @property
    def per_answer(self) -> float:
        """The hub's estimated time per answer (0 while unknown)."""
        return self._per_answer

    def answered(self, now: float, count: int) -> None:
        """A read at `now` answered `count` messages."""
        if count <= 0:
            return
        held, self._held_for = self._held_for, 0
        last, self._last_at = self._last_at, now
        if last is None or now - last > _MAX_GAP:
            self._busy_since = now
        if held:
            if count * 4 >= held * 3:
                self._idle_waits = min(self._idle_waits + 1, _MAX_BACKOFF)
                self._per_answer = 0.0
                self._quiet_until = now + self.quiet * (1 << (self._idle_waits - 1))
                return
            self._idle_waits = 0
        if last is None:
            return
        sample = min(now - last, _MAX_GAP) / count
        estimate = self._per_answer
        self._per_answer = sample if not estimate else estimate + (sample - estimate) * _WEIGHT

    def wait_before_read(self, now: float, in_flight: int) -> float:
        """Seconds to wait before the next read, with `in_flight` messages unanswered."""
        per_answer = self._per_answer
        wait = self.wait
        if (
            per_answer <= 0.0
            or now < self._quiet_until
            or now - self._busy_since < self.sustained
            or wait < 2 * per_answer
            or in_flight * per_answer < self.depth * wait
        ):
            return 0.0
        self._held_for = in_flight
        return wait
