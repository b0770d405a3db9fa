"""A misbehaving WebSocket hub for black-box tests: TLS + wsproto's server side in a thread.

Each mode breaks the protocol one way once a client connects:

- ``text``: accepts the upgrade, then sends a text frame;
- ``oversized``: accepts, then a binary frame announcing 2**40 bytes and sends 5 MiB of them;
- ``garbage``: answers the upgrade request with bytes that are not HTTP;
- ``refuse``: answers the upgrade with 403 and a body;
- ``close``: accepts, then closes with 1011 "going down".
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from pathlib import Path

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

MODES = ("text", "oversized", "garbage", "refuse", "close")


class BadHub:
    def __init__(self, mode: str, cert_file: Path, key_file: Path) -> None:
        assert mode in MODES
        self.mode = mode
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert_file), str(key_file))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.connections += 1
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(30)
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
            ws = WSConnection(ConnectionType.SERVER)
            request = None
            while request is None:
                data = conn.recv(65536)
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Request):
                        request = event
            if self.mode == "garbage":
                conn.sendall(b"\x00\x01garbage, not HTTP\r\n\r\n")
            elif self.mode == "refuse":
                body = b"Forbidden by policy"
                conn.sendall(
                    ws.send(RejectConnection(status_code=403, has_body=True,
                                             headers=[(b"content-length", b"%d" % len(body))]))
                    + ws.send(RejectData(data=body))
                )  # fmt: skip
            else:
                conn.sendall(ws.send(AcceptConnection(subprotocol=request.subprotocols[0])))
                if self.mode == "text":
                    conn.sendall(ws.send(TextMessage(data='{"hello": "text"}')))
                elif self.mode == "close":
                    conn.sendall(ws.send(CloseConnection(code=1011, reason="going down")))
                elif self.mode == "oversized":
                    conn.sendall(bytes([0x82, 127]) + struct.pack("!Q", 2**40))
                    chunk = b"\x00" * 65536
                    for _ in range(80):
                        conn.sendall(chunk)
            self._held.append(conn)  # left open: the client must end it
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self.sock.close()
        for conn in self._held:
            try:
                conn.close()
            except OSError:
                pass
