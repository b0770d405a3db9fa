"""The replay token bucket, driven by an injected clock and sleep."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gateway.store import RateLimiter


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await trio.lowlevel.checkpoint()


async def test_burst_then_rate() -> None:
    t = FakeTime()
    limiter = RateLimiter(50, clock=t.clock, sleep=t.sleep)
    assert limiter.burst == 5
    for _ in range(5):
        await limiter.acquire()
    assert t.slept == [] and t.now == 0
    for _ in range(100):
        await limiter.acquire()
    assert t.now == pytest.approx(2.0)  # 100 more at 50/s
    assert limiter.acquired == 105


async def test_try_acquire_and_delay() -> None:
    t = FakeTime()
    limiter = RateLimiter(2, burst=1, clock=t.clock, sleep=t.sleep)
    assert limiter.try_acquire() and not limiter.try_acquire()
    assert limiter.delay() == pytest.approx(0.5)
    t.now += 0.5
    assert limiter.try_acquire()
    t.now += 100  # idle time does not bank more than the burst
    assert limiter.try_acquire() and not limiter.try_acquire()


async def test_more_than_a_burst_at_once_is_capped() -> None:
    t = FakeTime()
    limiter = RateLimiter(10, clock=t.clock, sleep=t.sleep)
    await limiter.acquire(50)  # more than the bucket holds: takes what a burst allows
    assert limiter.acquired == 1


async def test_set_rate() -> None:
    t = FakeTime()
    limiter = RateLimiter(100, clock=t.clock, sleep=t.sleep)
    limiter.set_rate(1)
    assert limiter.burst == 1
    await limiter.acquire()
    await limiter.acquire()
    assert t.now == pytest.approx(1.0)
    with pytest.raises(ValueError):
        limiter.set_rate(0)
    with pytest.raises(ValueError):
        RateLimiter(0)


async def test_default_clock_is_trios(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(10, burst=1)
    start = trio.current_time()
    for _ in range(11):
        await limiter.acquire()
    assert trio.current_time() - start == pytest.approx(1.0)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)
