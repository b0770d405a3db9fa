"""AckBatching: when the gateway lets the hub's answers gather before a read.

Driven with a made-up clock: answers at a steady pace, and the wait asked for
before each read.
"""

from __future__ import annotations

import random

import pytest

from gateway.net.ack_batching import AckBatching

WAIT = 0.001


def steady(batching: AckBatching, gap: float, reads: int, *, start: float = 0.0,
           per_read: int = 1) -> float:  # fmt: skip
    """`reads` reads `gap` apart, each answering `per_read`; returns the last time."""
    now = start
    for _ in range(reads):
        now += gap
        batching.answered(now, per_read)
    return now


def test_no_wait_before_the_pace_is_known() -> None:
    batching = AckBatching(WAIT, sustained=0.0)
    assert batching.wait_before_read(0.0, 100) == 0.0
    batching.answered(0.0, 1)  # one read gives no gap yet
    assert batching.wait_before_read(0.0, 100) == 0.0


def test_waits_for_a_trickle_with_a_deep_window() -> None:
    batching = AckBatching(WAIT, sustained=0.0)
    now = steady(batching, 50e-6, 1200)  # one answer every 50 us, 100 in flight: 5 ms of work
    assert batching.per_answer == pytest.approx(50e-6)
    assert batching.wait_before_read(now, 100) == WAIT


def test_answers_of_one_read_share_its_gap() -> None:
    batching = AckBatching(WAIT, sustained=0.0)
    now = steady(batching, 350e-6, 200, per_read=7)  # the hub writes 7 dispositions at a time
    assert batching.per_answer == pytest.approx(50e-6)
    assert batching.wait_before_read(now, 100) == WAIT


def test_no_wait_at_light_load() -> None:
    batching = AckBatching(WAIT, sustained=0.0)
    now = steady(batching, 1e-3, 100)  # 1,000 answers/s, one at a time
    assert batching.wait_before_read(now, 1) == 0.0
    # Even with much in flight: a wait would gather less than two answers.
    assert batching.wait_before_read(now, 1000) == 0.0


@pytest.mark.parametrize("in_flight", [1, 10, 39])
def test_no_wait_when_the_window_would_run_dry(in_flight: int) -> None:
    batching = AckBatching(WAIT, sustained=0.0)  # depth 2: in flight must cover 2 ms at 50 us each
    now = steady(batching, 50e-6, 1200)
    assert batching.wait_before_read(now, in_flight) == 0.0
    assert batching.wait_before_read(now, 41) == WAIT


def test_no_wait_for_a_hub_faster_than_the_window() -> None:
    batching = AckBatching(WAIT, sustained=0.0)
    now = steady(batching, 8e-6, 8000)  # 125k answers/s: 100 in flight last 0.8 ms
    assert batching.wait_before_read(now, 100) == 0.0


def test_switched_off() -> None:
    batching = AckBatching(0.0)
    now = steady(batching, 50e-6, 1200)
    assert batching.wait_before_read(now, 10_000) == 0.0


def test_an_idle_spell_counts_as_at_most_10ms() -> None:
    batching = AckBatching(WAIT, sustained=0.0)
    now = steady(batching, 50e-6, 1200)
    batching.answered(now + 5.0, 1)
    assert batching.per_answer == pytest.approx(50e-6 + (0.01 - 50e-6) * 0.25)
    # 60 ms at the old pace bring it back (the rate is measured over 50 ms).
    now = steady(batching, 50e-6, 1200, start=now + 5.0)
    assert batching.wait_before_read(now, 100) == WAIT


def test_a_wait_that_drained_the_hub_stops_waiting_for_a_while() -> None:
    batching = AckBatching(WAIT, quiet=0.01, sustained=0.0)
    now = steady(batching, 50e-6, 1200)
    assert batching.wait_before_read(now, 100) == WAIT
    now += 0.0012
    batching.answered(now, 80)  # 80 of the 100: the hub ran out of work
    assert batching.per_answer == 0.0
    now = steady(batching, 50e-6, 20, start=now)  # 1 ms later: still quiet
    assert batching.wait_before_read(now, 100) == 0.0
    now = steady(batching, 50e-6, 200, start=now)  # 10 ms later
    assert batching.wait_before_read(now, 100) == WAIT


def test_quiet_spells_double_while_waits_keep_draining_the_hub() -> None:
    batching = AckBatching(WAIT, quiet=0.01, sustained=0.0)
    now = steady(batching, 50e-6, 1200)
    spells = []
    for _ in range(4):
        while batching.wait_before_read(now, 100) == 0.0:
            now = steady(batching, 50e-6, 1, start=now)
        began = now
        now += 0.0012
        batching.answered(now, 100)
        while batching.wait_before_read(now, 100) == 0.0:
            now = steady(batching, 50e-6, 1, start=now)
        spells.append(now - began)
    assert [round(s * 1000) for s in spells] == [
        11,
        21,
        41,
        81,
    ]  # the 1.2 ms wait, then 10 ms doubling


def test_a_wait_that_left_the_hub_busy_resets_the_backoff() -> None:
    batching = AckBatching(WAIT, quiet=0.01, sustained=0.0)
    now = steady(batching, 50e-6, 1200)
    for drained in (100, 100):
        while batching.wait_before_read(now, 100) == 0.0:
            now = steady(batching, 50e-6, 1, start=now)
        now += 0.0012
        batching.answered(now, drained)
    while batching.wait_before_read(now, 100) == 0.0:
        now = steady(batching, 50e-6, 1, start=now)
    now += 0.0012
    batching.answered(now, 24)  # a quarter: the hub was still busy
    now = steady(batching, 50e-6, 1, start=now)
    assert batching.wait_before_read(now, 100) == WAIT
    now += 0.0012
    batching.answered(now, 100)
    began = now
    while batching.wait_before_read(now, 100) == 0.0:
        now = steady(batching, 50e-6, 1, start=now)
    assert round((now - began) * 1000) == 10  # back to the first spell


def test_reads_without_answers_change_nothing() -> None:
    batching = AckBatching(WAIT, sustained=0.0)
    now = steady(batching, 50e-6, 1200)
    before = batching.per_answer
    batching.answered(now + 0.5, 0)  # a ping response, a C2D message
    assert batching.per_answer == before


def test_waits_only_once_the_load_is_sustained() -> None:
    batching = AckBatching(WAIT)  # 50 ms of answers without a gap over 10 ms
    now = steady(batching, 50e-6, 900)  # 45 ms
    assert batching.wait_before_read(now, 100) == 0.0
    now = steady(batching, 50e-6, 200, start=now)  # 55 ms
    assert batching.wait_before_read(now, 100) == WAIT
    batching.answered(now + 0.0012, 20)
    now = steady(batching, 0.011, 1, start=now + 0.0012)  # a pause: it starts over
    now = steady(batching, 50e-6, 100, start=now)
    assert batching.wait_before_read(now, 100) == 0.0


def test_bursts_are_relayed_as_they_come() -> None:
    """1,000 msg/s sent as a burst of 100 every 100 ms: no answer is ever held."""
    batching = AckBatching(WAIT)
    now = 0.0
    for _ in range(20):
        now += 0.1
        for i in range(100):
            now += 50e-6
            batching.answered(now, 1)
            assert batching.wait_before_read(now, 99 - i) == 0.0


def test_no_wait_at_1000_per_second_with_jitter_and_a_distant_hub() -> None:
    """Random arrivals at 1,000/s, 20 in flight (a hub 20 ms away): never a wait,
    though the running estimate of the pace dips below half the wait now and then."""
    rng = random.Random(8)
    batching = AckBatching(WAIT)
    now = 0.0
    dipped = 0
    for _ in range(20_000):
        now += rng.expovariate(1000.0)
        batching.answered(now, 1)
        dipped += batching.per_answer <= WAIT / 2
        assert batching.wait_before_read(now, 20) == 0.0
    assert dipped > 0


def test_waits_from_4000_answers_a_second() -> None:
    batching = AckBatching(WAIT)
    now = steady(batching, 1 / 3500, 400)
    assert batching.wait_before_read(now, 1000) == 0.0
    now = steady(batching, 1 / 4500, 400, start=now)
    assert batching.wait_before_read(now, 1000) == WAIT
