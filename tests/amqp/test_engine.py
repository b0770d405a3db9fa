"""Endpoint engine: state transitions and protocol errors.

Two of our engines back to back cover the state logic; every protocol-error case
feeds frames built with python-qpid-proton's encoder (``proton.Data``), not ours,
so a codec bug cannot hide behind itself.
"""

from __future__ import annotations

import struct

import proton
import pytest
from proton import Described, symbol, ubyte, uint, ulong

from gateway.amqp import (
    Connection,
    ConnectionError,
    DispositionReceived,
    LinkError,
    LocalProtocolError,
    RemoteAttach,
    RemoteBegin,
    RemoteClose,
    RemoteDetach,
    RemoteEnd,
    RemoteFlow,
    RemoteOpen,
    SaslClient,
    SaslServer,
    SessionState,
    TransferReceived,
)
from gateway.amqp.link import LinkState
from gateway.amqp.performatives import (
    Accepted,
    Close,
    Disposition,
    Error,
    Flow,
    Rejected,
    Released,
    Source,
    Target,
    Transfer,
)

from .test_engine_support import EngineApp, payload_for, pipe

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"


# ------------------------------------------------------------ frames built by proton


def pframe(code: int, fields: list, channel: int = 0, payload: bytes = b"", frame_type: int = 0) -> bytes:
    """A frame whose performative proton's codec encoded."""
    data = proton.Data()
    data.put_object(Described(ulong(code), fields))
    body = bytes(data.encode())
    return struct.pack(">IBBH", 8 + len(body) + len(payload), 2, frame_type, channel) + body + payload


def p_open(container="peer", max_frame=None, channel_max=None, idle_ms=None) -> bytes:
    fields = [container, None, None if max_frame is None else uint(max_frame)]
    fields += [None if channel_max is None else proton.ushort(channel_max)]
    fields += [None if idle_ms is None else uint(idle_ms)]
    return pframe(0x10, fields)


def p_begin(channel=0, remote_channel=None, next_outgoing=0, incoming=100, outgoing=100) -> bytes:
    rc = None if remote_channel is None else proton.ushort(remote_channel)
    return pframe(0x11, [rc, uint(next_outgoing), uint(incoming), uint(outgoing)], channel)


def p_attach(name="link", handle=0, role=False, channel=0, address="addr", idc=0, max_message_size=None) -> bytes:
    source = Described(ulong(0x28), [address])
    target = Described(ulong(0x29), [address])
    fields = [name, uint(handle), role, ubyte(2), ubyte(0), source, target, None, None]
    fields += [None if idc is None else uint(idc)]
    if max_message_size is not None:
        fields += [ulong(max_message_size)]
    return pframe(0x12, fields, channel)


def p_transfer(handle=0, delivery_id=0, tag=b"t", payload=b"m", channel=0, settled=False, more=False, aborted=False, fmt=0) -> bytes:
    fields = [
        uint(handle),
        None if delivery_id is None else uint(delivery_id),
        tag,
        None if fmt is None else uint(fmt),
        settled,
        more,
    ]
    if aborted:
        fields += [None, None, False, True]
    return pframe(0x14, fields, channel, payload)


def p_flow(handle=None, delivery_count=None, credit=None, next_incoming=0, incoming=100, next_outgoing=0, outgoing=100, drain=False, echo=False, channel=0) -> bytes:
    fields = [uint(next_incoming), uint(incoming), uint(next_outgoing), uint(outgoing)]
    fields += [None if handle is None else uint(handle), None if delivery_count is None else uint(delivery_count)]
    fields += [None if credit is None else uint(credit), None, drain, echo]
    return pframe(0x13, fields, channel)


def p_disposition(role=True, first=0, last=None, settled=True, state=None, channel=0) -> bytes:
    return pframe(0x15, [role, uint(first), None if last is None else uint(last), settled, state], channel)


def p_detach(handle=0, closed=True, channel=0) -> bytes:
    return pframe(0x16, [uint(handle), closed], channel)


def p_end(channel=0) -> bytes:
    return pframe(0x17, [], channel)


def p_close() -> bytes:
    return pframe(0x18, [])


def decode_frames(data: bytes) -> list:
    """Decode what our engine wrote, with proton's codec."""
    out = []
    pos = 0
    while pos < len(data):
        if data[pos : pos + 4] == b"AMQP":
            out.append(("header", data[pos : pos + 8]))
            pos += 8
            continue
        size, doff, ftype, channel = struct.unpack_from(">IBBH", data, pos)
        body = data[pos + doff * 4 : pos + size]
        pos += size
        if not body:
            out.append(("empty", channel))
            continue
        d = proton.Data()
        n = d.decode(body)
        d.rewind()
        d.next()
        obj = d.get_object()
        out.append((int(obj.descriptor), channel, _plain(obj.value), body[n:]))
    return out


def _plain(v):
    """proton hands binary values out as views of its own buffer: copy them."""
    if isinstance(v, memoryview):
        return bytes(v)
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, Described):
        return Described(v.descriptor, _plain(v.value))
    return v


def closed_with(data: bytes) -> tuple[str, str]:
    """The condition and description of the close (last frame) in ``data``."""
    frames = decode_frames(data)
    code, _channel, fields, _ = frames[-1]
    assert code == 0x18, frames
    err = fields[0]
    assert int(err.descriptor) == 0x1D
    return str(err.value[0]), err.value[1]


def server_with_link(credit: int = 10, *, incoming_window: int | None = None, auto_flow: bool = True, max_frame=65536, **kw):
    """Our server after a proton-encoded client opened, began and attached a sender."""
    conn = Connection("server", "gw", max_frame_size=max_frame, **kw)
    conn.open()
    events = conn.receive_data(AMQP_HEADER + p_open() + p_begin() + p_attach())
    session = next(e.session for e in events if isinstance(e, RemoteBegin))
    session.answer_begin(incoming_window=incoming_window, auto_flow=auto_flow)
    link = next(e.link for e in events if isinstance(e, RemoteAttach))
    link.answer_attach(link.remote_source, link.remote_target)
    if credit:
        link.flow(credit)
    conn.data_to_send()
    return conn, session, link


def assert_failed(conn: Connection, events: list, condition: str, fragment: str = "") -> None:
    errors = [e for e in events if isinstance(e, ConnectionError)]
    assert len(errors) == 1, events
    assert errors[0].error.condition == condition, errors[0].error
    assert fragment in errors[0].error.description
    wire_condition, description = closed_with(conn.data_to_send())
    assert wire_condition == condition
    assert fragment in description
    assert conn.closed
    # After the error nothing more is received or sent.
    assert conn.receive_data(p_transfer()) == []
    assert conn.receive_data(b"garbage") == []
    assert conn.data_to_send() == b""


# ------------------------------------------------------------------ protocol errors


def test_garbage_after_header_is_a_decode_error():
    conn = Connection("server", "gw")
    conn.open()
    conn.receive_data(AMQP_HEADER + p_open())
    conn.data_to_send()
    events = conn.receive_data(struct.pack(">IBBH", 12, 2, 0, 0) + b"\x00\x53\x10\xff")
    assert_failed(conn, events, "amqp:decode-error")


def test_unknown_performative_is_a_decode_error():
    conn = Connection("server", "gw")
    conn.open()
    events = conn.receive_data(AMQP_HEADER + p_open() + pframe(0x77, [uint(1)]))
    assert_failed(conn, events, "amqp:decode-error", "descriptor")


def test_frame_over_max_frame_size_fails_before_the_body_arrives():
    conn = Connection("server", "gw", max_frame_size=1024)
    conn.open()
    conn.receive_data(AMQP_HEADER + p_open())
    conn.data_to_send()
    # Only the 4 size bytes of a 1 MiB frame: refused at once.
    events = conn.receive_data(struct.pack(">I", 1 << 20))
    assert_failed(conn, events, "amqp:connection:framing-error", "1048576")


def test_frame_size_below_header_and_bad_doff():
    conn = Connection("server", "gw")
    conn.open()
    conn.receive_data(AMQP_HEADER + p_open())
    events = conn.receive_data(struct.pack(">IBBH", 4, 2, 0, 0))
    assert_failed(conn, events, "amqp:connection:framing-error")
    conn = Connection("server", "gw")
    conn.open()
    conn.receive_data(AMQP_HEADER + p_open())
    events = conn.receive_data(struct.pack(">IBBH", 8, 1, 0, 0))
    assert_failed(conn, events, "amqp:connection:framing-error", "offset")


def test_frame_on_a_channel_without_session():
    conn, _, _ = server_with_link()
    events = conn.receive_data(p_transfer(channel=7))
    assert_failed(conn, events, "amqp:connection:framing-error", "channel 7")


def test_transfer_on_unattached_handle():
    conn, _, _ = server_with_link()
    events = conn.receive_data(p_transfer(handle=5))
    assert_failed(conn, events, "amqp:session:unattached-handle", "handle 5")


def test_flow_and_detach_on_unattached_handle():
    conn, _, _ = server_with_link()
    events = conn.receive_data(p_flow(handle=3, delivery_count=0, credit=1))
    assert_failed(conn, events, "amqp:session:unattached-handle", "handle 3")
    conn, _, _ = server_with_link()
    events = conn.receive_data(p_detach(handle=9))
    assert_failed(conn, events, "amqp:session:unattached-handle", "handle 9")


def test_transfer_beyond_the_session_incoming_window():
    conn, session, link = server_with_link(credit=100, incoming_window=3, auto_flow=False)
    events = conn.receive_data(b"".join(p_transfer(delivery_id=i, tag=b"%d" % i) for i in range(3)))
    assert [type(e) for e in events] == [TransferReceived] * 3
    events = conn.receive_data(p_transfer(delivery_id=3, tag=b"3"))
    assert_failed(conn, events, "amqp:session:window-violation", "window")


def test_session_flow_restores_a_manual_window():
    conn, session, link = server_with_link(credit=100, incoming_window=2, auto_flow=False)
    conn.receive_data(p_transfer(delivery_id=0, tag=b"0") + p_transfer(delivery_id=1, tag=b"1"))
    assert session.windows.incoming_window == 0
    session.flow()
    (flow,) = decode_frames(conn.data_to_send())
    assert flow[0] == 0x13
    assert flow[2][:2] == [2, 2]  # next-incoming-id 2, incoming-window 2
    events = conn.receive_data(p_transfer(delivery_id=2, tag=b"2"))
    assert isinstance(events[0], TransferReceived)


def test_auto_flow_replenishes_the_window_at_half():
    conn, session, link = server_with_link(credit=1000, incoming_window=10)
    flows = []
    for i in range(40):
        conn.receive_data(p_transfer(delivery_id=i, tag=b"%d" % i))
        flows += [f for f in decode_frames(conn.data_to_send()) if f[0] == 0x13]
    assert len(flows) == 8  # every 5 transfers
    assert [f[2][0] for f in flows] == [5, 10, 15, 20, 25, 30, 35, 40]  # next-incoming-id
    assert all(f[2][1] == 10 for f in flows)


def test_transfer_without_credit_exceeds_the_transfer_limit():
    conn, _, link = server_with_link(credit=2)
    events = conn.receive_data(p_transfer(delivery_id=0, tag=b"a") + p_transfer(delivery_id=1, tag=b"b"))
    assert len(events) == 2 and link.credit == 0
    events = conn.receive_data(p_transfer(delivery_id=2, tag=b"c"))
    assert_failed(conn, events, "amqp:link:transfer-limit-exceeded", "credit")


def test_transfers_in_flight_when_credit_is_lowered_are_accepted():
    conn, _, link = server_with_link(credit=5)
    link.flow(1)  # lowered; the sender may already have sent against 5
    events = conn.receive_data(b"".join(p_transfer(delivery_id=i, tag=b"%d" % i) for i in range(5)))
    assert [type(e) for e in events] == [TransferReceived] * 5
    events = conn.receive_data(p_transfer(delivery_id=5, tag=b"5"))
    assert isinstance(events[0], ConnectionError)


def test_attach_on_a_handle_in_use():
    conn, _, _ = server_with_link()
    events = conn.receive_data(p_attach(name="other", handle=0))
    assert_failed(conn, events, "amqp:session:handle-in-use", "handle 0")


def test_frame_before_open_and_second_open():
    conn = Connection("server", "gw")
    conn.open()
    events = conn.receive_data(AMQP_HEADER + p_begin())
    assert_failed(conn, events, "amqp:connection:framing-error", "expected open")
    conn = Connection("server", "gw")
    conn.open()
    events = conn.receive_data(AMQP_HEADER + p_open() + p_open())
    assert_failed(conn, events, "amqp:connection:framing-error", "Open")


def test_open_with_max_frame_size_below_512():
    conn = Connection("server", "gw")
    conn.open()
    events = conn.receive_data(AMQP_HEADER + p_open(max_frame=100))
    assert_failed(conn, events, "amqp:invalid-field", "512")


def test_sasl_frame_after_sasl():
    conn = Connection("server", "gw")
    conn.open()
    events = conn.receive_data(AMQP_HEADER + p_open() + pframe(0x41, [symbol("PLAIN")], frame_type=1))
    assert_failed(conn, events, "amqp:connection:framing-error", "SASL")


def test_disposition_range_running_backwards():
    conn, _, link = server_with_link()
    conn.receive_data(p_transfer())
    events = conn.receive_data(p_disposition(role=False, first=5, last=2))
    assert_failed(conn, events, "amqp:invalid-field", "5..2")


def test_begin_errors():
    conn, _, _ = server_with_link()
    events = conn.receive_data(p_begin(channel=0))
    assert_failed(conn, events, "amqp:not-allowed", "channel 0")
    conn, _, _ = server_with_link()
    events = conn.receive_data(p_begin(channel=1, remote_channel=6))
    assert_failed(conn, events, "amqp:not-allowed", "channel 6")
    conn = Connection("server", "gw", channel_max=3)
    conn.open()
    events = conn.receive_data(AMQP_HEADER + p_open() + p_begin(channel=4))
    assert_failed(conn, events, "amqp:not-allowed", "channel-max")


def test_mandatory_field_missing_is_a_decode_error():
    conn, _, _ = server_with_link()
    events = conn.receive_data(pframe(0x14, [None]))
    assert_failed(conn, events, "amqp:decode-error", "handle")


def test_continuation_with_another_delivery_id():
    conn, _, _ = server_with_link()
    conn.receive_data(p_transfer(delivery_id=0, more=True))
    events = conn.receive_data(p_transfer(delivery_id=1, tag=None, more=False))
    assert_failed(conn, events, "amqp:invalid-field", "delivery-id 1")


def test_first_transfer_without_delivery_id():
    conn, _, _ = server_with_link()
    events = conn.receive_data(p_transfer(delivery_id=None))
    assert_failed(conn, events, "amqp:invalid-field", "delivery-id")


def test_reassembly_bounded_by_max_message_size_of_our_attach():
    conn = Connection("server", "gw")
    conn.open()
    events = conn.receive_data(AMQP_HEADER + p_open() + p_begin() + p_attach())
    events[-2].session.answer_begin()
    link = events[-1].link
    link.answer_attach(link.remote_source, link.remote_target, max_message_size=1000)
    link.flow(5)
    conn.data_to_send()
    events = conn.receive_data(p_transfer(payload=b"x" * 600, more=True))
    assert events == []
    events = conn.receive_data(p_transfer(delivery_id=None, tag=None, payload=b"x" * 600, more=True))
    # Only the link goes: detached (closed) with message-size-exceeded.
    (err,) = events
    assert isinstance(err, LinkError) and err.link is link and err.closed
    assert err.error.condition == "amqp:link:message-size-exceeded"
    assert "1000" in err.error.description and "1200" in err.error.description
    assert link.state is LinkState.DETACH_SENT and link.local_detach_error is err.error
    ((code, channel, fields, _),) = decode_frames(conn.data_to_send())
    assert code == 0x16 and fields[:2] == [0, True]
    assert str(fields[2].value[0]) == "amqp:link:message-size-exceeded"
    # The rest of that delivery, and a delivery already in flight, are dropped.
    events = conn.receive_data(
        p_transfer(delivery_id=None, tag=None, payload=b"x" * 600)
        + p_transfer(delivery_id=1, tag=b"u", payload=b"late")
    )
    assert events == [] and conn.data_to_send() == b""
    events = conn.receive_data(p_detach())
    assert [type(e) for e in events] == [RemoteDetach]
    assert link.state is LinkState.DETACHED and not link.unsettled
    assert conn.is_open
    # The session goes on: a new link on the recycled handle works.
    (attach,) = conn.receive_data(p_attach(name="again"))
    attach.link.answer_attach(attach.link.remote_source, attach.link.remote_target)
    attach.link.flow(1)
    (t,) = conn.receive_data(p_transfer(delivery_id=2, payload=b"ok"))
    assert isinstance(t, TransferReceived) and bytes(t.payload) == b"ok"


def test_single_frame_over_max_message_size_detaches_the_link():
    conn, session, link = server_with_link(max_message_size=100)
    (err,) = conn.receive_data(p_transfer(payload=b"y" * 101))
    assert isinstance(err, LinkError) and err.error.condition == "amqp:link:message-size-exceeded"
    assert "101 bytes" in err.error.description and "100" in err.error.description
    assert not session.in_unsettled and link.state is LinkState.DETACH_SENT
    assert conn.is_open


def test_eof_without_close_and_after_close():
    conn, _, _ = server_with_link()
    events = conn.receive_data(b"")
    assert [type(e) for e in events] == [ConnectionError]
    assert events[0].error.condition == "amqp:connection:framing-error"
    assert conn.closed
    conn, _, _ = server_with_link()
    events = conn.receive_data(p_close())
    assert [type(e) for e in events] == [RemoteClose]
    conn.close()
    assert conn.closed
    assert conn.receive_data(b"") == []


def test_local_misuse_raises_local_protocol_error():
    conn, session, link = server_with_link()
    with pytest.raises(LocalProtocolError):
        link.send_transfer(b"t", b"x")  # a receiver link
    with pytest.raises(LocalProtocolError):
        link.answer_attach(None, None)  # already answered
    with pytest.raises(LocalProtocolError):
        session.answer_begin()
    with pytest.raises(LocalProtocolError):
        link.flow(-1)
    client = Connection("client", "c")
    with pytest.raises(LocalProtocolError):
        client.begin()  # before open()


def test_header_mismatches():
    # A peer speaking some other protocol gets our header and is dropped.
    conn = Connection("server", "gw")
    events = conn.receive_data(b"GET / HTTP/1.1\r\n")
    assert [type(e) for e in events] == [ConnectionError]
    assert conn.data_to_send() == AMQP_HEADER
    assert conn.closed
    # A SASL header to a server without SASL: the AMQP header back, then closed.
    conn = Connection("server", "gw")
    events = conn.receive_data(SASL_HEADER)
    assert isinstance(events[0], ConnectionError) and "SASL" in events[0].error.description
    assert conn.data_to_send() == AMQP_HEADER
    # An AMQP header when SASL is required: the SASL header back, then closed.
    conn = Connection("server", "gw", sasl=SaslServer(["PLAIN"]))
    events = conn.receive_data(AMQP_HEADER)
    assert isinstance(events[0], ConnectionError)
    assert conn.data_to_send() == SASL_HEADER
    # A TLS header: not on a plaintext listener.
    conn = Connection("server", "gw")
    events = conn.receive_data(b"AMQP\x02\x01\x00\x00")
    assert isinstance(events[0], ConnectionError)
    # A client whose server answers with the wrong header.
    conn = Connection("client", "c", sasl=SaslClient("ANONYMOUS"))
    conn.open()
    conn.data_to_send()
    events = conn.receive_data(AMQP_HEADER)
    assert isinstance(events[0], ConnectionError) and "SASL" in events[0].error.description


def test_header_arriving_byte_by_byte():
    conn = Connection("server", "gw", sasl=SaslServer(["ANONYMOUS"]))
    conn.open()
    data = SASL_HEADER + pframe(0x41, [symbol("ANONYMOUS"), b"trace"], frame_type=1) + AMQP_HEADER + p_open()
    events = []
    for i in range(len(data)):
        events += conn.receive_data(data[i : i + 1])
    assert [type(e).__name__ for e in events] == ["SaslAuthenticated", "RemoteOpen"]
    frames = decode_frames(conn.data_to_send())
    assert frames[0] == ("header", SASL_HEADER)
    assert frames[1][0] == 0x40  # mechanisms
    assert frames[2][0] == 0x44 and frames[2][2][0] == 0  # outcome ok
    assert frames[3] == ("header", AMQP_HEADER)
    assert frames[4][0] == 0x10  # our open


# ---------------------------------------------------------------- our close on errors


def test_error_before_our_open_sends_open_then_close():
    conn = Connection("server", "gw")  # open() never called
    conn.receive_data(AMQP_HEADER)
    assert conn.data_to_send() == AMQP_HEADER
    events = conn.receive_data(p_open() + p_begin(channel=0) + p_transfer(channel=3))
    assert isinstance(events[-1], ConnectionError)
    frames = decode_frames(conn.data_to_send())
    assert [f[0] for f in frames] == [0x10, 0x18]


# ------------------------------------------------------------- back-to-back engines


def make_pair(*, sasl=True, client_kw=None, server_kw=None):
    client = Connection(
        "client", "client-1",
        sasl=SaslClient.plain("dev1", "secret") if sasl else None,
        hostname="hub.example", **(client_kw or {}),
    )  # fmt: skip
    server = Connection(
        "server", "server-1", sasl=SaslServer(["PLAIN", "ANONYMOUS"]) if sasl else None,
        **(server_kw or {}),
    )  # fmt: skip
    return client, server


def test_client_pipelines_begin_and_attach_behind_sasl_and_open():
    client, server = make_pair()
    client.open()
    session = client.begin()
    link = session.attach("l1", "sender", Source(address="s"), Target(address="t"))
    # Nothing but the SASL header can go out before SASL completes.
    assert client.data_to_send() == SASL_HEADER
    capp = EngineApp(client)
    sapp = EngineApp(server, credit=7)
    server.open()
    server.receive_data(SASL_HEADER)
    pipe(client, server, capp, sapp)
    assert sapp.auth.identity == "dev1" and sapp.auth.password == "secret"
    assert [type(e).__name__ for e in sapp.events] == [
        "SaslAuthenticated", "RemoteOpen", "RemoteBegin", "RemoteAttach",
    ]  # fmt: skip
    assert session.state is SessionState.MAPPED
    assert link.state is LinkState.ATTACHED and link.credit == 7
    assert client.is_open and server.is_open
    assert client.remote_open.container_id == "server-1"


def test_max_frame_size_and_channel_max_negotiation():
    client, server = make_pair(
        sasl=False,
        client_kw={"max_frame_size": 4096, "channel_max": 10},
        server_kw={"max_frame_size": 1024, "channel_max": 2},
    )
    client.open()
    server.open()
    pipe(client, server, EngineApp(client), EngineApp(server))
    assert client.send_max_frame_size == 1024 and server.send_max_frame_size == 1024
    sessions = [client.begin() for _ in range(3)]  # channels 0, 1, 2
    assert [s.channel for s in sessions] == [0, 1, 2]
    with pytest.raises(LocalProtocolError):
        client.begin()


def _linked_pair(credit=10, **kw):
    client, server = make_pair(sasl=False, **kw)
    client.open()
    server.open()
    capp = EngineApp(client)
    sapp = EngineApp(server, credit=credit)
    session = client.begin()
    link = session.attach("snd", "sender", Source(address="a"), Target(address="b"))
    pipe(client, server, capp, sapp)
    return client, server, capp, sapp, session, link


def test_credit_queueing_and_release():
    client, server, capp, sapp, session, link = _linked_pair(credit=0)
    deliveries = [link.send_transfer(b"%d" % i, payload_for(i)) for i in range(5)]
    assert link.queued == 5 and link.queued_bytes == sum(len(payload_for(i)) for i in range(5))
    assert all(d.delivery_id is None for d in deliveries)
    pipe(client, server, capp, sapp)
    assert sapp.received == []
    peer_link = sapp.links[0]
    peer_link.flow(3)
    pipe(client, server, capp, sapp)
    assert [bytes(e.payload) for e in sapp.received] == [payload_for(i) for i in range(3)]
    assert link.queued == 2 and link.credit == 0 and link.delivery_count == 3
    assert [d.delivery_id for d in deliveries] == [0, 1, 2, None, None]
    peer_link.add_credit(10)
    pipe(client, server, capp, sapp)
    assert len(sapp.received) == 5 and link.queued == 0 and link.credit == 8


def test_session_window_queues_frames_and_resumes():
    client, server = make_pair(sasl=False, server_kw={"max_frame_size": 512})
    client.open()
    server.open()
    capp = EngineApp(client)
    sapp = EngineApp(server, credit=100, incoming_window=4)
    sapp_window = []

    def on_server(events):
        sapp(events)
        for e in events:
            if isinstance(e, RemoteBegin):
                sapp_window.append(e.session)

    session = client.begin()
    link = session.attach("snd", "sender")
    pipe(client, server, capp, on_server)
    server_session = sapp_window[0]
    server_session.auto_flow = False
    big = payload_for(0, 5000)  # 11 frames of 512
    link.send_transfer(b"big", big)
    assert session.windows.remote_incoming_window == 0 and link.queued == 1
    pipe(client, server, capp, on_server)
    assert sapp.received == []
    server_session.flow()
    pipe(client, server, capp, on_server)
    assert sapp.received == []
    server_session.flow(incoming_window=10)
    pipe(client, server, capp, on_server)
    assert [bytes(e.payload) for e in sapp.received] == [big]
    assert link.queued == 0


def test_dispositions_and_settlement_modes():
    client, server, capp, sapp, session, link = _linked_pair(credit=100)
    ds = [link.send_transfer(b"%d" % i, b"m%d" % i) for i in range(10)]
    pipe(client, server, capp, sapp)
    got = sapp.received
    # Receiver settles 0..3 accepted (one range), 4 rejected, 5..6 released (unsettled).
    server.disposition([e.delivery for e in got[:4]], settled=True, state=Accepted())
    got[4].delivery.update(Rejected(Error("amqp:not-allowed", "no")), settled=True)
    server.disposition([got[5].delivery, got[6].delivery], settled=False, state=Released())
    frames = decode_frames(server.data_to_send())
    assert [(f[2][1], f[2][2]) for f in frames] == [(0, 3), (4, None), (5, 6)]
    client.receive_data(b"".join(pframe(0x15, f[2], f[1]) for f in frames))
    assert all(d.remote_settled and type(d.remote_state) is Accepted for d in ds[:4])
    assert ds[4].remote_state.error.description == "no"
    assert not ds[5].remote_settled and type(ds[5].remote_state) is Released
    # Sender settles 5 and 6 after the receiver's outcome (rcv-settle-mode second style).
    client.disposition(ds[5:7], settled=True)
    pipe(client, server, capp, sapp)
    settled = [e for e in sapp.dispositions if e.settled]
    assert [d.delivery_tag for d in settled[-1].deliveries] == [b"5", b"6"]
    # Settling what the peer already settled sends nothing.
    client.disposition(ds[:4], settled=True)
    assert client.data_to_send() == b""


def test_disposition_touching_many_ids_uses_the_table_not_the_range():
    client, server, capp, sapp, session, link = _linked_pair(credit=100)
    ds = [link.send_transfer(b"%d" % i, b"m") for i in range(3)]
    pipe(client, server, capp, sapp)
    events = client.receive_data(p_disposition(role=True, first=0, last=0x7FFFFFF0, settled=True))
    (disp,) = [e for e in events if isinstance(e, DispositionReceived)]
    assert disp.deliveries == ds and all(d.remote_settled for d in ds)


def test_multiframe_abort_and_settled_continuation():
    conn, session, link = server_with_link(credit=10)
    assert conn.receive_data(p_transfer(delivery_id=0, tag=b"a", payload=b"12", more=True)) == []
    events = conn.receive_data(p_transfer(delivery_id=0, tag=None, payload=b"", aborted=True))
    (e,) = events
    assert e.aborted and e.payload == b"" and e.delivery.aborted
    assert conn.receive_data(p_transfer(delivery_id=1, tag=b"b", payload=b"12", more=True)) == []
    events = conn.receive_data(p_transfer(delivery_id=None, tag=None, payload=b"34", settled=True))
    (e,) = events
    assert e.payload == b"1234" and e.settled and isinstance(e.payload, bytes)
    assert e.delivery.delivery_tag == b"b"
    assert session.in_unsettled == {}


def test_sender_abort_of_a_partly_sent_delivery():
    client, server = make_pair(sasl=False, server_kw={"max_frame_size": 512})
    client.open()
    server.open()
    capp, sapp = EngineApp(client), EngineApp(server, credit=10, incoming_window=2)
    sessions = []
    session = client.begin()
    link = session.attach("snd", "sender")

    def on_server(events):
        for e in events:
            if isinstance(e, RemoteBegin):
                sessions.append(e.session)
        sapp(events)

    pipe(client, server, capp, on_server)
    sessions[0].auto_flow = False
    d = link.send_transfer(b"big", b"x" * 5000)
    pipe(client, server, capp, on_server)
    assert link.queued == 1 and sapp.received == []
    link.abort(d)
    sessions[0].flow()
    pipe(client, server, capp, on_server)
    (e,) = sapp.received
    assert e.aborted and e.delivery_tag == b"big"
    assert link.queued == 0


def test_message_format_and_state_on_transfer():
    client, server, capp, sapp, session, link = _linked_pair(credit=5)
    link.send_transfer(b"a", b"batch", message_format=0x80013700)
    link.send_transfer(b"b", b"with-state", state=Accepted())
    pipe(client, server, capp, sapp)
    assert sapp.received[0].message_format == 0x80013700
    assert type(sapp.received[1].state) is Accepted


def test_echo_and_drain_between_engines():
    client, server, capp, sapp, session, link = _linked_pair(credit=4)
    sapp.refill = False
    peer = sapp.links[0]
    peer.flow(4, drain=True)
    pipe(client, server, capp, sapp)
    assert link.drain and link.credit == 4
    link.send_transfer(b"a", b"1", settled=True)
    assert link.drained() == 3
    pipe(client, server, capp, sapp)
    assert peer.credit == 0 and peer.delivery_count == 4 and not peer.drain
    # echo: the peer answers with its own flow state.
    before = len([e for e in capp.events if isinstance(e, RemoteFlow)])
    link.flow(echo=True, available=9)
    pipe(client, server, capp, sapp)
    assert peer.available == 9
    assert len([e for e in capp.events if isinstance(e, RemoteFlow)]) == before + 1


def test_detach_race_and_handle_reuse():
    client, server, capp, sapp, session, link = _linked_pair()
    peer = sapp.links[0]
    # Both detach at once: each one's detach answers the other's.
    link.detach(Error("amqp:link:detach-forced", "bye"))
    peer.detach()
    pipe(client, server, capp, sapp)
    assert link.state is LinkState.DETACHED and peer.state is LinkState.DETACHED
    assert [e.error.description for e in sapp.events if isinstance(e, RemoteDetach)] == ["bye"]
    assert session._links == {} and session._remote_links == {}
    again = session.attach("snd2", "sender")
    assert again.handle == 0  # recycled


def test_refusal_by_null_terminus_then_detach():
    client, server = make_pair(sasl=False)
    client.open()
    server.open()
    capp = EngineApp(client)

    def refuse(events):
        for e in events:
            if isinstance(e, RemoteBegin):
                e.session.answer_begin()
            elif isinstance(e, RemoteAttach):
                e.link.detach(Error("amqp:not-found", "no route"))  # answers with null terminus first

    session = client.begin()
    link = session.attach("x", "sender", Source(address="s"), Target(address="nowhere"))
    pipe(client, server, capp, refuse)
    attach = next(e for e in capp.events if isinstance(e, RemoteAttach))
    assert attach.attach.source is None and attach.attach.target is None
    detach = next(e for e in capp.events if isinstance(e, RemoteDetach))
    assert detach.error.condition == "amqp:not-found"
    assert link.state is LinkState.DETACHED


def test_peer_detaches_before_we_answer_its_attach():
    conn = Connection("server", "gw")
    conn.open()
    events = conn.receive_data(AMQP_HEADER + p_open() + p_begin())
    events[-1].session.answer_begin()
    conn.data_to_send()
    events = conn.receive_data(p_attach() + p_detach())
    assert [type(e) for e in events] == [RemoteAttach, RemoteDetach]
    frames = decode_frames(conn.data_to_send())
    assert [f[0] for f in frames] == [0x12, 0x16]  # attach (null terminus) + detach
    assert events[0].link.state is LinkState.DETACHED
    assert conn.receive_data(p_attach(handle=0)) != []  # the handle is free again


def test_end_and_close_with_errors_propagate():
    client, server, capp, sapp, session, link = _linked_pair()
    session.end(Error("amqp:internal-error", "session gone"))
    pipe(client, server, capp, sapp)
    (end,) = [e for e in sapp.events if isinstance(e, RemoteEnd)]
    assert end.error.description == "session gone"
    assert all(lk.state is LinkState.DETACHED for lk in end.session.links)
    assert session.state is SessionState.UNMAPPED and client._local_sessions == {}
    client.close(Error("amqp:connection:forced", "shutting down"))
    pipe(client, server, capp, sapp)
    (close,) = [e for e in sapp.events if isinstance(e, RemoteClose)]
    assert close.error.condition == "amqp:connection:forced"
    assert client.closed and server.closed


def test_remote_open_event_and_properties():
    client, server = make_pair(sasl=False, client_kw={"properties": {symbol("product"): "gw"}, "idle_timeout": 30})
    client.open()
    server.open()
    sapp = EngineApp(server)
    pipe(client, server, EngineApp(client), sapp)
    (open_,) = [e for e in sapp.events if isinstance(e, RemoteOpen)]
    assert open_.open.properties == {"product": "gw"}
    assert open_.open.idle_time_out == 30000
    assert server.remote_idle_timeout == 30.0


def test_delivery_ids_wrap_around():
    client, server, capp, sapp, session, link = _linked_pair(credit=100)
    session.next_delivery_id = 0xFFFFFFFE
    ds = [link.send_transfer(b"%d" % i, b"m") for i in range(4)]
    pipe(client, server, capp, sapp)
    assert [d.delivery_id for d in ds] == [0xFFFFFFFE, 0xFFFFFFFF, 0, 1]
    server.disposition([e.delivery for e in sapp.received], settled=True, state=Accepted())
    frames = decode_frames(server.data_to_send())
    assert len(frames) == 1 and frames[0][2][1:3] == [0xFFFFFFFE, 1]
    client.receive_data(b"".join(pframe(0x15, f[2], f[1]) for f in frames))
    assert all(d.remote_settled for d in ds)


def test_oversized_performative_closes_with_frame_size_too_small():
    client, server, capp, sapp, session, link = _linked_pair(server_kw={"max_frame_size": 512})
    session.attach("big", "sender", properties={symbol("k"): "v" * 600})
    events = client.receive_data(b"")  # any call returns the queued event
    errors = [e for e in events if isinstance(e, ConnectionError)]
    assert errors and errors[0].error.condition == "amqp:frame-size-too-small"


def test_idle_timeout_deadlines_and_heartbeats():
    client, server = make_pair(sasl=False, client_kw={"idle_timeout": 10}, server_kw={"idle_timeout": 4})
    client.open()
    server.open()
    pipe(client, server, EngineApp(client), EngineApp(server))
    assert client.remote_idle_timeout == 4 and server.remote_idle_timeout == 10
    now = 100.0
    client.tick(now)
    assert client.next_deadline(now) == now + 2  # heartbeat for the server, every 2 s
    client.tick(now + 2)
    assert client.data_to_send() == b"\x00\x00\x00\x08\x02\x00\x00\x00"
    events = client.tick(now + 10)
    assert isinstance(events[-1], ConnectionError)
    assert events[-1].error.condition == "amqp:resource-limit-exceeded"
    assert closed_with(client.data_to_send()) == ("amqp:resource-limit-exceeded", "local-idle-timeout expired")


def test_server_open_is_sent_after_the_header_whenever_called():
    server = Connection("server", "gw")
    server.receive_data(AMQP_HEADER + p_open())
    assert server.data_to_send() == AMQP_HEADER
    server.open()
    frames = decode_frames(server.data_to_send())
    assert frames[0][0] == 0x10 and frames[0][2][0] == "gw"


def test_transfer_fields_on_the_wire_are_what_proton_decodes():
    client, server, capp, sapp, session, link = _linked_pair(credit=5, server_kw={"max_frame_size": 512})
    link.send_transfer(b"tag-1", b"x" * 1200, message_format=7)
    frames = decode_frames(client.data_to_send())
    transfers = [f for f in frames if f[0] == 0x14]
    assert len(transfers) == 3
    first = transfers[0][2]
    assert first[:2] == [0, 0] and bytes(first[2]) == b"tag-1" and first[3:6] == [7, False, True]
    assert transfers[-1][2][5] is False if len(transfers[-1][2]) > 5 else True
    assert sum(len(f[3]) for f in transfers) == 1200
    assert all(8 + len(f[3]) < 512 for f in transfers)


def test_api_objects_types():
    # The wire values the router relays are the codec's typed values.
    conn, session, link = server_with_link()
    assert isinstance(link.remote_attach.source, Source)
    (e,) = conn.receive_data(p_transfer(tag=b"\x00\x01"))
    assert e.delivery_tag == b"\x00\x01" and e.delivery.delivery_id == 0
    assert isinstance(Flow, type) and isinstance(Transfer, type) and isinstance(Close, type)
    assert isinstance(Disposition, type)


def test_end_before_the_peer_answered_begin():
    client, server = make_pair(sasl=False)
    client.open()
    server.open()
    capp, sapp = EngineApp(client), EngineApp(server)
    pipe(client, server, capp, sapp)
    session = client.begin()
    session.end()  # races the peer's begin
    pipe(client, server, capp, sapp)
    assert not capp.errors and not sapp.errors
    assert session.state is SessionState.UNMAPPED
    assert client._local_sessions == {} and server._remote_sessions == {}


def test_detach_before_the_peer_answered_attach():
    client, server, capp, sapp, session, link = _linked_pair()
    quick = session.attach("quick", "receiver")
    quick.detach()
    pipe(client, server, capp, sapp)
    assert not capp.errors and not sapp.errors
    assert quick.state is LinkState.DETACHED
    assert [lk.name for lk in session._links.values()] == ["snd"]


def test_link_unsettled_lists_deliveries_awaiting_settlement():
    client, server, capp, sapp, session, link = _linked_pair(credit=10)
    ds = [link.send_transfer(b"%d" % i, b"m", settled=i == 1) for i in range(3)]
    pipe(client, server, capp, sapp)
    assert link.unsettled == [ds[0], ds[2]]
    peer = sapp.links[0]
    assert [d.delivery_tag for d in peer.unsettled] == [b"0", b"2"]
    server.disposition(sapp.received[0].delivery, settled=True, state=Accepted())
    pipe(client, server, capp, sapp)
    assert link.unsettled == [ds[2]]


def test_trace_reports_frames_both_ways_without_secrets():
    seen = []
    client = Connection(
        "client", "c", sasl=SaslClient.plain("dev1", "SharedAccessSignature sig=SECRET"),
        trace=lambda *a: seen.append(("client",) + a),
    )  # fmt: skip
    server = Connection("server", "s", sasl=SaslServer(["PLAIN"]), trace=lambda *a: seen.append(("server",) + a))
    client.open()
    server.open()
    sapp = EngineApp(server, credit=5)
    session = client.begin()
    link = session.attach("l", "sender")
    pipe(client, server, EngineApp(client), sapp)
    link.send_transfer(b"t", b"payload-bytes")
    pipe(client, server, EngineApp(client), sapp)
    text = "\n".join(repr(x) for x in seen)
    assert "SECRET" not in text and "payload-bytes" not in text
    kinds = [(who, d, w if isinstance(w, bytes) else type(w).__name__) for who, d, _, w, _ in seen]
    assert ("client", "->", SASL_HEADER) in kinds
    assert ("server", "<-", "SaslInit") in kinds
    assert ("server", "->", "SaslOutcome") in kinds
    assert ("client", "->", "Transfer") in kinds
    transfer = next(x for x in seen if x[0] == "server" and type(x[3]).__name__ == "Transfer")
    assert transfer[4] == len(b"payload-bytes")


def test_close_during_sasl_just_stops():
    client = Connection("client", "c", sasl=SaslClient.anonymous())
    client.open()
    client.data_to_send()
    client.close()
    assert client.closed and client.data_to_send() == b""


# --------------------------------------------- which failures are the peer's protocol errors


def test_connection_error_says_whether_the_peer_broke_the_protocol():
    # The peer's fault: a frame out of state, a malformed frame, a header we refuse.
    conn, _, _ = server_with_link(credit=1)
    events = conn.receive_data(p_transfer(delivery_id=0, tag=b"a") + p_transfer(delivery_id=1, tag=b"b"))
    (err,) = [e for e in events if isinstance(e, ConnectionError)]
    assert err.protocol and err.error.condition == "amqp:link:transfer-limit-exceeded"
    conn, _, _ = server_with_link()
    (err,) = conn.receive_data(struct.pack(">IBBH", 13, 2, 0, 0) + b"\xa1\x03abc")
    assert isinstance(err, ConnectionError) and err.protocol
    (err,) = Connection("server", "gw").receive_data(b"GET / HTTP/1.1\r\n")
    assert isinstance(err, ConnectionError) and err.protocol
    # Not the peer's protocol error: EOF, a SASL refusal, our idle timeout, our own oversize.
    conn, _, _ = server_with_link()
    (err,) = conn.receive_data(b"")
    assert isinstance(err, ConnectionError) and not err.protocol
    conn = Connection("server", "gw", sasl=SaslServer(["PLAIN"]))
    conn.receive_data(SASL_HEADER)
    events = conn.receive_data(pframe(0x41, [symbol("ANONYMOUS"), b""], frame_type=1))
    assert [e.protocol for e in events if isinstance(e, ConnectionError)] == [False]
    client, server = make_pair(sasl=False, client_kw={"idle_timeout": 10})
    client.open()
    server.open()
    pipe(client, server, EngineApp(client), EngineApp(server))
    client.tick(100.0)
    events = client.tick(110.0)
    assert isinstance(events[-1], ConnectionError) and not events[-1].protocol
    client, server, *_, session, _ = _linked_pair(server_kw={"max_frame_size": 512})
    session.attach("big", "sender", properties={symbol("k"): "v" * 600})
    errors = [e for e in client.receive_data(b"") if isinstance(e, ConnectionError)]
    assert errors and not errors[0].protocol
