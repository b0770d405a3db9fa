"""hubsim's WebSocket listener, checked with clients that are not the gateway's:
paho-mqtt's own WebSocket transport, and a blocking wsproto client for AMQP and
the refusals (wrong path, unknown subprotocol, text frames)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hubsim_clients import HUB_HOST, TIMEOUT, sas_token
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    RejectConnection,
    Request,
    TextMessage,
)

from gateway.hubsim import HubSim
from gateway.hubsim.amqp_server import AmqpServer
from gateway.hubsim.websocket import WebSocketBridge


@pytest.fixture
def ws_hub(keys: dict[str, str]) -> Iterator[HubSim]:
    sim = HubSim(keys, hub_host=HUB_HOST, ws_port=0)
    with sim:
        yield sim
    sim.close()


def test_paho_publishes_over_websockets(ws_hub: HubSim, keys: dict[str, str]) -> None:
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id="dev1",
        protocol=mqtt.MQTTv311,
        transport="websockets",
        reconnect_on_failure=False,
    )
    client.ws_set_options(path="/$iothub/websocket")
    client.username_pw_set(
        f"{HUB_HOST}/dev1/?api-version=2021-04-12",
        sas_token(f"{HUB_HOST}/devices/dev1", keys["dev1"]),
    )
    client.tls_set(ca_certs=ws_hub.ca_file)
    client.connect("127.0.0.1", ws_hub.ws_port, keepalive=30)
    client.loop_start()
    try:
        info = client.publish("devices/dev1/messages/events/", b"over websockets", qos=1)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published()
        record = ws_hub.recorder.wait_for(
            lambda: ws_hub.recorder.d2c and ws_hub.recorder.d2c[0], TIMEOUT
        )
        assert record.device_id == "dev1" and record.raw == b"over websockets"
    finally:
        client.disconnect()
        client.loop_stop()


class RawClient:
    """A blocking TLS + wsproto client."""

    def __init__(self, hub: HubSim) -> None:
        ctx = ssl.create_default_context(cafile=hub.ca_file)
        raw = socket.create_connection(("127.0.0.1", hub.ws_port), timeout=TIMEOUT)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.ws = WSConnection(ConnectionType.CLIENT)

    def upgrade(self, target: str, subprotocols: list[str]) -> object:
        self.sock.sendall(
            self.ws.send(Request(host="127.0.0.1", target=target, subprotocols=subprotocols))
        )
        return self.next_event()

    def next_event(self) -> object:
        while True:
            for event in self.ws.events():
                return event
            data = self.sock.recv(65536)
            self.ws.receive_data(data or None)

    def close(self) -> None:
        self.sock.close()


def test_amqp_header_exchanged_over_websockets(ws_hub: HubSim) -> None:
    client = RawClient(ws_hub)
    try:
        accepted = client.upgrade("/$iothub/websocket", ["AMQPWSB10"])
        assert isinstance(accepted, AcceptConnection) and accepted.subprotocol == "AMQPWSB10"
        client.sock.sendall(client.ws.send(Message(data=b"AMQP\x03\x01\x00\x00")))
        got = b""
        while len(got) < 8:
            event = client.next_event()
            assert isinstance(event, BytesMessage)
            got += event.data
        assert got[:8] == b"AMQP\x03\x01\x00\x00"  # the SASL header back
    finally:
        client.close()


def test_wrong_path_is_404(ws_hub: HubSim) -> None:
    client = RawClient(ws_hub)
    try:
        event = client.upgrade("/mqtt", ["mqtt"])
        assert isinstance(event, RejectConnection) and event.status_code == 404
    finally:
        client.close()


def test_unknown_subprotocol_is_400(ws_hub: HubSim) -> None:
    client = RawClient(ws_hub)
    try:
        event = client.upgrade("/$iothub/websocket", ["stomp"])
        assert isinstance(event, RejectConnection) and event.status_code == 400
    finally:
        client.close()


def test_text_frame_is_closed_with_1003(ws_hub: HubSim) -> None:
    client = RawClient(ws_hub)
    try:
        assert isinstance(client.upgrade("/$iothub/websocket", ["mqtt"]), AcceptConnection)
        client.sock.sendall(client.ws.send(TextMessage(data="hello")))
        event = client.next_event()
        assert isinstance(event, CloseConnection) and event.code == 1003
    finally:
        client.close()


def test_mqtt_only_hub_refuses_amqp_subprotocol(keys: dict[str, str]) -> None:
    with HubSim(keys, hub_host=HUB_HOST, amqp_port=None, ws_port=0) as hub:
        client = RawClient(hub)
        try:
            event = client.upgrade("/$iothub/websocket", ["AMQPWSB10"])
            assert isinstance(event, RejectConnection) and event.status_code == 400
        finally:
            client.close()
    hub.close()


class _RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False


def test_amqp_answer_leaves_without_waiting_for_the_event_loop(keys: dict[str, str]) -> None:
    """AMQP writes go out as they are made, as the TCP listener's do: the answer to
    a large write is not held until all of it is processed (no loop runs here)."""
    amqp = AmqpServer(HubSim(keys, hub_host=HUB_HOST).state, "hubsim-test")
    bridge = WebSocketBridge(amqp, None)
    transport = _RecordingTransport()
    bridge.connection_made(transport)
    client = WSConnection(ConnectionType.CLIENT)
    request = Request(host="127.0.0.1", target="/$iothub/websocket", subprotocols=["AMQPWSB10"])
    bridge.data_received(client.send(request))
    client.receive_data(b"".join(transport.written))
    assert isinstance(next(client.events()), AcceptConnection)
    transport.written.clear()
    bridge.data_received(client.send(Message(data=b"AMQP\x03\x01\x00\x00")))
    client.receive_data(b"".join(transport.written))
    payload = b"".join(e.data for e in client.events() if isinstance(e, BytesMessage))
    assert payload.startswith(b"AMQP\x03\x01\x00\x00")  # the SASL header, already sent
