"""When to wait a moment before reading the hub's next acknowledgements.

Under sustained load a hub answers message after message: one PUBACK, or one
disposition, per write. Read as they come, each costs the gateway a wake-up
and the device a read of its own, for a few dozen bytes. Waiting `wait`
seconds before the next read lets one wake-up carry several answers, the way
a network card moderates its interrupts.

The wait is only for sustained load:

- answers must have kept coming, no gap over 10 ms, for `sustained` seconds
  (a burst now and then is relayed as it comes);
- the last 50 ms must have brought at least four answers per `wait` (at
  1,000 answers a second and a 1 ms wait, nothing is ever held);
- the estimated time per answer must be at most half the wait, so a wait
  gathers at least two;
- the messages in flight must take the hub `depth` waits to answer, so the
  hub still has work while the gateway holds its answers.

A wait can still cost a device whose own window is what limits it (a distant
hub, few messages in flight): each held answer comes up to `wait` later, so it
loses up to `wait` per round trip.

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
# The answer rate is measured over windows this long; a wait needs the last one to
# have brought at least _MIN_PER_WAIT answers per wait.
_WINDOW = 0.05
_MIN_PER_WAIT = 4.0
# Waits in a row that found the hub idle double the quiet spell, up to 2**7 times.
_MAX_BACKOFF = 8


class AckBatching:
    """The wait before one connection's next read of the hub (0: read now)."""

    __slots__ = (
        "wait", "depth", "quiet", "sustained", "_last_at", "_per_answer", "_held_for",
        "_quiet_until", "_idle_waits", "_busy_since", "_window_start", "_window_answers",
        "_rate",
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
        self._window_start = 0.0
        self._window_answers = 0
        self._rate = 0.0  # answers per second in the last whole window

    @property
    def per_answer(self) -> float:
        """The hub's estimated time per answer (0 while unknown)."""
        return self._per_answer

    @property
    def rate(self) -> float:
        """Answers per second over the last whole 50 ms window (0 while unknown)."""
        return self._rate

    def answered(self, now: float, count: int) -> None:
        """A read at `now` answered `count` messages."""
        if count <= 0:
            return
        held, self._held_for = self._held_for, 0
        last, self._last_at = self._last_at, now
        if last is None or now - last > _MAX_GAP:
            self._busy_since = self._window_start = now
            self._window_answers = 0
            self._rate = 0.0
        elif now - self._window_start >= _WINDOW:
            self._rate = self._window_answers / (now - self._window_start)
            self._window_start = now
            self._window_answers = 0
        self._window_answers += count
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

    def may_wait(self, now: float) -> bool:
        """Whether the load allows a wait at all (cheap: ask this first)."""
        per_answer = self._per_answer
        wait = self.wait
        return not (
            per_answer <= 0.0
            or now < self._quiet_until
            or now - self._busy_since < self.sustained
            or self._rate * wait < _MIN_PER_WAIT
            or wait < 2 * per_answer
        )

    def wait_for(self, in_flight: int) -> float:
        """After `may_wait`: the wait before the next read, given `in_flight`."""
        if in_flight * self._per_answer < self.depth * self.wait:
            return 0.0
        self._held_for = in_flight
        return self.wait

    def wait_before_read(self, now: float, in_flight: int) -> float:
        """Seconds to wait before the next read, with `in_flight` messages unanswered."""
        return self.wait_for(in_flight) if self.may_wait(now) else 0.0
