"""The hub's answers held back under load: the relay's side of `ack_batching`.

A connector with `ack_batching` lets a connection wait a moment before
reading the hub's next acknowledgements, so that one wake-up relays several
(the policy, `AckBatching`, is shared with the AMQP side and handed in by the
daemon). The policy needs to know how many messages are in flight: `InFlight`
counts the QoS 1 and 2 PUBLISHes relayed to the hub and not yet answered
(PUBACK or PUBREC) and asks the policy how long to wait.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Protocol

from gateway.mqtt.reader import Span

__all__ = ["AckPolicy", "InFlight", "answerable_publishes", "publish_answers"]


class AckPolicy(Protocol):
    """One connection's wait before reading the hub (`gateway.net.ack_batching.AckBatching`)."""

    def answered(self, now: float, count: int) -> None: ...
    def wait_before_read(self, now: float, in_flight: int) -> float: ...


# Builds a connection's policy from the connector's `ack_batching` wait (seconds).
AckBatchingFactory = Callable[[float], AckPolicy]


class InFlight:
    """One connection's PUBLISHes awaiting the hub's answer, and the wait they allow."""

    __slots__ = ("policy", "count")

    def __init__(self, policy: AckPolicy) -> None:
        self.policy = policy
        self.count = 0

    def sent(self, spans: list[Span], count: int) -> None:
        """The first `count` of `spans` go to the hub. Counted before the write,
        which may yield to the pump that relays their answers."""
        self.count += answerable_publishes(spans, count)

    def answered(self, read_at: float, spans: list[Span], count: int) -> None:
        """The first `count` of `spans`, read from the hub at `read_at`, went to the device."""
        answers = publish_answers(spans, count)
        self.count = max(0, self.count - answers)
        self.policy.answered(read_at, answers)

    def wait_before_read(self, now: float) -> float:
        """Seconds to wait before the next read of the hub (0: read now)."""
        return self.policy.wait_before_read(now, self.count)


def answerable_publishes(spans: list[Span], count: int) -> int:
    """How many of the first `count` spans are PUBLISHes of QoS 1 or 2."""
    n = 0
    for span in islice(spans, count):
        first = span[0]
        if first >> 4 == 3 and first & 0x06:
            n += 1
    return n


def publish_answers(spans: list[Span], count: int) -> int:
    """How many of the first `count` spans are PUBACKs or PUBRECs."""
    n = 0
    for span in islice(spans, count):
        if 4 <= span[0] >> 4 <= 5:
            n += 1
    return n
