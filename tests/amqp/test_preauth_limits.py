"""What a device may send a server engine before it is authenticated: bounded.

SASL frames over `SASL_FRAME_LIMIT` and frames before the peer's open over
`PRE_OPEN_FRAME_LIMIT` are refused from their 8-byte header, before their
bodies are buffered; after the open the listener's max-frame-size applies.
"""

from __future__ import annotations

import struct

from gateway.amqp import Connection, SaslServer
from gateway.amqp.events import ConnectionError, RemoteOpen
from gateway.amqp.framing import (
    AMQP_HEADER,
    FRAME_SASL,
    PRE_OPEN_FRAME_LIMIT,
    SASL_FRAME_LIMIT,
    SASL_HEADER,
    FrameReader,
    encode_frame,
)
from gateway.amqp.performatives import Attach, Begin, Open, SaslInit, SaslOutcome, Source, Target
from gateway.amqp.types import Symbol


def frames_of(data: bytes) -> list:
    reader = FrameReader()
    reader.feed(data[8:])  # after our protocol header
    out = []
    while (frame := reader.next_frame()) is not None:
        out.append(frame.performative)
    return out


def test_oversized_sasl_init_refused_from_its_header() -> None:
    conn = Connection("server", "gw", sasl=SaslServer(["PLAIN", "ANONYMOUS"]))
    conn.receive_data(SASL_HEADER)
    conn.data_to_send()
    size = 60_000
    conn.receive_data(struct.pack(">IBBH", size, 2, FRAME_SASL, 0))  # the header only
    outcome = frames_of(b"\x00" * 8 + bytes(conn.data_to_send()))
    assert isinstance(outcome[-1], SaslOutcome) and outcome[-1].code == 1  # auth
    assert conn.buffered == 0
    summary = conn.sasl.failure_summary()
    assert summary is not None and f"SASL frame of {size} bytes (limit {SASL_FRAME_LIMIT})" in summary


def test_sasl_init_at_the_limit_is_read() -> None:
    conn = Connection("server", "gw", sasl=SaslServer(["PLAIN"]))
    conn.receive_data(SASL_HEADER)
    conn.data_to_send()
    response = b"\x00dev1@sas.hub\x00SharedAccessSignature sr=" + b"a" * 1500
    frame = encode_frame(SaslInit(Symbol("PLAIN"), response), frame_type=FRAME_SASL)
    assert len(frame) <= SASL_FRAME_LIMIT
    events = conn.receive_data(frame)
    assert conn.authenticated is not None, events


def test_oversized_open_refused_from_its_header() -> None:
    conn = Connection("server", "gw", max_frame_size=1 << 20)
    conn.receive_data(AMQP_HEADER)
    size = PRE_OPEN_FRAME_LIMIT + 1
    events = conn.receive_data(struct.pack(">IBBH", size, 2, 0, 0))
    assert any(isinstance(e, ConnectionError) for e in events), events
    assert conn.buffered <= 8


def test_after_the_open_frames_up_to_max_frame_size_are_read() -> None:
    conn = Connection("server", "gw", max_frame_size=1 << 20)
    conn.receive_data(AMQP_HEADER)
    events = conn.receive_data(encode_frame(Open("dev", hostname="hub")))
    assert any(isinstance(e, RemoteOpen) for e in events)
    conn.open()
    name = "n" * (PRE_OPEN_FRAME_LIMIT * 2)
    data = encode_frame(Begin(None, 0, 100, 100)) + encode_frame(
        Attach(name, 0, False, source=Source("a"), target=Target("a"))
    )
    events = conn.receive_data(data)
    assert not any(isinstance(e, ConnectionError) for e in events), events


def test_client_engine_keeps_its_limit() -> None:
    """The limits are a server's (device side): a client reads what it advertised."""
    conn = Connection("client", "gw", max_frame_size=1 << 20)
    assert conn._reader.max_frame_size == 1 << 20
