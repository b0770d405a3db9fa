"""Fuzzing the engine: whatever bytes a peer sends, only errors.AMQPError may escape
``receive_data`` (in practice none does: protocol errors become a ConnectionError
event), and after a ConnectionError nothing more is received or sent.

Three kinds of input: raw bytes after a valid header and open; valid frame streams
with bytes flipped, cut or spliced; and well-formed performatives with hostile field
values (handles, ids, windows, credit, ranges), which reach deeper into the state
machines than random bytes do.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.amqp import (
    AMQPError,
    Connection,
    ConnectionError,
    RemoteAttach,
    RemoteBegin,
    SaslClient,
    SaslServer,
    TransferReceived,
)
from gateway.amqp.framing import encode_frame
from gateway.amqp.link import LinkState
from gateway.amqp.performatives import (
    Accepted,
    Attach,
    Begin,
    Close,
    Detach,
    Disposition,
    End,
    Flow,
    Modified,
    Open,
    Rejected,
    Released,
    Source,
    Target,
    Transfer,
)
from gateway.amqp.session import SessionState

AMQP_HEADER = b"AMQP\x00\x01\x00\x00"
SASL_HEADER = b"AMQP\x03\x01\x00\x00"

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _frame(perf, channel=0, payload=b""):
    return encode_frame(perf, channel, payload)


PREFIX = (
    AMQP_HEADER
    + _frame(Open(container_id="fuzzer", max_frame_size=512))
    + _frame(Begin(next_outgoing_id=0, incoming_window=8, outgoing_window=100))
    + _frame(Attach(name="in", handle=0, role=False, source=Source(address="a"), target=Target(address="b"), initial_delivery_count=0))
    + _frame(Attach(name="out", handle=1, role=True, source=Source(address="c"), target=Target(address="d")))
    + _frame(Flow(next_incoming_id=0, incoming_window=8, next_outgoing_id=0, outgoing_window=100, handle=1, delivery_count=0, link_credit=5))
)


class App:
    """A reacting application: answers, grants credit, settles, sends, detaches."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.failed = False
        self.n = 0

    def __call__(self, events) -> None:
        for e in events:
            assert not self.failed, "an event after ConnectionError"
            self.n += 1
            if isinstance(e, ConnectionError):
                self.failed = True
                assert e.error.condition and e.error.description
            elif isinstance(e, RemoteBegin) and e.session.state is SessionState.BEGIN_RCVD:
                e.session.answer_begin(incoming_window=8, auto_flow=self.n % 2 == 0)
            elif isinstance(e, RemoteAttach) and e.link.state is LinkState.ATTACH_RCVD:
                e.link.answer_attach(e.attach.source, e.attach.target)
                if e.link.is_receiver:
                    e.link.flow(3)
                else:
                    e.link.send_transfer(b"x%d" % self.n, b"y" * (self.n * 97 % 1500))
            elif isinstance(e, TransferReceived):
                if not e.settled and not e.aborted:
                    e.delivery.update(Accepted(), settled=self.n % 3 != 0)
                if e.link.is_open and e.link.credit < 2:
                    e.link.add_credit(2)
        if not self.failed and self.conn.closed is False and self.n % 7 == 3:
            for s in self.conn.sessions:
                for link in s.links:
                    if link.is_open and link.is_sender:
                        link.send_transfer(b"t%d" % self.n, b"z" * 700, settled=self.n % 2 == 0)


def feed(conn: Connection, chunks, app: App | None = None) -> None:
    app = app or App(conn)
    for chunk in chunks:
        try:
            events = conn.receive_data(chunk)
        except AMQPError:
            return  # allowed to escape; the engine turns them into events in practice
        app(events)
        conn.data_to_send()
        if app.failed:
            assert conn.closed
            assert conn.receive_data(b"more bytes") == []
            assert conn.data_to_send() == b""
            return


def server() -> Connection:
    conn = Connection("server", "gw", max_frame_size=512, max_message_size=4096)
    conn.open()
    return conn


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return [c for c in out if c]


@given(st.binary(max_size=600), st.lists(st.integers(0, 10_000), max_size=5))
@FUZZ
def test_random_bytes_after_open(data, cuts):
    conn = server()
    feed(conn, [AMQP_HEADER + _frame(Open(container_id="f"))] + chunked(data, cuts))


@given(st.binary(max_size=600))
@FUZZ
def test_random_bytes_after_links_attached(data):
    conn = server()
    feed(conn, [PREFIX, data])


@given(st.binary(max_size=300))
@FUZZ
def test_random_bytes_into_sasl_server_and_client(data):
    conn = Connection("server", "gw", sasl=SaslServer(["PLAIN", "ANONYMOUS"]))
    conn.open()
    feed(conn, [SASL_HEADER, data])
    client = Connection("client", "c", sasl=SaslClient.plain("u", "p"))
    client.open()
    client.data_to_send()
    feed(client, [SASL_HEADER, data])
    client = Connection("client", "c")
    client.open()
    feed(client, [data])


@given(st.binary(max_size=64))
@FUZZ
def test_random_protocol_headers(data):
    feed(server(), [data])


def _valid_stream() -> bytes:
    parts = [PREFIX]
    for i in range(4):
        parts.append(_frame(Transfer(handle=0, delivery_id=i, delivery_tag=b"%d" % i, message_format=0, settled=i % 2 == 0, more=i == 2), 0, b"p" * (i * 50)))
    parts.append(_frame(Disposition(role=True, first=0, last=3, settled=True, state=Accepted())))
    parts.append(_frame(Detach(handle=0, closed=True)))
    parts.append(_frame(End()))
    parts.append(_frame(Close()))
    return b"".join(parts)


VALID = _valid_stream()


@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
    st.integers(0, len(VALID)),
    st.lists(st.integers(0, 10_000), max_size=4),
)
@FUZZ
def test_mutated_valid_stream(flips, cut, cuts):
    data = bytearray(VALID)
    for pos, value in flips:
        data[pos] = value
    data = bytes(data[:cut]) if cut > len(PREFIX) else bytes(data)
    feed(server(), chunked(data, cuts))


# -------------------------------------------------------- hostile performative fields

u32 = st.one_of(st.integers(0, 5), st.integers(0xFFFFFFF0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
ids = st.one_of(st.integers(0, 12), st.integers(0, 12), u32)
small = st.sampled_from([0, 0, 1, 1, 2, 7])
states = st.sampled_from([None, Accepted(), Released(), Rejected(), Modified(delivery_failed=True)])
channels = st.sampled_from([0, 0, 0, 0, 0, 1, 3])


def maybe(strategy):
    return st.one_of(st.none(), strategy, strategy)


performatives = st.one_of(
    st.builds(Begin, remote_channel=maybe(st.integers(0, 3)), next_outgoing_id=u32, incoming_window=u32, outgoing_window=u32, handle_max=u32),
    st.builds(Attach, name=st.sampled_from(["in", "out", "x"]), handle=small, role=st.booleans(), source=st.just(Source(address="a")), target=st.just(Target(address="b")), initial_delivery_count=maybe(u32), max_message_size=maybe(st.integers(0, 5000))),
    st.builds(Flow, next_incoming_id=maybe(ids), incoming_window=u32, next_outgoing_id=ids, outgoing_window=u32, handle=maybe(small), delivery_count=maybe(ids), link_credit=maybe(u32), available=maybe(u32), drain=st.booleans(), echo=st.booleans()),
    st.builds(Transfer, handle=small, delivery_id=maybe(ids), delivery_tag=maybe(st.binary(max_size=4)), message_format=maybe(u32), settled=maybe(st.booleans()), more=st.booleans(), state=states, aborted=st.booleans()),
    st.builds(Transfer, handle=st.just(0), delivery_id=ids, delivery_tag=st.binary(max_size=4), more=st.booleans()),
    st.builds(Disposition, role=st.booleans(), first=ids, last=maybe(ids), settled=st.booleans(), state=states),
    st.builds(Detach, handle=small, closed=st.booleans()),
    st.builds(End),
    st.builds(Close),
    st.builds(Open, container_id=st.just("again")),
)


@given(st.lists(st.tuples(channels, performatives, st.binary(max_size=700)), max_size=25))
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_performative_sequences(frames):
    conn = server()
    app = App(conn)
    chunks = [PREFIX]
    for channel, perf, payload in frames:
        body = payload if isinstance(perf, Transfer) else b""
        data = _frame(perf, channel, body)
        if len(data) > 512:
            data = _frame(perf, channel, body[: 512 - (len(data) - len(body))])
        chunks.append(data)
    feed(conn, chunks, app)


@given(st.lists(st.tuples(channels, performatives), max_size=20))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_performatives_to_a_client(frames):
    client = Connection("client", "c", max_frame_size=512)
    client.open()
    session = client.begin(incoming_window=8)
    session.attach("in", "receiver", Source(address="a"), Target(address="b"))
    sender = session.attach("out", "sender", Source(address="c"), Target(address="d"))
    sender.send_transfer(b"q", b"w" * 900)
    client.data_to_send()
    chunks = [AMQP_HEADER + _frame(Open(container_id="srv", max_frame_size=512))]
    for channel, perf in frames:
        chunks.append(_frame(perf, channel))
    feed(client, chunks)


def test_prefix_is_accepted():
    conn = server()
    app = App(conn)
    events = conn.receive_data(PREFIX)
    app(events)
    assert not app.failed and conn.is_open
    assert struct.unpack(">I", PREFIX[8:12])[0] <= 512
