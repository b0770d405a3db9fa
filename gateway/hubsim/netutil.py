"""Closing asyncio transports the way a lost hub would; listeners that can end
the TLS handshakes still in progress when the server stops."""

from __future__ import annotations

import asyncio
import socket
import struct
import weakref
from collections.abc import Iterable


def drop(transport: asyncio.BaseTransport, reset: bool) -> None:
    """Close now; with ``reset`` send a TCP RST instead of a FIN (SO_LINGER 0)."""
    if reset and not transport.is_closing():
        try:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (AttributeError, OSError):
            pass  # a TLS transport that is already shutting down
    if reset:
        try:
            transport.abort()  # type: ignore[attr-defined]
        except AttributeError:
            # Python 3.11.2 (Debian 12's) raises from a TLS transport whose connection is
            # already lost (its protocol is gone): there is nothing left to abort.
            pass
    else:
        transport.close()


class TrackingSocket(socket.socket):
    """A listening socket that remembers the connections it accepted.

    asyncio hands a TLS connection to the server's protocol only once its handshake
    is done, and ``Server.close()`` leaves the ones still in their handshake alone: a
    client that connected just before ``stop()`` would wait for an answer that never
    comes (the loop is gone) until its own timeout. This keeps them reachable.
    """

    __slots__ = ("accepted",)
    accepted: weakref.WeakSet[socket.socket]

    def accept(self) -> tuple[socket.socket, object]:
        conn, address = super().accept()
        self.accepted.add(conn)
        return conn, address


def tracking_listener(host: str | None, port: int) -> TrackingSocket:
    """Bound (not yet listening) for ``create_server(sock=...)``: the first address of
    ``host``, with SO_REUSEADDR as ``create_server(reuse_address=True)`` would."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = TrackingSocket(family, kind, proto)
    sock.accepted = weakref.WeakSet()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def end_handshakes(listener: TrackingSocket | None, established: Iterable[asyncio.BaseTransport]) -> None:
    """Shut down every accepted connection that is not one of ``established`` (those
    the server closes itself): the client sees the hub go, as it would a real one."""
    if listener is None:
        return
    keep: set[int] = set()
    for transport in established:
        try:
            sock = transport.get_extra_info("socket")
        except AttributeError:
            continue  # a TLS transport whose connection is already lost (Python 3.11)
        if sock is not None:
            keep.add(sock.fileno())
    for conn in list(listener.accepted):
        fd = conn.fileno()
        if fd != -1 and fd not in keep:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
