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

Two things for a relay at light load, where each read is one small message:

- a read that took less than asked for emptied the socket, so the next
  `receive_some` waits for it to be readable before reading rather than
  reading first (that read would fail with EAGAIN: one system call per
  message saved);
- `send_nowait` writes what the kernel takes at once, outside any task (the
  AMQP engine driver flushes its connections once per event-loop turn); the
  rest is kept and goes out first with the next `send_all`.
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

    __slots__ = ("_sock", "_closed", "_receiving", "_sending", "_drained", "_backlog", "_failed")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False
        self._receiving = False
        self._sending = False
        self._drained = False  # the last read emptied the socket
        self._backlog = bytearray()  # what send_nowait could not send yet
        self._failed: OSError | None = None  # a send_nowait failure, raised by send_all

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
            if not self._drained:
                try:
                    data = sock.recv(size)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise _broken(exc) from exc
                else:
                    self._drained = len(data) < size
                    await cancel_shielded_checkpoint()
                    return data
            while True:
                await wait_readable(sock)
                try:
                    data = sock.recv(size)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise _broken(exc) from exc
                self._drained = len(data) < size
                return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._failed is not None:
            raise _broken(self._failed) from self._failed
        if self._backlog:
            data = bytes(self._backlog) + bytes(data)  # what send_nowait left goes first
            self._backlog = bytearray()
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

    def send_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Send what the kernel takes now, without waiting; True if all of it went.

        Otherwise the rest is kept, in order, for the next `send_all` (which may
        be ``send_all(b"")``), and a failure is raised by that call. Not a
        checkpoint: callable from outside a task.
        """
        if self._closed or self._sending or self._backlog or self._failed is not None:
            if not self._closed:
                self._backlog += data  # behind what a waiting send_all is sending
            return False
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._failed = exc
            return False
        if sent < len(data):
            self._backlog += memoryview(data)[sent:]
            return False
        return True

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
