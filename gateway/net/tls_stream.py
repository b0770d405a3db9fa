"""TLS for the gateway's connections: `ssl.SSLObject` on memory BIOs over a socket.

`trio.SSLStream` is general: any transport stream below it, any number of
tasks calling in at once, renegotiation, HTTPS quirks. A relay pays for that
on every record: each `receive_some()` returns one TLS record and passes two
checkpoints (its own and the socket's), and each `send_all()` two more. Hubs
write one record per MQTT packet or AMQP frame batch, so a busy relay spends
more on that machinery than on the encryption itself.

`TLSStream` does the same job for the one shape the gateway needs, a TCP
socket with one reading task and one sending task, as a client towards the
hub (`open_tls_stream`) or a server on a device-side TLS listener
(`accept_tls_stream`):

- `receive_some(n)` decrypts every complete record already received, up to
  `n` bytes, with one socket read for all of them;
- `receive_some` is one checkpoint (a task switch) whatever it did;
  `send_all` is a cancel point, and a schedule point only when it has to
  wait for the socket. Every relay loop receives between sends, so no loop
  runs without yielding, and a send that the kernel takes at once costs no
  task switch (one switch per send was a tenth of a relay's CPU);
- bytes OpenSSL wants to send from either side (application data, a TLS 1.3
  key update answering one from the hub) leave in order through one writer;
- a socket read that took less than asked for emptied the socket, so the next
  one waits for the socket to be readable first instead of failing with
  EAGAIN (a system call per message saved at light load);
- `send_nowait` encrypts and writes what the kernel takes at once, outside any
  task (the AMQP engine driver flushes its connections once per event-loop
  turn: one record per connection per turn); the rest goes out first with the
  next `send_all`.

Errors look as they do from `trio.SSLStream`: `trio.BrokenResourceError`
whose ``__cause__`` is the `ssl.SSLError` or `OSError` (a peer that closed
without close_notify gives `ssl.SSLEOFError`), `trio.ClosedResourceError`
once closed, ``b""`` after the peer's close_notify.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint_if_cancelled,
    notify_closing,
    wait_readable,
    wait_writable,
)

from .plain_stream import take_socket

__all__ = ["TLSStream", "accept_tls_stream", "open_tls_stream"]

# One socket read takes everything the kernel has up to this; the records in it
# are then decrypted without another system call.
SOCKET_READ_SIZE = 262144
# The most plaintext one TLS record carries (RFC 8446 section 5.1).
RECORD_SIZE = 16384
DEFAULT_RECEIVE_SIZE = 65536


def _eof_as_such(exc: BaseException) -> BaseException:
    """A cut without close_notify as `ssl.SSLEOFError`, which callers test for.

    Python 3.11.2 (Debian 12's) reports it as a plain SSLError with this reason.
    """
    if (
        isinstance(exc, ssl.SSLError)
        and not isinstance(exc, ssl.SSLEOFError)
        and exc.reason == "UNEXPECTED_EOF_WHILE_READING"
    ):
        eof = ssl.SSLEOFError(ssl.SSL_ERROR_EOF, str(exc))
        eof.__cause__ = exc
        return eof
    return exc


class TLSStream(trio.abc.Stream):
    """TLS over a connected non-blocking socket (see the module doc).

    At most one task may be in `receive_some` and one in `send_all` at a time,
    as with any trio stream.
    """

    __slots__ = (
        "_sock", "_in", "_out", "_ssl", "_closed", "_broken", "_writing",
        "_writer_free", "_handshaken", "_drained", "_backlog",
    )  # fmt: skip

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        server_hostname: str | None = None,
        *,
        server_side: bool = False,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self._closed = False
        self._broken: BaseException | None = None
        self._writing = False  # a task is moving the outgoing BIO to the socket
        self._writer_free: trio.Event | None = None  # set when it is done, if anyone waits
        self._handshaken = False
        self._drained = False  # the last socket read emptied the socket
        self._backlog = b""  # encrypted bytes send_nowait could not send yet

    # -- what trio.SSLStream also offers ------------------------------------------

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._ssl

    @property
    def socket(self) -> socket.socket:
        return self._sock

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._ssl.getpeercert(binary_form)

    def version(self) -> str | None:
        return self._ssl.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._ssl.cipher()

    # -- states ---------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError("the TLS connection failed earlier") from self._broken

    def _fail(self, exc: BaseException) -> trio.BrokenResourceError:
        self._broken = exc
        error = trio.BrokenResourceError(str(exc) or type(exc).__name__)
        error.__cause__ = exc
        return error

    # -- socket I/O -------------------------------------------------------------------

    async def _write_out(self) -> bool:
        """Move the outgoing BIO to the socket; True if this had to wait.

        One task writes at a time so records leave in order; a task arriving
        while another writes waits until it is done (the writer takes whatever
        the BIO holds when it looks, so the newcomer's bytes may be gone by then).
        """
        waited = False
        while self._writing:
            if self._writer_free is None:
                self._writer_free = trio.Event()
            await self._writer_free.wait()
            waited = True
        out = self._out
        if not out.pending and not self._backlog:
            return waited
        sock = self._sock
        self._writing = True
        try:
            while self._backlog or out.pending:
                if self._backlog:
                    view = memoryview(self._backlog)  # what send_nowait left goes first
                    self._backlog = b""
                else:
                    view = memoryview(out.read())
                while view:
                    try:
                        sent = sock.send(view)
                    except BlockingIOError:
                        await wait_writable(sock)
                        waited = True
                        continue
                    except OSError as exc:
                        raise self._fail(exc) from exc
                    view = view[sent:]
        except trio.Cancelled as exc:
            # Part of a record may have left: nothing after it can follow.
            self._broken = exc
            raise
        finally:
            self._writing = False
            if self._writer_free is not None:
                self._writer_free.set()
                self._writer_free = None
        return waited

    async def _read_in(self) -> bool:
        """One socket read into the incoming BIO, waiting for it if need be; True if
        this had to wait."""
        sock = self._sock
        waited = False
        if self._drained:
            await wait_readable(sock)
            waited = True
        while True:
            try:
                data = sock.recv(SOCKET_READ_SIZE)
            except BlockingIOError:
                await wait_readable(sock)
                waited = True
                continue
            except OSError as exc:
                raise self._fail(exc) from exc
            self._drained = len(data) < SOCKET_READ_SIZE
            if data:
                self._in.write(data)
            else:
                self._in.write_eof()
            return waited

    # -- the stream -----------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Complete the handshake (chain and host name checked by the context)."""
        self._check()
        tls = self._ssl
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._write_out()
                await self._read_in()
            except (ssl.SSLError, ssl.CertificateError) as exc:
                # The alert for the hub, if OpenSSL wrote one, is worth sending.
                try:
                    self._sock.send(self._out.read())
                except OSError:
                    pass
                raise self._fail(exc) from exc
        await self._write_out()
        self._handshaken = True

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await checkpoint_if_cancelled()
        self._check()
        limit = DEFAULT_RECEIVE_SIZE if max_bytes is None else max_bytes
        if limit < 1:
            raise ValueError("max_bytes must be >= 1")
        tls = self._ssl
        waited = False
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                data = tls.read(min(limit - total, RECORD_SIZE))
            except ssl.SSLWantReadError:
                if chunks:
                    break  # a partial record behind complete ones: return those
                if self._out.pending:
                    waited |= await self._write_out()
                waited |= await self._read_in()
                continue
            except ssl.SSLError as exc:
                error = _eof_as_such(exc)
                if chunks:
                    self._broken = error  # what came before it first; the error on the next call
                    break
                raise self._fail(error) from error
            if not data:
                break  # close_notify: end of stream
            chunks.append(data)
            total += len(data)
            if total >= limit or not (self._in.pending or tls.pending()):
                break
        if self._out.pending:
            # Something to answer (a TLS 1.3 key update): it goes out before more is read.
            waited |= await self._write_out()
        if not waited:
            await cancel_shielded_checkpoint()
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await checkpoint_if_cancelled()
        self._check()
        if data:
            try:
                self._ssl.write(data)
            except ssl.SSLError as exc:
                raise self._fail(exc) from exc
        # A cancel point, and a schedule point only if it had to wait (see the module doc).
        await self._write_out()

    def send_nowait(self, data: bytes | bytearray | memoryview) -> bool:
        """Encrypt `data` and send what the kernel takes now, without waiting; True
        if all of it went.

        Otherwise the rest is kept, in order, for the next `send_all` (which may be
        ``send_all(b"")``) or the task already writing, and a failure is raised by
        the next `send_all`. Not a checkpoint: callable from outside a task.
        """
        if self._closed or self._broken is not None:
            return False
        try:
            if data:
                self._ssl.write(data)
        except ssl.SSLError as exc:
            self._broken = exc
            return False
        if self._writing:
            return True  # the task writing takes what the BIO holds before it stops
        if self._backlog:
            return False
        out = self._out.read()
        try:
            sent = self._sock.send(out)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._broken = exc
            return False
        if sent < len(out):
            self._backlog = out[sent:]
            return False
        return True

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        if self._writing:
            await self._write_out()
        else:
            await wait_writable(self._sock)

    async def aclose(self) -> None:
        """Send close_notify if it can go at once (never waits for the hub), then close."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        if self._handshaken and self._broken is None and not self._writing:
            try:
                self._ssl.unwrap()
            except (ssl.SSLWantReadError, ssl.SSLError):
                pass
            try:
                self._sock.send(self._out.read())
            except OSError:
                pass
        self._close_socket()
        await trio.lowlevel.checkpoint()

    def _close_socket(self) -> None:
        self._closed = True
        notify_closing(self._sock)
        self._sock.close()


async def open_tls_stream(
    tcp: trio.SocketStream, context: ssl.SSLContext, server_hostname: str | None
) -> TLSStream:
    """Take over `tcp`'s socket and complete a TLS handshake on it as the client.

    `tcp` must not be used afterwards. On failure the socket is closed and
    `trio.BrokenResourceError` (cause: the `ssl.SSLError` or `OSError`) raised.
    """
    return await _handshake(TLSStream(take_socket(tcp), context, server_hostname))


async def accept_tls_stream(tcp: trio.SocketStream, context: ssl.SSLContext) -> TLSStream:
    """As `open_tls_stream`, as the server (a device-side TLS listener)."""
    return await _handshake(TLSStream(take_socket(tcp), context, server_side=True))


async def _handshake(stream: TLSStream) -> TLSStream:
    try:
        await stream.do_handshake()
    except BaseException:
        # Closed before the error is seen, without a checkpoint: the caller's
        # handling of the failure comes before anything the peer does next.
        stream._close_socket()
        raise
    return stream
