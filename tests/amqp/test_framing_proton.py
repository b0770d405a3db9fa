"""Frames produced by python-qpid-proton, decoded and re-encoded by our codec,
accepted by python-qpid-proton.

Two proton endpoints (a client and a server Transport, driven sans-I/O) talk
through a relay that decodes every frame with FrameReader and writes it again
with encode_frame / the fast transfer encoder. If any performative, SASL frame,
terminus, delivery state or error lost a field or changed a type, proton on
the other side would see it: the test checks what each endpoint observed.
"""

from __future__ import annotations

import random

import pytest
from proton import (
    SASL,
    Collector,
    Condition,
    Connection,
    Data,
    Delivery,
    Endpoint,
    Event,
    Message,
    Transport,
    symbol,
    ulong,
)

from gateway.amqp import performatives as P
from gateway.amqp.framing import (
    AMQP_HEADER,
    HEADER_SASL,
    SASL_HEADER,
    FrameReader,
    encode_frame,
    encode_transfer_frame,
)


class Relay:
    """One direction of the byte stream: decode each frame, re-encode it."""

    def __init__(self, name: str, max_frame_size: int) -> None:
        self.name = name
        self.reader = FrameReader(max_frame_size)
        self.expect_header = True
        self.frames: list = []
        self.transfer_payload = bytearray()
        self.backlog = bytearray()  # relayed bytes the destination has no room for yet

    def relay(self, data: bytes, peer: Relay) -> bytes:
        self.reader.feed(data)
        out = bytearray()
        while True:
            if self.expect_header:
                kind = self.reader.read_protocol_header()
                if kind is None:
                    break
                out += SASL_HEADER if kind == HEADER_SASL else AMQP_HEADER
                self.expect_header = False
                continue
            frame = self.reader.next_frame()
            if frame is None:
                break
            self.frames.append(frame.performative)
            perf = frame.performative
            if type(perf) is P.Transfer:
                # re-encode through the fast path, as a router would
                out += encode_transfer_frame(
                    frame.channel, perf.handle, perf.delivery_id, perf.delivery_tag,
                    perf.message_format, perf.settled, perf.more, frame.payload,
                    rcv_settle_mode=perf.rcv_settle_mode, state=perf.state,
                    resume=perf.resume, aborted=perf.aborted, batchable=perf.batchable,
                )  # fmt: skip
                self.transfer_payload += frame.payload
            else:
                out += encode_frame(perf, frame.channel, frame.payload, frame.frame_type)
            if isinstance(perf, P.SaslOutcome):
                # both sides start again with an AMQP header
                self.expect_header = True
                peer.expect_header = True
        return bytes(out)


def pump(client: Transport, server: Transport, c2s: Relay, s2c: Relay) -> None:
    for _ in range(100_000):
        moved = False
        for src, dst, relay, peer in ((client, server, c2s, s2c), (server, client, s2c, c2s)):
            n = src.pending()
            if n > 0:
                data = src.peek(n)
                src.pop(n)
                relay.backlog += relay.relay(data, peer)
                moved = True
            room = dst.capacity()
            if relay.backlog and room > 0:
                chunk = bytes(relay.backlog[:room])
                del relay.backlog[:room]
                dst.push(chunk)
                moved = True
        if not moved:
            return
    raise AssertionError("transports never went quiet")


def events(collector: Collector) -> list:
    out = []
    while (ev := collector.peek()) is not None:
        out.append(ev)
        collector.pop()
    return out


@pytest.mark.parametrize("max_frame_size", [512, 65536])
def test_proton_endpoints_talk_through_our_codec(max_frame_size):
    rng = random.Random(max_frame_size)
    # -- client: SASL ANONYMOUS, properties, capabilities, idle timeout
    cconn = Connection()
    cconn.container = "device-1"
    cconn.hostname = "myhub.azure-devices.net"
    cconn.properties = {symbol("com.microsoft:client-version"): "test/1.0"}
    cconn.offered_capabilities = [symbol("ANONYMOUS-RELAY")]
    ccol = Collector()
    cconn.collect(ccol)
    ctr = Transport()
    ctr.max_frame_size = max_frame_size
    ctr.idle_timeout = 30.0
    ctr.sasl().allowed_mechs("ANONYMOUS")
    ctr.bind(cconn)
    # -- server
    sconn = Connection()
    sconn.container = "hub"
    scol = Collector()
    sconn.collect(scol)
    str_ = Transport(Transport.SERVER)
    str_.max_frame_size = max_frame_size
    ssasl = str_.sasl()
    ssasl.allowed_mechs("ANONYMOUS")
    str_.bind(sconn)

    c2s = Relay("c2s", max_frame_size)
    s2c = Relay("s2c", max_frame_size)

    cconn.open()
    session = cconn.session()
    session.open()
    sender = session.sender("sender-link")
    sender.target.address = "amqps://myhub.azure-devices.net/devices/d1/messages/events"
    sender.source.address = "source-addr"
    sender.source.filter.put_dict({symbol("apache.org:selector-filter:string"): "x = 1"})
    sender.target.capabilities.put_array(False, Data.SYMBOL)
    sender.target.capabilities.enter()
    sender.target.capabilities.put_symbol(symbol("queue"))
    sender.target.capabilities.exit()
    sender.properties = {
        symbol("com.microsoft:api-version"): "2020-09-30",
        symbol("com.microsoft:channel-correlation-id"): "abc",
    }
    sender.snd_settle_mode = sender.SND_MIXED
    sender.open()

    received: list[tuple[bytes, bytes]] = []
    outcomes = [Delivery.ACCEPTED, Delivery.REJECTED, Delivery.RELEASED, Delivery.MODIFIED]
    server_link = None

    def serve() -> None:
        nonlocal server_link
        for ev in events(scol):
            if ev.type == Event.CONNECTION_REMOTE_OPEN:
                ev.connection.open()
            elif ev.type == Event.SESSION_REMOTE_OPEN:
                ev.session.open()
            elif ev.type == Event.LINK_REMOTE_OPEN:
                link = ev.link
                link.source.copy(link.remote_source)
                link.target.copy(link.remote_target)
                link.properties = {symbol("com.microsoft:tracking-id"): "t-1"}
                link.open()
                link.flow(40)
                server_link = link
            elif ev.type == Event.DELIVERY:
                dlv = ev.delivery
                if dlv.readable and not dlv.partial:
                    data = ev.link.recv(dlv.pending)
                    ev.link.advance()
                    tag = dlv.tag.encode() if isinstance(dlv.tag, str) else bytes(dlv.tag)
                    received.append((tag, data))
                    if not dlv.settled:
                        i = len(received) % 4
                        if outcomes[i] == Delivery.REJECTED:
                            dlv.local.condition = Condition(
                                "amqp:not-allowed", "nope", {symbol("k"): 1}
                            )
                        if outcomes[i] == Delivery.MODIFIED:
                            dlv.local.failed = True
                            dlv.local.undeliverable = True
                            dlv.local.annotations = {symbol("x-opt-reason"): "busy"}
                        dlv.update(outcomes[i])
                    dlv.settle()
                    if ev.link.credit < 10:
                        ev.link.flow(40)

    for _ in range(5):
        pump(ctr, str_, c2s, s2c)
        serve()
    assert ssasl.outcome is None or ssasl.outcome == SASL.OK
    assert sender.state & Endpoint.REMOTE_ACTIVE
    assert sender.credit > 0
    # what the server saw of the client's open and attach
    assert sconn.remote_container == "device-1"
    assert sconn.remote_hostname == "myhub.azure-devices.net"
    assert sconn.remote_properties == {symbol("com.microsoft:client-version"): "test/1.0"}
    assert list(sconn.remote_offered_capabilities) == [symbol("ANONYMOUS-RELAY")]
    assert server_link.remote_target.address == sender.target.address
    assert server_link.remote_properties[symbol("com.microsoft:api-version")] == "2020-09-30"
    remote_filter = server_link.remote_source.filter
    remote_filter.rewind()
    remote_filter.next()
    assert remote_filter.get_object() == {symbol("apache.org:selector-filter:string"): "x = 1"}
    capabilities = server_link.remote_target.capabilities
    capabilities.rewind()
    capabilities.next()
    assert list(capabilities.get_py_array().elements) == [symbol("queue")]
    assert server_link.remote_snd_settle_mode == sender.SND_MIXED
    # what the client saw of the server's attach
    assert sender.remote_properties == {symbol("com.microsoft:tracking-id"): "t-1"}
    assert sender.remote_target.address == sender.target.address

    # -- messages: mixed settlement, some larger than the frame size
    sent: dict[bytes, bytes] = {}
    deliveries = []
    count = 200
    i = 0
    while i < count:
        while sender.credit > 0 and i < count:
            size = rng.choice([0, 10, 300, 700, 3000])
            msg = Message(body=bytes(rng.getrandbits(8) for _ in range(size)), id=ulong(i),
                          properties={"n": i}, subject="s")  # fmt: skip
            encoded = msg.encode()
            tag = f"tag-{i}".encode()
            dlv = sender.delivery(tag)
            sender.send(encoded)
            sender.advance()
            if i % 3 == 0:
                dlv.settle()
            else:
                deliveries.append(dlv)
            sent[tag] = encoded
            i += 1
        pump(ctr, str_, c2s, s2c)
        serve()
        pump(ctr, str_, c2s, s2c)
        serve()
    pump(ctr, str_, c2s, s2c)
    serve()
    pump(ctr, str_, c2s, s2c)

    assert len(received) == count
    for tag, data in received:
        assert sent[tag] == data  # message bytes arrive unchanged
    tags = {f.delivery_tag for f in c2s.frames if isinstance(f, P.Transfer) and f.delivery_tag}
    assert tags == set(sent)
    assert bytes(c2s.transfer_payload) == b"".join(sent[f"tag-{i}".encode()] for i in range(count))
    if max_frame_size == 512:
        assert any(isinstance(f, P.Transfer) and f.more for f in c2s.frames)
    # every unsettled delivery saw the server's outcome, with its details
    seen = {Delivery.ACCEPTED: 0, Delivery.REJECTED: 0, Delivery.RELEASED: 0, Delivery.MODIFIED: 0}
    for dlv in deliveries:
        assert dlv.settled
        seen[dlv.remote_state] += 1
        if dlv.remote_state == Delivery.REJECTED:
            assert dlv.remote.condition.name == "amqp:not-allowed"
            assert dlv.remote.condition.description == "nope"
            assert dlv.remote.condition.info == {symbol("k"): 1}
        if dlv.remote_state == Delivery.MODIFIED:
            assert dlv.remote.failed and dlv.remote.undeliverable
            assert dlv.remote.annotations == {symbol("x-opt-reason"): "busy"}
    assert all(seen.values()), seen
    kinds = {type(f) for f in c2s.frames + s2c.frames}
    assert {P.SaslInit, P.SaslMechanisms, P.SaslOutcome, P.Open, P.Begin, P.Attach, P.Flow,
            P.Transfer, P.Disposition} <= kinds  # fmt: skip

    # -- teardown with errors in both directions
    server_link.close()
    server_link.condition = None
    sender.condition = Condition("amqp:link:detach-forced", "going away")
    sender.close()
    pump(ctr, str_, c2s, s2c)
    serve()
    assert server_link.remote_condition.name == "amqp:link:detach-forced"
    assert server_link.remote_condition.description == "going away"
    session.close()
    pump(ctr, str_, c2s, s2c)
    serve()
    events(scol)
    sconn.condition = Condition("amqp:connection:forced", "maintenance", {symbol("retry-after"): 5})
    sconn.close()
    pump(ctr, str_, c2s, s2c)
    assert cconn.remote_condition.name == "amqp:connection:forced"
    assert cconn.remote_condition.info == {symbol("retry-after"): 5}
    cconn.close()
    pump(ctr, str_, c2s, s2c)
    assert {P.Detach, P.End, P.Close} <= {type(f) for f in c2s.frames}
    assert P.Close in {type(f) for f in s2c.frames}
    assert c2s.reader.buffered == 0 and s2c.reader.buffered == 0
