"""Plaintext device connections: a TCP socket as a trio stream, without the layers.

`trio.SocketStream` goes through trio's socket wrapper on every call (a
context manager, an outcome object, a conflict detector); for a relay that
reads and writes a few hundred bytes at a time that wrapper costs more than
the system call. `PlainStream` keeps what matters: `receive_some` is one
checkpoint; `send_all` is a cancel point and a schedule point only when it
waits for the socket (as `gateway.net.tls_stream.TLSStream`: a relay loop
yields in its receives); waits use trio's I/O wait; and errors are trio's (`trio.BrokenResourceError` with the `OSError` as cause,
`trio.ClosedResourceError` once closed, `trio.BusyResourceError` for two
tasks sending or receiving at once).
"""

from __future__ import annotations

import errno
import socket

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint_if_cancelled,
    notify_closing,
    wait_readable,
    wait_writable,
)

__all__ = ["PlainStream", "take_socket"]

DEFAULT_RECEIVE_SIZE = 65536


def take_socket(tcp: trio.SocketStream) -> socket.socket:
    """The stdlib socket under `tcp`, which must not be used afterwards."""
    return socket.socket(fileno=tcp.socket.detach())


class PlainStream(trio.abc.HalfCloseableStream):
    """A connected TCP socket (non-blocking) as a trio stream."""

    __slots__ = ("_sock", "_closed", "_receiving", "_sending")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False
        self._receiving = False
        self._sending = False

    @classmethod
    def from_trio(cls, tcp: trio.SocketStream) -> PlainStream:
        return cls(take_socket(tcp))

    @property
    def socket(self) -> socket.socket:
        return self._sock

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        size = DEFAULT_RECEIVE_SIZE if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        sock = self._sock
        self._receiving = True
        try:
            try:
                data = sock.recv(size)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _broken(exc) from exc
            else:
                await cancel_shielded_checkpoint()
                return data
            while True:
                await wait_readable(sock)
                try:
                    return sock.recv(size)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise _broken(exc) from exc
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        sock = self._sock
        self._sending = True
        try:
            with memoryview(data) as view:
                total = len(view)
                sent = 0
                while sent < total:
                    try:
                        sent += sock.send(view[sent:])
                    except BlockingIOError:
                        await wait_writable(sock)
                    except OSError as exc:
                        raise _broken(exc) from exc
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await wait_writable(self._sock)

    async def send_eof(self) -> None:
        await checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise _broken(exc) from exc
        await cancel_shielded_checkpoint()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()


def _broken(exc: OSError) -> trio.BrokenResourceError:
    return trio.BrokenResourceError(f"socket failed: {exc}")
