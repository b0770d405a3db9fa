"""Performatives asked for before the peer's begin comes back, and link handles.

A client (the gateway towards the hub) begins a session and attaches right away;
whatever it asks for next must reach the peer once that is possible, never be
dropped. The peer's frames here are encoded by python-qpid-proton (``pframe``
helpers), and what we write is decoded by proton too.
"""

from __future__ import annotations

import struct

import proton
from proton import Event as PE

from gateway.amqp import (
    Connection,
    ConnectionError,
    RemoteAttach,
    RemoteBegin,
    SaslClient,
    SessionState,
    TransferReceived,
)
from gateway.amqp.link import LinkState
from gateway.amqp.performatives import Source, Target

from .test_against_proton import ProtonSender, _proton_server, _proton_server_handler
from .test_engine import (
    AMQP_HEADER,
    decode_frames,
    p_attach,
    p_begin,
    p_detach,
    p_open,
    p_transfer,
)
from .test_engine_support import EngineApp, exchange, payload_for

FLOW, ATTACH, DETACH, BEGIN = 0x13, 0x12, 0x16, 0x11


def _client_with_session(**begin_kw):
    conn = Connection("client", "c")
    conn.open()
    session = conn.begin(**begin_kw)
    return conn, session


def _codes(frames) -> list:
    return [f[0] for f in frames if f[0] != "header"]


def _peer_answers_begin(conn: Connection, **kw) -> list:
    return conn.receive_data(AMQP_HEADER + p_open() + p_begin(remote_channel=0, **kw))


def test_receiver_credit_granted_before_the_begin_answer_reaches_proton():
    # The gateway's upstream side: begin, attach a receiver and grant credit at once.
    peer, state = _proton_server(mechs="ANONYMOUS")
    on_peer = _proton_server_handler(
        peer, state, senders_payloads=lambda link: ProtonSender(link, 5, presettle=lambda i: True)
    )
    ours = Connection("client", "gw", sasl=SaslClient.anonymous())
    got = []

    def on_ours(events):
        got.extend(e for e in events if isinstance(e, TransferReceived))

    ours.open()
    session = ours.begin()
    rcv = session.attach("c2d", "receiver", Source(address="devices/d1/messages/devicebound"),
                         Target(address="d1"))  # fmt: skip
    rcv.flow(5)
    assert session.state is SessionState.BEGIN_SENT
    exchange(ours, peer, on_ours, on_peer)
    # No flow was lost: proton saw the credit and sent all five messages.
    assert [bytes(e.payload) for e in got] == [payload_for(i) for i in range(5)]
    assert state["senders"][0].sent == 5
    assert peer.transport.condition is None


def test_held_link_flows_coalesce_into_one_carrying_the_latest_state():
    conn, session = _client_with_session()
    rcv = session.attach("r", "receiver", Source(address="a"), Target(address="b"))
    rcv.flow(3)
    rcv.flow(7, drain=True, properties={"k": "v"})
    rcv.flow(9)
    frames = decode_frames(conn.data_to_send())
    assert FLOW not in _codes(frames)
    _peer_answers_begin(conn, next_outgoing=40)
    frames = decode_frames(conn.data_to_send())
    (flow,) = [f for f in frames if f[0] == FLOW]
    fields = flow[2]
    # next-incoming-id is known now (the peer's next-outgoing-id); credit is the
    # latest grant; the link has not seen the peer's attach, so delivery-count is null.
    assert fields[0] == 40 and fields[4] == 0 and fields[5] is None and fields[6] == 9
    assert fields[8] is False  # the last grant did not ask to drain
    assert dict(fields[10]) == {proton.symbol("k"): "v"}
    assert rcv.credit == 9


def test_held_session_flow_and_echo_go_out_once_mapped():
    conn, session = _client_with_session(auto_flow=False)
    session.flow(echo=True)
    assert FLOW not in _codes(decode_frames(conn.data_to_send()))
    _peer_answers_begin(conn)
    (flow,) = [f for f in decode_frames(conn.data_to_send()) if f[0] == FLOW]
    assert flow[2][4] is None and flow[2][9] is True  # session flow, echo set


def test_detach_before_the_begin_answer_goes_out_and_completes():
    conn, session = _client_with_session()
    link = session.attach("s", "sender", Source(address="a"), Target(address="b"))
    link.flow(echo=True)
    link.detach()
    frames = decode_frames(conn.data_to_send())
    assert _codes(frames) == [0x10, BEGIN, ATTACH, DETACH]  # open, begin, attach, detach
    assert link.state is LinkState.DETACH_SENT
    _peer_answers_begin(conn)
    assert FLOW not in _codes(decode_frames(conn.data_to_send()))  # the link is gone
    events = conn.receive_data(p_attach(name="s", role=True) + p_detach())
    assert [type(e).__name__ for e in events] == ["RemoteAttach", "RemoteDetach"]
    assert link.state is LinkState.DETACHED
    assert session.attach("again", "sender").handle == 0  # handle recycled


def test_answer_attach_uses_a_handle_reserved_when_the_attach_arrived():
    conn = Connection("server", "gw")
    conn.open()
    events = conn.receive_data(AMQP_HEADER + p_open() + p_begin() + p_attach(name="peer-link"))
    session = next(e.session for e in events if isinstance(e, RemoteBegin))
    session.answer_begin()
    peer_link = next(e.link for e in events if isinstance(e, RemoteAttach))
    # The application attaches a link of its own before answering the peer's.
    own = session.attach("own", "sender", Source(address="x"), Target(address="y"))
    peer_link.answer_attach(peer_link.remote_source, peer_link.remote_target)
    assert (peer_link.handle, own.handle) == (0, 1)
    attaches = [f for f in decode_frames(conn.data_to_send()) if f[0] == ATTACH]
    assert [(f[2][0], f[2][1]) for f in attaches] == [("own", 1), ("peer-link", 0)]


def test_peer_that_attaches_beyond_the_handle_space_it_allows_is_refused():
    # We attached two links before the peer's begin said handle-max 0; its attach
    # then leaves us no handle to answer with: a protocol error, not an exception
    # in the application's answer_attach.
    conn, session = _client_with_session()
    session.attach("in", "receiver", Source(address="a"), Target(address="b"))
    session.attach("out", "sender", Source(address="c"), Target(address="d"))
    conn.data_to_send()
    begin = p_begin(remote_channel=0)
    events = conn.receive_data(AMQP_HEADER + p_open() + _with_handle_max(begin, 0)
                               + p_attach(name="other", handle=0, role=False))  # fmt: skip
    (err,) = [e for e in events if isinstance(e, ConnectionError)]
    assert err.error.condition == "amqp:resource-limit-exceeded"
    assert "no handle left" in err.error.description and "'other'" in err.error.description
    assert conn.closed


def test_a_reserved_handle_returns_when_the_peer_detaches_before_our_answer():
    conn = Connection("server", "gw")
    conn.open()
    events = conn.receive_data(AMQP_HEADER + p_open() + p_begin() + p_attach(name="a"))
    session = next(e.session for e in events if isinstance(e, RemoteBegin))
    link = next(e.link for e in events if isinstance(e, RemoteAttach))
    assert link.handle == 0 and session.state is SessionState.BEGIN_RCVD
    conn.receive_data(p_detach())  # gone before we answered begin or attach
    assert link.state is LinkState.DETACHED
    session.answer_begin()
    assert session.attach("next", "sender").handle == 0
    # A transfer for the vanished link is the peer's error, reported as such.
    events = conn.receive_data(p_transfer())
    assert events and isinstance(events[-1], ConnectionError)


def _with_handle_max(begin_frame: bytes, handle_max: int) -> bytes:
    """Re-encode a proton-built begin frame with a handle-max field appended."""
    data = proton.Data()
    data.decode(begin_frame[8:])
    data.rewind()
    data.next()
    obj = data.get_object()
    fields = list(obj.value) + [proton.uint(handle_max)]
    out = proton.Data()
    out.put_object(proton.Described(obj.descriptor, fields))
    body = bytes(out.encode())
    return struct.pack(">IBBH", 8 + len(body), 2, 0, 0) + body


def test_proton_server_sees_our_pipelined_detach():
    peer, state = _proton_server(mechs="ANONYMOUS")
    closed = []

    def on_peer(ev):
        if ev.type == PE.LINK_REMOTE_CLOSE:
            closed.append(ev.link.name)
        handler(ev)

    handler = _proton_server_handler(peer, state, senders_payloads=lambda link: ProtonSender(link, 0))
    ours = Connection("client", "gw", sasl=SaslClient.anonymous())
    app = EngineApp(ours)
    ours.open()
    session = ours.begin()
    link = session.attach("s", "sender", Source(address="a"), Target(address="b"))
    link.detach()
    exchange(ours, peer, app, on_peer)
    assert closed == ["s"]
    assert link.state is LinkState.DETACHED and peer.transport.condition is None
