"""Flow-control arithmetic (flow.py): serial numbers, session windows, link credit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.amqp.flow import (
    MAX_WINDOW,
    ReceiverCredit,
    SenderCredit,
    SessionWindows,
    WindowViolation,
    seq_add,
    seq_diff,
)

u32 = st.integers(0, 0xFFFFFFFF)


@given(u32, st.integers(-(2**31) + 1, 2**31 - 1))
def test_serial_add_and_diff_are_inverse(a, n):
    assert seq_diff(seq_add(a, n), a) == n


def test_serial_wraps():
    assert seq_add(0xFFFFFFFF, 1) == 0
    assert seq_diff(0, 0xFFFFFFFF) == 1
    assert seq_diff(0xFFFFFFFF, 0) == -1


def test_session_windows_outgoing():
    w = SessionWindows(initial_outgoing_id=0xFFFFFFFE, incoming_window=10)
    assert not w.can_send()  # nothing before the peer's begin
    w.on_remote_begin(next_outgoing_id=5, incoming_window=3, outgoing_window=100)
    assert w.remote_incoming_window == 3 and w.next_incoming_id == 5
    for _ in range(3):
        assert w.can_send()
        w.on_transfer_sent()
    assert not w.can_send() and w.next_outgoing_id == 1
    # The peer's flow: it has seen 2 of our 3 transfers and opens a window of 4.
    w.on_remote_flow(next_incoming_id=0, incoming_window=4, next_outgoing_id=5, outgoing_window=100)
    assert w.remote_incoming_window == 3  # 0 + 4 - 1
    # A flow from a peer that has not seen our begin counts from our initial id.
    w.on_remote_flow(next_incoming_id=None, incoming_window=10, next_outgoing_id=5, outgoing_window=1)
    assert w.remote_incoming_window == 7


def test_session_windows_incoming():
    w = SessionWindows(incoming_window=4)
    w.on_remote_begin(next_outgoing_id=0xFFFFFFFF, incoming_window=1, outgoing_window=10)
    for _ in range(2):
        w.on_transfer_received()
    assert w.next_incoming_id == 1 and w.incoming_window == 2
    assert w.needs_replenish()
    w.replenish()
    assert w.incoming_window == 4
    for _ in range(4):
        w.on_transfer_received()
    with pytest.raises(WindowViolation):
        w.on_transfer_received()
    with pytest.raises(ValueError):
        SessionWindows(incoming_window=0)


def test_sender_credit():
    s = SenderCredit(initial_delivery_count=0xFFFFFFFF)
    s.on_flow(delivery_count=None, link_credit=3, drain=False)  # counts from our initial
    assert s.credit == 3
    s.on_delivery_sent()
    assert s.delivery_count == 0 and s.credit == 2
    # A stale flow (receiver saw no deliveries yet) still grants the same limit.
    s.on_flow(delivery_count=0xFFFFFFFF, link_credit=3, drain=True)
    assert s.credit == 2 and s.drain
    assert s.drain_credit() == 2
    assert s.credit == 0 and s.delivery_count == 2
    s.on_flow(delivery_count=0, link_credit=1, drain=False)  # older than ours: no credit
    assert s.credit == 0


def test_receiver_credit_limit_is_monotonic():
    r = ReceiverCredit()
    r.grant(5, drain=False)  # before the sender's attach
    r.on_remote_attach(initial_delivery_count=100)
    assert r.limit == 105
    r.grant(1, drain=False)  # lowered: in-flight transfers up to 105 still fine
    for _ in range(5):
        r.on_delivery_received()
    assert r.delivery_count == 105 and r.credit == 0
    with pytest.raises(WindowViolation):
        r.on_delivery_received()
    r.grant(2, drain=True)
    r.on_flow(delivery_count=107, available=0)  # the sender drained
    assert r.credit == 0 and not r.drain
    with pytest.raises(ValueError):
        r.grant(MAX_WINDOW + 1, drain=False)


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=60), u32)
def test_receiver_never_accepts_beyond_what_was_granted(ops, start):
    r = ReceiverCredit()
    r.on_remote_attach(start)
    granted_limit = start
    received = 0
    for is_grant, n in ops:
        if is_grant:
            r.grant(n, drain=False)
            if seq_diff(seq_add(r.delivery_count, n), granted_limit) > 0:
                granted_limit = seq_add(r.delivery_count, n)
        else:
            for _ in range(n):
                try:
                    r.on_delivery_received()
                    received += 1
                except WindowViolation:
                    assert r.delivery_count == granted_limit
                    break
    assert seq_diff(granted_limit, r.delivery_count) >= 0
    assert seq_diff(r.delivery_count, start) == received
