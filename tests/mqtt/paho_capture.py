"""Capture the exact bytes paho-mqtt writes, by playing its server over a real socket.

paho runs without a network thread: every call writes synchronously, so the
test reads paho's packets straight off the accepted socket, and feeds it
server packets with `server_send` (paho processes them in `loop_read`).
"""

from __future__ import annotations

import select
import socket
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

READ_TIMEOUT = 2.0


class PahoCapture:
    def __init__(self, client_id: str = "dev1", *, protocol: int = paho.MQTTv311, **kwargs: Any):
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(1)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs
        )
        self.conn: socket.socket | None = None
        self.received: list[Any] = []
        self.client.on_message = lambda c, u, msg: self.received.append(msg)

    def connect(self, keepalive: int = 60, **kwargs: Any) -> bytes:
        """paho connects; returns the CONNECT bytes it wrote."""
        self.client.connect(
            "127.0.0.1", self._server.getsockname()[1], keepalive=keepalive, **kwargs
        )
        self.conn, _ = self._server.accept()
        return self.read()

    def read(self) -> bytes:
        """All bytes paho has written so far (waits until at least one arrives)."""
        assert self.conn is not None
        chunks = []
        ready, _, _ = select.select([self.conn], [], [], READ_TIMEOUT)
        while ready:
            data = self.conn.recv(1 << 20)
            if not data:
                break
            chunks.append(data)
            ready, _, _ = select.select([self.conn], [], [], 0.05)
        return b"".join(chunks)

    def server_send(self, data: bytes) -> None:
        """Deliver server bytes to paho and let it process them."""
        assert self.conn is not None
        self.conn.sendall(data)
        select.select([self.client.socket()], [], [], READ_TIMEOUT)
        self.client.loop_read()
        # paho queues its answers; flush them to the socket.
        while self.client.want_write():
            self.client.loop_write()

    def close(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            sock.close()
        if self.conn is not None:
            self.conn.close()
        self._server.close()
