"""The relay over real sockets and TLS against a minimal upstream that only says CONNACK.

mosquitto enforces keep-alives and timeouts itself, which would hide the
relay's own; this upstream never closes on its own, so what happens here is
the relay's doing. Its CONNACK bytes come from amqtt.

The keep-alive tests run on trio's autojump mock clock: time moves on only while every task
waits, so the relay's keep-alive timer sees exactly the device's schedule (a ping every 0.5 s
against a 1.5 s limit) however slow the machine is. Everything here, the broker included,
runs in the test's own trio loop over loopback sockets, so no task waits on anything the
mock clock could overtake.
"""

from __future__ import annotations

import ssl

import trio
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.connect import ConnectPacket, ConnectPayload, ConnectVariableHeader

from gateway.daemon import serve_mqtt_listener
from gateway.mqtt_relay import CloseReason
from tests.waiting import FAILSAFE

WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)


class QuietBroker:
    """TLS server: answers the first bytes with CONNACK 0, records the rest, never closes first."""

    def __init__(self, certs, *, speak_tls: bool = True) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(certs.cert_file), str(certs.key_file))
        self.speak_tls = speak_tls
        self.received: list[bytes] = []
        self.closed = trio.Event()
        self.port = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self.handle, listeners)
            task_status.started()

    async def handle(self, tcp):
        if not self.speak_tls:
            await trio.sleep_forever()  # accepts TCP, never answers the TLS handshake
        stream = trio.SSLStream(tcp, self.context, server_side=True)
        try:
            first = await stream.receive_some()
            self.received.append(first)
            await stream.send_all(ConnackPacket.build(0, 0).to_bytes())
            while data := await stream.receive_some():
                self.received.append(data)
        except trio.BrokenResourceError:
            pass
        finally:
            self.closed.set()


class Observer:
    def __init__(self) -> None:
        self.closed: list[str] = []
        self.failures: list[tuple[str, str]] = []
        self.done = trio.Event()

    def on_packet(self, direction, packet_type, nbytes):
        pass

    def on_close(self, reason):
        self.closed.append(reason)
        self.done.set()

    def on_upstream_connect_failure(self, connector, reason):
        self.failures.append((connector, reason))


def connect_bytes(client_id: str, keep_alive: int) -> bytes:
    header = ConnectVariableHeader(0, keep_alive, "MQTT", 4)
    header.clean_session_flag = True
    return ConnectPacket(
        variable_header=header, payload=ConnectPayload(client_id=client_id)
    ).to_bytes()


async def start(nursery, config, observer) -> int:
    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        await serve_mqtt_listener(
            config.listeners[0], config, task_status=task_status, observer=observer
        )

    return (await nursery.start(serve))[0][1]


async def read_until_closed(stream) -> bytes:
    data = b""
    with trio.fail_after(WAIT):
        while chunk := await stream.receive_some():
            data += chunk
    return data


async def test_keep_alive_closes_an_idle_device(nursery, certs, make_config, autojump_clock):
    broker = QuietBroker(certs)
    await nursery.start(broker.serve)
    observer = Observer()
    port = await start(nursery, make_config(broker.port), observer)
    device = await trio.open_tcp_stream("127.0.0.1", port)
    connect = connect_bytes("idle", keep_alive=1)
    await device.send_all(connect)
    started = trio.current_time()
    assert await read_until_closed(device) == ConnackPacket.build(0, 0).to_bytes()
    elapsed = trio.current_time() - started
    # Keep-alive 1 s: closed once 1.5 s have passed without a packet, not before, not long after.
    assert 1.5 <= elapsed < 1.6, elapsed
    with trio.fail_after(WAIT):
        await broker.closed.wait()
        await observer.done.wait()
    assert observer.closed == [CloseReason.KEEPALIVE_TIMEOUT]
    assert b"".join(broker.received) == connect  # no DISCONNECT was invented


async def test_pings_keep_a_device_alive(nursery, certs, make_config, autojump_clock):
    broker = QuietBroker(certs)
    await nursery.start(broker.serve)
    observer = Observer()
    port = await start(nursery, make_config(broker.port), observer)
    device = await trio.open_tcp_stream("127.0.0.1", port)
    connect = connect_bytes("pinger", keep_alive=1)
    await device.send_all(connect)
    with trio.fail_after(WAIT):
        assert await device.receive_some() == b"\x20\x02\x00\x00"
    for _ in range(6):  # 3 s in all, twice the 1.5 s limit
        await trio.sleep(0.5)  # the device's own ping schedule
        await device.send_all(b"\xc0\x00")
    # Every ping crossed the relay to the hub, and the session is still up.
    with trio.fail_after(WAIT):
        while b"".join(broker.received) != connect + b"\xc0\x00" * 6:
            await trio.sleep(0.01)
    assert not observer.done.is_set()
    await device.aclose()
    with trio.fail_after(WAIT):
        await observer.done.wait()
    assert observer.closed == [CloseReason.DEVICE_CLOSED]


async def test_upstream_handshake_timeout(nursery, certs, make_config):
    broker = QuietBroker(certs, speak_tls=False)
    await nursery.start(broker.serve)
    observer = Observer()
    port = await start(nursery, make_config(broker.port, connect_timeout="300ms"), observer)
    device = await trio.open_tcp_stream("127.0.0.1", port)
    await device.send_all(connect_bytes("slow-hub", keep_alive=60))
    assert await read_until_closed(device) == ConnackPacket.build(0, 3).to_bytes()
    with trio.fail_after(WAIT):
        await observer.done.wait()
    assert observer.closed == [CloseReason.UPSTREAM_UNAVAILABLE]
    assert observer.failures == [("broker", "timeout")]
