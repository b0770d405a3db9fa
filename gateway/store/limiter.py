"""A token bucket for replay: at most ``rate`` messages per second, ``burst`` at once.

IoT Hub throttles device-to-cloud sends per unit; a gateway replaying a long
backlog at full speed would be throttled (and its live devices with it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio


class RateLimiter:
    """``await limiter.acquire()`` before each message sent. The clock and sleep are
    injectable for tests; by default trio's clock (so trio's MockClock drives it)."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be greater than 0")
        self.rate = float(rate)
        # A tenth of a second's worth at once (at least one): smooth enough for the
        # hub's throttling, and a window of several messages in flight.
        self.burst = float(burst) if burst is not None else max(1.0, self.rate / 10)
        self._clock = clock or trio.current_time
        self._sleep = sleep or trio.sleep
        self._tokens: float | None = None  # full at the first use
        self._last = 0.0
        self.acquired = 0

    def _refill(self) -> float:
        now = self._clock()
        if self._tokens is None:
            self._tokens = self.burst
        else:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        return self._tokens

    def try_acquire(self, n: int = 1) -> bool:
        """Take ``n`` tokens now if there are enough; never waits."""
        # The tolerance keeps float rounding from leaving a wait of 0 that never ends.
        if self._refill() >= n - 1e-9:
            self._tokens = (self._tokens or 0.0) - n
            self.acquired += n
            return True
        return False

    def delay(self, n: int = 1) -> float:
        """Seconds until ``n`` tokens would be there (0 if they are now)."""
        missing = n - self._refill()
        return 0.0 if missing <= 1e-9 else missing / self.rate

    async def acquire(self, n: int = 1) -> None:
        """Wait until ``n`` tokens are there and take them (``n`` at most ``burst``,
        rounded up to 1, else it could never be satisfied)."""
        n = max(1, min(n, int(max(1.0, self.burst))))
        while not self.try_acquire(n):
            await self._sleep(self.delay(n))
        await trio.lowlevel.checkpoint_if_cancelled()

    def set_rate(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be greater than 0")
        self._refill()
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate / 10)
        if self._tokens is not None:
            self._tokens = min(self._tokens, self.burst)
