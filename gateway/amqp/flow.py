"""Flow-control arithmetic for sessions (spec 2.5.6) and links (spec 2.6.7).

Pure objects: they hold counters, apply what was sent or received, and say
what may be sent or must be granted. They never build frames; the session and
link modules do that with what these objects report.

Transfer ids and delivery counts are RFC 1982 serial numbers modulo 2**32.
"""

from __future__ import annotations

SEQ_MOD = 1 << 32
SEQ_MASK = SEQ_MOD - 1
_HALF = 1 << 31

#: Largest window/credit value that fits a uint and stays positive as a serial delta.
MAX_WINDOW = _HALF - 1


def seq_add(a: int, n: int) -> int:
    """``a + n`` in serial-number arithmetic."""
    return (a + n) & SEQ_MASK


def seq_diff(a: int, b: int) -> int:
    """``a - b`` as a signed distance between two serial numbers."""
    d = (a - b) & SEQ_MASK
    return d - SEQ_MOD if d & _HALF else d


class WindowViolation(Exception):
    """Raised by the flow objects; the engine maps it to an AMQP error condition."""


class SessionWindows:
    """Both directions of one session's transfer windows.

    Outgoing: ``next_outgoing_id`` is the transfer-id of our next transfer frame and
    ``remote_incoming_window`` how many more frames the peer accepts.
    Incoming: ``next_incoming_id`` is the transfer-id we expect next and
    ``incoming_window`` how many more frames we accept before we must send a flow.
    """

    __slots__ = (
        "initial_outgoing_id",
        "next_outgoing_id",
        "outgoing_window",
        "remote_incoming_window",
        "next_incoming_id",
        "incoming_window",
        "max_incoming_window",
        "remote_outgoing_window",
    )

    def __init__(
        self,
        *,
        initial_outgoing_id: int = 0,
        incoming_window: int = 2048,
        outgoing_window: int = MAX_WINDOW,
    ) -> None:
        if not 1 <= incoming_window <= MAX_WINDOW:
            raise ValueError(f"incoming_window must be in 1..{MAX_WINDOW}")
        self.initial_outgoing_id = initial_outgoing_id & SEQ_MASK
        self.next_outgoing_id = self.initial_outgoing_id
        self.outgoing_window = outgoing_window
        # Until the peer's begin arrives we may send nothing.
        self.remote_incoming_window = 0
        self.next_incoming_id: int | None = None
        self.incoming_window = incoming_window
        self.max_incoming_window = incoming_window
        self.remote_outgoing_window = 0

    # -- remote state -----------------------------------------------------------------

    def on_remote_begin(
        self, next_outgoing_id: int, incoming_window: int, outgoing_window: int
    ) -> None:
        self.next_incoming_id = next_outgoing_id & SEQ_MASK
        self.remote_outgoing_window = outgoing_window
        # The peer's incoming window counts from our initial outgoing id.
        self.remote_incoming_window = max(
            0, seq_diff(seq_add(self.initial_outgoing_id, incoming_window), self.next_outgoing_id)
        )

    def on_remote_flow(
        self,
        next_incoming_id: int | None,
        incoming_window: int,
        next_outgoing_id: int,
        outgoing_window: int,
    ) -> None:
        base = self.initial_outgoing_id if next_incoming_id is None else next_incoming_id
        self.remote_incoming_window = max(
            0, seq_diff(seq_add(base, incoming_window), self.next_outgoing_id)
        )
        if self.next_incoming_id is not None:
            self.remote_outgoing_window = max(
                0, seq_diff(seq_add(next_outgoing_id, outgoing_window), self.next_incoming_id)
            )

    # -- outgoing transfers -----------------------------------------------------------

    def can_send(self) -> bool:
        return self.remote_incoming_window > 0

    def on_transfer_sent(self) -> None:
        self.next_outgoing_id = (self.next_outgoing_id + 1) & SEQ_MASK
        self.remote_incoming_window -= 1

    # -- incoming transfers -----------------------------------------------------------

    def on_transfer_received(self) -> None:
        """Account one incoming transfer frame; raise WindowViolation if it did not fit."""
        if self.incoming_window <= 0:
            raise WindowViolation(
                f"transfer beyond the session incoming window (next-incoming-id "
                f"{self.next_incoming_id}, window {self.max_incoming_window} exhausted)"
            )
        self.incoming_window -= 1
        if self.next_incoming_id is not None:
            self.next_incoming_id = (self.next_incoming_id + 1) & SEQ_MASK
        if self.remote_outgoing_window > 0:
            self.remote_outgoing_window -= 1

    def needs_replenish(self) -> bool:
        """True when half the incoming window is used: time to send a session flow."""
        return self.incoming_window <= self.max_incoming_window >> 1

    def replenish(self) -> None:
        self.incoming_window = self.max_incoming_window


class SenderCredit:
    """Sender side of a link's flow state (spec 2.6.7)."""

    __slots__ = ("initial_delivery_count", "delivery_count", "credit", "available", "drain")

    def __init__(self, initial_delivery_count: int = 0) -> None:
        self.initial_delivery_count = initial_delivery_count & SEQ_MASK
        self.delivery_count = self.initial_delivery_count
        self.credit = 0
        self.available = 0
        self.drain = False

    def on_flow(self, delivery_count: int | None, link_credit: int, drain: bool) -> None:
        # A null delivery-count means the receiver has not seen our attach yet and
        # counts from our initial delivery count.
        base = self.initial_delivery_count if delivery_count is None else delivery_count
        self.credit = max(0, seq_diff(seq_add(base, link_credit), self.delivery_count))
        self.drain = drain

    def on_delivery_sent(self) -> None:
        self.delivery_count = (self.delivery_count + 1) & SEQ_MASK
        if self.credit > 0:
            self.credit -= 1
        if self.credit == 0:
            self.drain = False  # a drain is over once the credit is used up

    def drain_credit(self) -> int:
        """Use up all remaining credit (drain answered); return how much was consumed."""
        consumed = self.credit
        self.delivery_count = seq_add(self.delivery_count, consumed)
        self.credit = 0
        return consumed


class ReceiverCredit:
    """Receiver side of a link's flow state (spec 2.6.7).

    ``limit`` is the highest delivery count the sender may reach under any credit we
    have granted. It only moves forward, so transfers sent before the sender saw a
    lowered credit are still accepted; anything beyond it is a violation.
    """

    __slots__ = ("delivery_count", "credit", "available", "drain", "limit", "started")

    def __init__(self) -> None:
        self.delivery_count = 0
        self.credit = 0
        self.available = 0
        self.drain = False
        self.limit = 0
        self.started = False

    def on_remote_attach(self, initial_delivery_count: int) -> None:
        self.delivery_count = initial_delivery_count & SEQ_MASK
        self.limit = seq_add(self.delivery_count, self.credit)
        self.started = True

    def grant(self, credit: int, drain: bool) -> None:
        if not 0 <= credit <= MAX_WINDOW:
            raise ValueError(f"link credit must be in 0..{MAX_WINDOW}")
        self.credit = credit
        self.drain = drain
        new_limit = seq_add(self.delivery_count, credit)
        if not self.started or seq_diff(new_limit, self.limit) > 0:
            self.limit = new_limit

    def on_delivery_received(self) -> None:
        """Account one new incoming delivery; raise WindowViolation beyond the granted limit."""
        if seq_diff(self.limit, self.delivery_count) <= 0:
            raise WindowViolation(
                f"transfer with no link credit (delivery-count {self.delivery_count})"
            )
        self.delivery_count = (self.delivery_count + 1) & SEQ_MASK
        if self.credit > 0:
            self.credit -= 1
        if self.credit == 0:
            self.drain = False

    def on_flow(self, delivery_count: int | None, available: int | None) -> None:
        """The sender reported its state (e.g. answering drain): adopt its delivery count."""
        if available is not None:
            self.available = available
        if delivery_count is None:
            return
        d = seq_diff(delivery_count, self.delivery_count)
        if d > 0:
            self.delivery_count = delivery_count & SEQ_MASK
            self.credit = max(0, self.credit - d)
        if self.credit == 0:
            self.drain = False
