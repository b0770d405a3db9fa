"""Batched relaying over real TLS: a hub that writes one TLS record per packet.

Brokers write each packet as its own TLS record; the relay takes the records
already received together and writes them to the device at once. Whatever
the batching, every packet arrives intact and in order, the hub's close comes
after its last packet, and the metrics count every packet. The hub's PUBACK
bytes come from amqtt.
"""

from __future__ import annotations

import ssl

import pytest
import trio
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.puback import PubackPacket

from gateway.daemon import serve_mqtt_listener
from gateway.mqtt_relay import CloseReason

from .test_relay_tls_stub import WAIT, connect_bytes, read_until_closed

PUBACKS = 300


class BurstBroker:
    """TLS server: CONNACK 0, then PUBACKS PUBACKs, one record each, then close_notify."""

    def __init__(self, certs) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(certs.cert_file), str(certs.key_file))
        self.port = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self.handle, listeners)
            task_status.started()

    async def handle(self, tcp):
        stream = trio.SSLStream(tcp, self.context, server_side=True)
        await stream.receive_some()  # the CONNECT
        await stream.send_all(ConnackPacket.build(0, 0).to_bytes())
        for packet_id in range(1, PUBACKS + 1):
            await stream.send_all(PubackPacket.build(packet_id).to_bytes())
        await stream.aclose()


class Counting:
    def __init__(self, batched: bool) -> None:
        self.packets: dict[tuple[str, str], int] = {}
        self.bytes = 0
        self.closed: list[str] = []
        self.done = trio.Event()
        if batched:
            self.on_packets = self._on_packets

    def on_packet(self, direction, packet_type, nbytes):
        self._on_packets(direction, packet_type, 1, nbytes)

    def _on_packets(self, direction, packet_type, count, nbytes):
        key = (direction, packet_type)
        self.packets[key] = self.packets.get(key, 0) + count
        self.bytes += nbytes

    def on_close(self, reason):
        self.closed.append(reason)
        self.done.set()


@pytest.mark.parametrize("batched", [True, False])
async def test_records_relayed_in_order_then_close(nursery, certs, make_config, batched):
    broker = BurstBroker(certs)
    await nursery.start(broker.serve)
    config = make_config(broker.port)
    observer = Counting(batched)

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        await serve_mqtt_listener(
            config.listeners[0], config, task_status=task_status, observer=observer
        )

    port = (await nursery.start(serve))[0][1]
    device = await trio.open_tcp_stream("127.0.0.1", port)
    await device.send_all(connect_bytes("dev1", 60))
    received = await read_until_closed(device)
    expected = ConnackPacket.build(0, 0).to_bytes() + b"".join(
        PubackPacket.build(i).to_bytes() for i in range(1, PUBACKS + 1)
    )
    assert received == expected
    with trio.fail_after(WAIT):
        await observer.done.wait()
    assert observer.closed == [CloseReason.UPSTREAM_CLOSED]
    assert observer.packets[("out", "PUBACK")] == PUBACKS
    assert observer.packets[("out", "CONNACK")] == 1
    assert observer.packets[("in", "CONNECT")] == 1
    assert observer.bytes == len(expected) + len(connect_bytes("dev1", 60))
