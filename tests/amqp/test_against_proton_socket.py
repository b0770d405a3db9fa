"""Our engine against python-qpid-proton over real TCP sockets on 127.0.0.1.

1. proton's own client stack (``proton.reactor.Container``, its socket I/O, SASL PLAIN,
   heartbeats) in a worker thread, against our engine as the server on a trio socket.
2. Our engine as the client on a trio socket, against a proton server Transport
   driven over the accepted socket in a worker thread, with idle timeouts on both
   sides and a quiet spell long enough for several heartbeats.

10,000 messages with mixed settlement go each way that the gateway uses.
"""

from __future__ import annotations

import socket
import threading
import time

import proton
import trio
from proton import Message
from proton.handlers import MessagingHandler
from proton.reactor import Container

from gateway.amqp import Connection, RemoteAttach, SaslClient, SaslServer
from gateway.amqp.performatives import Accepted, Source, Target
from tests.waiting import FAILSAFE

from .test_against_proton import ProtonReceiver, _proton_server_handler
from .test_engine_support import EngineApp, ProtonPeer, outcome_for, payload_for, serve_engine

N = 10_000
N_C2D = 1_000


class ProtonDevice(MessagingHandler):
    """A device on proton's own stack: sends N telemetry messages (even ones
    pre-settled), receives C2D messages, then closes."""

    def __init__(self, url: str) -> None:
        super().__init__(prefetch=100, auto_accept=True, auto_settle=True)
        self.url = url
        self.sent = 0
        self.outcomes: dict[int, str] = {}
        self.received: list[str] = []
        self.error: str | None = None
        self.conn = None

    def on_start(self, event):
        self.conn = event.container.connect(
            self.url,
            allowed_mechs="PLAIN",
            allow_insecure_mechs=True,
            user="dev1@sas.myhub",
            password="SharedAccessSignature sr=myhub&sig=abc&se=1",
            heartbeat=2,
            virtual_host="myhub.azure-devices.net",
        )
        self.sender = event.container.create_sender(self.conn, "devices/dev1/messages/events")
        self.receiver = event.container.create_receiver(self.conn, "devices/dev1/messages/devicebound")

    def on_sendable(self, event):
        while event.sender.credit and self.sent < N:
            i = self.sent
            dlv = event.sender.send(Message(id=i, body=payload_for(i)), tag=b"tag-%d" % i)
            if i % 2 == 0:
                dlv.settle()
            self.sent += 1

    def _outcome(self, event, kind):
        i = int(event.delivery.tag.split("-")[1]) if isinstance(event.delivery.tag, str) else int(event.delivery.tag.split(b"-")[1])
        self.outcomes[i] = kind
        self._maybe_done()

    def on_accepted(self, event):
        self._outcome(event, "Accepted")

    def on_rejected(self, event):
        self._outcome(event, "Rejected")

    def on_released(self, event):
        # proton reports modified outcomes as released too
        self._outcome(event, "Released/Modified")

    def on_message(self, event):
        self.received.append(event.message.body)
        self._maybe_done()

    def _maybe_done(self):
        if len(self.outcomes) == N // 2 and len(self.received) == N_C2D:
            self.conn.close()

    def on_transport_error(self, event):
        cond = event.transport.condition
        self.error = f"{cond.name}: {cond.description}" if cond else "transport error"

    def on_connection_error(self, event):
        self.error = str(event.connection.remote_condition)


async def test_proton_container_client_against_our_server_over_tcp():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    device = ProtonDevice(f"amqp://127.0.0.1:{port}")
    container = Container(device)
    conn = Connection("server", "gateway", sasl=SaslServer(["PLAIN"]), idle_timeout=4)
    conn.open()
    app = EngineApp(conn, credit=300, outcome=lambda i, e: outcome_for(i))

    def on_events(events):
        app(events)
        for e in events:
            if isinstance(e, RemoteAttach) and e.link.is_sender:
                for i in range(N_C2D):
                    body = Message(body=f"c2d-{i}").encode()
                    e.link.send_transfer(b"c2d-%d" % i, body, settled=i % 2 == 0)

    with trio.fail_after(FAILSAFE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: trio.to_thread.run_sync(container.run, abandon_on_cancel=True))
            stream = await listeners[0].accept()
            await serve_engine(stream, conn, on_events)
            await stream.aclose()
    await listeners[0].aclose()

    assert device.error is None
    assert app.auth.identity == "dev1@sas.myhub"
    assert app.auth.password == "SharedAccessSignature sr=myhub&sig=abc&se=1"
    assert conn.remote_open.hostname == "myhub.azure-devices.net"
    assert conn.remote_idle_timeout is not None
    # Telemetry: every message arrived bit-identical, in order, with its settlement.
    telemetry = app.received
    assert len(telemetry) == N
    for i, e in enumerate(telemetry):
        expected = Message(id=i, body=payload_for(i))
        got = Message()
        got.decode(bytes(e.payload))
        assert got.id == i and got.body == expected.body
        assert e.delivery_tag == b"tag-%d" % i
        assert e.settled == (i % 2 == 0)
    # Outcomes as proton saw them.
    assert sorted(device.outcomes) == list(range(1, N, 2))
    for i in range(1, N, 2):
        kind = type(outcome_for(i)).__name__
        assert device.outcomes[i] == (kind if kind in ("Accepted", "Rejected") else "Released/Modified")
    # C2D: proton's receiver decoded all our messages; it accepted the unsettled ones.
    assert device.received == [f"c2d-{i}" for i in range(N_C2D)]
    accepted = {d.delivery_tag for disp in app.dispositions for d in disp.deliveries if type(disp.state) is Accepted}
    assert accepted == {b"c2d-%d" % i for i in range(1, N_C2D, 2)}
    assert conn.closed


def _proton_server_over_socket(sock: socket.socket, peer: ProtonPeer, on_peer, stop: threading.Event) -> None:
    """Drive a proton Transport over a blocking socket (the worker thread's loop)."""
    sock.settimeout(0.02)
    try:
        while not stop.is_set():
            out = peer.output()
            if out:
                sock.sendall(out)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                data = None
            if data == b"":
                peer.transport.close_tail()
                break
            if data:
                peer.input(data)
            for ev in peer.events():
                on_peer(ev)
            peer.transport.tick(time.monotonic())
            if peer.transport.closed:
                out = peer.output()
                if out:
                    sock.sendall(out)
                break
    finally:
        sock.close()


async def test_our_client_against_proton_server_over_tcp_with_heartbeats():
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    peer = ProtonPeer(True, mechs="ANONYMOUS", idle_timeout=1.0)
    state: dict = {"receivers": [], "senders": []}
    on_peer = _proton_server_handler(peer, state, credit=500)
    stop = threading.Event()

    def serve_one() -> None:
        csock, _ = lsock.accept()
        _proton_server_over_socket(csock, peer, on_peer, stop)

    ours = Connection("client", "device-1", sasl=SaslClient.anonymous(), hostname="myhub.azure-devices.net", idle_timeout=2.0)
    app = EngineApp(ours, outcome=lambda i, e: Accepted())
    ours.open()
    session = ours.begin()
    snd = session.attach("telemetry", "sender", Source(address="d"), Target(address="devices/d/messages/events"))
    deliveries = []
    phase = {"quiet_until": None, "closed": False}

    def step():
        # Keep the link fed; once all are settled, stay quiet (heartbeats only), then close.
        while len(deliveries) < N and snd.queued < 200:
            i = len(deliveries)
            deliveries.append(snd.send_transfer(b"t%d" % i, payload_for(i), settled=i % 2 == 0))
        if len(deliveries) == N and all(d.settled or d.remote_settled for d in deliveries):
            now = trio.current_time()
            if phase["quiet_until"] is None:
                phase["quiet_until"] = now + 2.5
            elif now >= phase["quiet_until"] and not phase["closed"]:
                phase["closed"] = True
                snd.detach()
                session.end()
                ours.close()

    with trio.fail_after(FAILSAFE):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: trio.to_thread.run_sync(serve_one, abandon_on_cancel=True))
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                await serve_engine(stream, ours, app, step=step)
            finally:
                stop.set()
                await stream.aclose()
    lsock.close()

    assert not app.errors
    assert phase["closed"]
    assert ours.remote_idle_timeout == 0.5  # proton advertises half its 1 s
    receiver: ProtonReceiver = state["receivers"][0]
    assert receiver.messages == [payload_for(i) for i in range(N)]
    assert receiver.tags == [b"t%d" % i for i in range(N)]
    for i, d in enumerate(deliveries):
        if i % 2:
            assert d.remote_settled and type(d.remote_state).__name__ == type(outcome_for(i)).__name__
    assert peer.transport.condition is None
    assert peer.conn.state & proton.Endpoint.REMOTE_CLOSED
