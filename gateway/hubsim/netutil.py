"""Closing asyncio transports the way a lost hub would."""

from __future__ import annotations

import asyncio
import socket
import struct


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
