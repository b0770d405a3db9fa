"""The engine's per-frame trace hook: every frame in and out, SASL and empty frames
included, in wire order, with payload lengths only and no secrets.

Ground truth is the bytes themselves, decoded with python-qpid-proton's codec: the
trace must list exactly the frames on the wire, both ways, against a proton peer.
"""

from __future__ import annotations

import functools
import logging

from gateway.amqp import Connection, SaslClient, SaslServer
from gateway.amqp.connection import TRACE_RECV, TRACE_SEND, blank_sasl_secrets
from gateway.amqp.performatives import (
    SaslChallenge,
    SaslInit,
    SaslOutcome,
    SaslResponse,
    Source,
    Target,
)
from gateway.ops.trace import FrameTracer

from .test_against_proton import (
    ProtonSender,
    _proton_client,
    _proton_server,
    _proton_server_handler,
)
from .test_engine import decode_frames
from .test_engine_support import EngineApp, exchange, payload_for, pipe

SECRET = "SharedAccessSignature sr=hub%2Fdevices%2Fd1&sig=SECRETSIG&se=1"


class Recorder:
    def __init__(self) -> None:
        self.records: list[tuple] = []

    def __call__(self, direction, channel, what, payload_len) -> None:
        self.records.append((direction, channel, what, payload_len))

    def frames(self, direction: str) -> list[tuple]:
        """(channel, header bytes | None for empty | descriptor code, payload length)."""
        out = []
        for d, channel, what, n in self.records:
            if d != direction:
                continue
            code = what if what is None or isinstance(what, bytes) else type(what).descriptor_code
            out.append((channel, code, n))
        return out


def wire(data: bytes) -> list[tuple]:
    """The frames in ``data``, decoded by proton, in the Recorder.frames shape."""
    out = []
    for f in decode_frames(data):
        if f[0] == "header":
            out.append((None, f[1], 0))
        elif f[0] == "empty":
            out.append((f[1], None, 0))
        else:
            out.append((f[1], f[0], len(f[3])))
    return out


def _capture_peer_output(peer) -> bytearray:
    captured = bytearray()
    output = peer.output

    def tapped() -> bytes:
        data = output()
        captured.extend(data)
        return data

    peer.output = tapped
    return captured


def test_every_frame_both_ways_against_a_proton_client_with_sasl_plain():
    now = 100.0
    peer = _proton_client(mechs="PLAIN", user="d1@sas.hub", password=SECRET, max_frame=512,
                          idle_timeout=2.0)  # fmt: skip
    rec = Recorder()
    ours = Connection("server", "gw", sasl=SaslServer(["PLAIN"]), max_frame_size=512,
                      idle_timeout=1.0, trace=rec)  # fmt: skip
    ours.open()
    app = EngineApp(ours, credit=20, outcome=lambda i, e: None)
    ssn = peer.conn.session()
    ssn.open()
    snd = ssn.sender("telemetry")
    snd.target.address = "devices/d1/messages/events"
    snd.open()
    sender = ProtonSender(snd, 6, size_for=lambda i: [10, 0, 700, 2000, 3, 511][i])
    rcv = ssn.receiver("c2d")
    rcv.source.address = "devices/d1/messages/devicebound"
    rcv.open()
    rcv.flow(10)
    from_peer = _capture_peer_output(peer)
    from_us = bytearray()
    exchange(ours, peer, app, sender.on_event, tap=from_us.extend)
    # Our sender (to proton's receiver): fragmented transfers, then dispositions.
    our_sender = next(link for link in app.links if link.is_sender)
    for i in range(3):
        our_sender.send_transfer(b"c%d" % i, payload_for(i, 900), settled=i == 0)
    ours.disposition([e.delivery for e in app.received if not e.settled], True, None)
    exchange(ours, peer, app, sender.on_event, tap=from_us.extend)
    # Heartbeats: each side owes the other an empty frame every half second.
    for _ in range(3):
        now += 0.6
        app(ours.tick(now))
        peer.transport.tick(now)
        exchange(ours, peer, app, sender.on_event, tap=from_us.extend)
    assert len(app.received) == 6 and peer.transport.condition is None

    sent, received = rec.frames(TRACE_SEND), rec.frames(TRACE_RECV)
    assert sent == wire(bytes(from_us))
    assert received == wire(bytes(from_peer))
    assert (0, None, 0) in sent and (0, None, 0) in received  # heartbeats both ways
    assert [code for _, code, _ in sent][:3] == [b"AMQP\x03\x01\x00\x00", 0x40, 0x44]
    # Payload lengths only, per frame: fragments of proton's 512-byte frames add up.
    assert sum(n for _, code, n in received if code == 0x14) == 10 + 0 + 700 + 2000 + 3 + 511
    assert sum(n for _, code, n in sent if code == 0x14) == 3 * 900
    assert max(n for _, code, n in sent if code == 0x14) < 512

    # The PLAIN password never reaches the trace; the user name does.
    (init,) = [w for d, _, w, _ in rec.records if isinstance(w, SaslInit)]
    assert init.initial_response == b"\x00d1@sas.hub\x00"
    assert "SECRETSIG" not in repr(rec.records)
    assert all(b"SECRETSIG" not in w for _, _, w, _ in rec.records if isinstance(w, bytes))


def test_our_client_traces_held_frames_in_wire_order_against_a_proton_server():
    # begin and attach asked for during SASL wait for our open: the trace must show
    # them after it, as they are on the wire.
    peer, state = _proton_server(mechs="ANONYMOUS")
    on_peer = _proton_server_handler(peer, state, senders_payloads=lambda link: ProtonSender(link, 3))
    rec = Recorder()
    ours = Connection("client", "gw", sasl=SaslClient.anonymous(), trace=rec)
    app = EngineApp(ours, credit=5, outcome=lambda i, e: None)
    ours.open()
    session = ours.begin()
    session.attach("r", "receiver", Source(address="q"), Target(address="gw"))
    from_peer = _capture_peer_output(peer)
    from_us = bytearray()
    exchange(ours, peer, app, on_peer, tap=from_us.extend)
    assert len(app.received) == 3
    assert rec.frames(TRACE_SEND) == wire(bytes(from_us))
    assert rec.frames(TRACE_RECV) == wire(bytes(from_peer))
    codes = [code for _, code, _ in rec.frames(TRACE_SEND)]
    assert codes[:6] == [b"AMQP\x03\x01\x00\x00", 0x41, b"AMQP\x00\x01\x00\x00", 0x10, 0x11, 0x12]


def test_frame_tracer_lines_show_frames_and_hide_secrets(caplog):
    tracer = FrameTracer(logging.getLogger("test.trace"), ["amqp"])
    client = Connection("client", "c", sasl=SaslClient.plain("d1@sas.hub", SECRET),
                        trace=functools.partial(tracer.amqp, "c1"))  # fmt: skip
    server = Connection("server", "s", sasl=SaslServer(["PLAIN"]),
                        trace=functools.partial(tracer.amqp, "s1"))  # fmt: skip
    client.open()
    server.open()
    link = client.begin().attach("l", "sender", Source(address="a"), Target(address="b"))
    with caplog.at_level(logging.INFO, logger="test.trace"):
        pipe(client, server, EngineApp(client), EngineApp(server, credit=5))
        link.send_transfer(b"t", b"payload-bytes")
        pipe(client, server, EngineApp(client), EngineApp(server, credit=5))
    text = caplog.text
    assert "SECRETSIG" not in text and "payload-bytes" not in text
    assert "[c1] -> SASL 1.0.0" in text and "[s1] <- AMQP 1.0.0" in text
    assert 'user="d1@sas.hub" password=<redacted>' in text
    assert "[s1]:0 <- @transfer(20)" in text and "<13 bytes>" in text


def test_no_trace_keeps_nothing_and_the_hook_can_be_set_later():
    client = Connection("client", "c")
    server = Connection("server", "s")
    client.open()
    server.open()
    link = client.begin().attach("l", "sender")
    sapp = EngineApp(server, credit=5)
    pipe(client, server, EngineApp(client), sapp)
    assert client._trace_out == [] and client._trace_held == []
    rec = Recorder()
    client.trace = rec
    link.send_transfer(b"t", b"x" * 10, settled=True)
    pipe(client, server, EngineApp(client), sapp)
    ((direction, channel, transfer, size),) = rec.records
    assert (direction, channel, type(transfer).__name__, size) == (TRACE_SEND, 0, "Transfer", 10)
    assert transfer.delivery_tag == b"t" and transfer.settled is True
    client.trace = None
    link.send_transfer(b"u", b"y", settled=True)
    pipe(client, server, EngineApp(client), sapp)
    assert client._trace_out == [] and len(rec.records) == 1


def test_sasl_secrets_are_blanked_to_lengths():
    plain = SaslInit("PLAIN", b"authz\x00user\x00pass", "host")
    assert blank_sasl_secrets(plain).initial_response == b"authz\x00user\x00"
    odd = SaslInit("PLAIN", b"no-separators")
    assert blank_sasl_secrets(odd).initial_response == bytes(13)
    other = SaslInit("SCRAM-SHA-1", b"n,,n=user,r=abc")
    assert blank_sasl_secrets(other).initial_response == bytes(15)
    assert blank_sasl_secrets(SaslResponse(b"secret")).response == bytes(6)
    assert blank_sasl_secrets(SaslChallenge(b"nonce")).challenge == bytes(5)
    assert blank_sasl_secrets(SaslOutcome(0, b"data")).additional_data == bytes(4)
    anonymous = SaslInit("ANONYMOUS", None)
    assert blank_sasl_secrets(anonymous) is anonymous
