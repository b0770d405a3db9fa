"""Make `AckBatching` wait before every read of a hub, and record what it saw."""

from __future__ import annotations

from typing import Any

from gateway.net.ack_batching import AckBatching

WAIT = 0.002


class ForcedWaits:
    """Patches AckBatching (through pytest's monkeypatch) to wait `WAIT` before
    every hub read with something in flight; counts the waits, the largest
    in-flight count and every answer the relays reported."""

    def __init__(self, monkeypatch: Any) -> None:
        self.waits = 0
        self.max_in_flight = 0
        self.answers = 0
        answered = AckBatching.answered

        def record(batching: AckBatching, now: float, count: int) -> None:
            self.answers += max(count, 0)
            answered(batching, now, count)

        def wait_for(batching: AckBatching, in_flight: int) -> float:
            self.max_in_flight = max(self.max_in_flight, in_flight)
            if in_flight <= 0:
                return 0.0
            self.waits += 1
            return WAIT

        monkeypatch.setattr(AckBatching, "answered", record)
        monkeypatch.setattr(AckBatching, "may_wait", lambda batching, now: True)
        monkeypatch.setattr(AckBatching, "wait_for", wait_for)
