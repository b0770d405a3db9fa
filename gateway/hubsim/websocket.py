"""hubsim over WebSockets: AMQP and MQTT at ``wss://host:port/$iothub/websocket``.

As IoT Hub on port 443: one TLS listener, the HTTP upgrade at
``/$iothub/websocket``, and the subprotocol choosing the protocol:
``AMQPWSB10`` for AMQP 1.0, ``mqtt`` for MQTT. Binary messages carry the same
bytes as the TCP listeners, handed to the same `AmqpConnection` /
`MqttConnection` through a transport that frames writes as binary messages:
each AMQP write at once as one message, as the TCP listener writes it to the
socket; MQTT writes of one event-loop turn together as one message. Built on
wsproto's server side directly (asyncio, like the rest of hubsim); it shares
no code with the gateway's WebSocket client.

A text frame is answered with close 1003, an unparseable frame with wsproto's
close code, pings with pongs; a close from the client is answered and ends the
connection as an EOF would.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from .amqp_server import AmqpConnection, AmqpServer
from .mqtt_server import MqttServer

log = logging.getLogger("gateway.hubsim.websocket")

PATH = "/$iothub/websocket"
SUBPROTOCOLS = {"AMQPWSB10": "amqp", "mqtt": "mqtt"}


class _MessageTransport(asyncio.Transport):
    """What the AMQP/MQTT connection writes to: each write one binary message."""

    def __init__(self, bridge: WebSocketBridge) -> None:
        super().__init__()
        self._bridge = bridge

    def write(self, data: Any) -> None:
        self._bridge.send_binary(bytes(data))

    def is_closing(self) -> bool:
        return self._bridge.closing()

    def close(self) -> None:
        self._bridge.close(1000)

    def abort(self) -> None:
        self._bridge.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self._bridge.transport
        return default if transport is None else transport.get_extra_info(name, default)


class _StreamWriter:
    """The part of `asyncio.StreamWriter` `MqttConnection` uses."""

    def __init__(self, transport: _MessageTransport) -> None:
        self.transport = transport

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)


class WebSocketBridge(asyncio.Protocol):
    """One TLS connection: the upgrade, then frames to and from the protocol server."""

    def __init__(self, amqp: AmqpServer | None, mqtt: MqttServer | None) -> None:
        self.amqp = amqp
        self.mqtt = mqtt
        self.transport: asyncio.Transport | None = None
        self.ws = WSConnection(ConnectionType.SERVER)
        self.protocol: str | None = None
        self.inner_amqp: AmqpConnection | None = None
        self.mqtt_reader: asyncio.StreamReader | None = None
        self.message_transport = _MessageTransport(self)
        # MQTT writes a packet at a time: one frame per PUBACK would cost both ends
        # a frame each, so its writes of one event-loop turn leave as one message.
        # AMQP writes once per batch of input proton has processed; holding those
        # until the turn ends would keep every answer to a large gateway write
        # until the whole write is processed, where the TCP listener sends them
        # as it goes (and gateway and device work on them meanwhile).
        self.coalesce = False
        self.outgoing: list[bytes] = []

    # -- from the socket ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.ws.receive_data(data)
            for event in self.ws.events():
                if not self._on_event(event):
                    return
        except RemoteProtocolError as exc:
            log.info("websocket: bad upgrade request: %s", exc)
            self._reject(400, "bad WebSocket upgrade request")

    def eof_received(self) -> bool | None:
        self._inner_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner_amqp is not None:
            inner, self.inner_amqp = self.inner_amqp, None
            inner.connection_lost(exc)
        self._inner_eof()

    def _on_event(self, event: Any) -> bool:
        """Handle one event; False when the connection is done with."""
        if isinstance(event, Request):
            return self._on_request(event)
        if isinstance(event, BytesMessage):
            if event.data:
                self._deliver(bytes(event.data))
        elif isinstance(event, Ping):
            self._write(self.ws.send(event.response()))
        elif isinstance(event, TextMessage):
            log.info("websocket: text frame from client: closing with 1003")
            self.close(1003)
            return False
        elif isinstance(event, CloseConnection):
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                self._write(self.ws.send(event.response()))
            elif self.ws.state is ConnectionState.OPEN:  # a frame wsproto could not parse
                self._write(self.ws.send(CloseConnection(code=event.code)))
            if self.transport is not None:
                self.transport.close()
            self._inner_eof()
            return False
        return True

    def _on_request(self, request: Request) -> bool:
        if request.target.split("?", 1)[0] != PATH:
            self._reject(404, f"no WebSocket endpoint at {request.target}")
            return False
        chosen = next((p for p in request.subprotocols if p in SUBPROTOCOLS), None)
        protocol = SUBPROTOCOLS.get(chosen or "")
        if protocol == "amqp" and self.amqp is None or protocol == "mqtt" and self.mqtt is None:
            protocol = None
        if protocol is None:
            self._reject(400, f"unsupported subprotocol(s) {request.subprotocols}")
            return False
        self.protocol = protocol
        self.coalesce = protocol == "mqtt"
        self._write(self.ws.send(AcceptConnection(subprotocol=chosen)))
        if protocol == "amqp":
            assert self.amqp is not None
            self.inner_amqp = AmqpConnection(self.amqp)
            self.inner_amqp.connection_made(self.message_transport)
        else:
            assert self.mqtt is not None
            self.mqtt_reader = asyncio.StreamReader(limit=2**22)
            writer = _StreamWriter(self.message_transport)
            asyncio.ensure_future(self.mqtt._handle(self.mqtt_reader, writer))  # type: ignore[arg-type]
        return True

    def _deliver(self, data: bytes) -> None:
        if self.inner_amqp is not None:
            self.inner_amqp.data_received(data)
        elif self.mqtt_reader is not None:
            self.mqtt_reader.feed_data(data)

    def _inner_eof(self) -> None:
        if self.inner_amqp is not None:
            self.inner_amqp.eof_received()
        if self.mqtt_reader is not None and not self.mqtt_reader.at_eof():
            self.mqtt_reader.feed_eof()

    # -- to the socket --------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _reject(self, status: int, text: str) -> None:
        body = text.encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        try:
            self._write(
                self.ws.send(RejectConnection(status_code=status, headers=headers, has_body=True))
            )
            self._write(self.ws.send(RejectData(data=body)))
        except Exception:  # wsproto refuses a reject in a state it does not allow
            pass
        if self.transport is not None:
            self.transport.close()

    def send_binary(self, data: bytes) -> None:
        if self.ws.state is not ConnectionState.OPEN:
            return
        if not self.coalesce:
            self._write(self.ws.send(Message(data=data)))
            return
        if not self.outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self.outgoing.append(data)

    def _flush(self) -> None:
        if self.outgoing and self.ws.state is ConnectionState.OPEN:
            data = b"".join(self.outgoing)
            self._write(self.ws.send(Message(data=data)))
        self.outgoing.clear()

    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self, code: int) -> None:
        """Close handshake from the hub's side, then the socket (flushed)."""
        self._flush()
        if self.ws.state is ConnectionState.OPEN:
            self._write(self.ws.send(CloseConnection(code=code)))
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def start_websocket_server(
    host: str, port: int, ssl_context: Any, amqp: AmqpServer | None, mqtt: MqttServer | None
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: WebSocketBridge(amqp, mqtt), host, port, ssl=ssl_context, reuse_address=True
    )
