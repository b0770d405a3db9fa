"""What a router needs to mirror an attach field for field, unknown fields included.

A peer on a later revision of the spec (or an extension) may send attach fields
beyond the fourteen AMQP 1.0 defines; the codec keeps them in ``_extra`` and
``Session.attach(extra=...)`` / ``Link.answer_attach(extra=...)`` send them on.
The incoming attach is encoded by python-qpid-proton, the mirrored ones are
decoded by it.
"""

from __future__ import annotations

import proton
from proton import Described, symbol, ubyte, uint, ulong

from gateway.amqp import Connection, RemoteAttach, RemoteBegin
from gateway.amqp.performatives import Attach, Source, Target
from gateway.amqp.types import Symbol, UInt

from .test_engine import AMQP_HEADER, decode_frames, p_begin, p_open, pframe

ATTACH = 0x12
EXTRA_FIELDS = [symbol("x-future-field"), {symbol("k"): uint(7)}]


def _attach_with_extra_fields() -> bytes:
    source = Described(ulong(0x28), ["devices/d1/messages/devicebound"])
    target = Described(ulong(0x29), ["d1"])
    fields = [
        "c2d", uint(0), True, ubyte(1), ubyte(0), source, target, None, False, None,
        ulong(65536), None, None, {symbol("com.microsoft:client-version"): "sdk/1"},
        *EXTRA_FIELDS,
    ]  # fmt: skip
    return pframe(ATTACH, fields)


def _attach_frames(data: bytes) -> list:
    return [f[2] for f in decode_frames(data) if f[0] == ATTACH]


def test_unknown_attach_fields_survive_both_mirror_directions():
    device_side = Connection("server", "gw")
    device_side.open()
    events = device_side.receive_data(
        AMQP_HEADER + p_open() + p_begin() + _attach_with_extra_fields()
    )
    session = next(e.session for e in events if isinstance(e, RemoteBegin))
    session.answer_begin()
    attach: Attach = next(e.attach for e in events if isinstance(e, RemoteAttach))
    assert attach._extra == (Symbol("x-future-field"), {Symbol("k"): UInt(7)})
    device_side.data_to_send()

    # Upstream: the router attaches with the device's fields, unknown ones included.
    upstream = Connection("client", "gw-up")
    upstream.open()
    up_link = upstream.begin().attach(
        "c2d@1", bool(attach.role), attach.source, attach.target,
        snd_settle_mode=attach.snd_settle_mode, rcv_settle_mode=attach.rcv_settle_mode,
        max_message_size=attach.max_message_size, properties=attach.properties,
        extra=attach._extra,
    )  # fmt: skip
    (sent,) = _attach_frames(upstream.data_to_send())
    assert len(sent) == 16 and sent[14:] == EXTRA_FIELDS
    assert sent[0] == "c2d@1" and sent[10] == 65536
    assert sent[13] == {symbol("com.microsoft:client-version"): "sdk/1"}
    assert up_link.local_attach._extra == attach._extra

    # Device side: the router answers with the hub's attach, unknown fields included.
    device_link = next(e.link for e in events if isinstance(e, RemoteAttach))
    device_link.answer_attach(attach.source, attach.target, extra=attach._extra)
    (answer,) = _attach_frames(device_side.data_to_send())
    assert len(answer) == 16 and answer[14:] == EXTRA_FIELDS
    assert answer[2] is False  # our role: sender


def test_attach_without_extra_fields_stays_compact():
    conn = Connection("client", "c")
    conn.open()
    conn.begin().attach("l", "sender", Source(address="a"), Target(address="b"))
    (sent,) = _attach_frames(conn.data_to_send())
    assert len(sent) < 14  # trailing defaults are omitted as before
    assert isinstance(sent[5], proton.Described)
