"""WebSocket client transport: a byte stream over a WebSocket (wsproto) over a stream.

Azure IoT Hub serves AMQP and MQTT on port 443 at `/$iothub/websocket`, with
the subprotocols ``AMQPWSB10`` and ``mqtt``. Binary messages carry exactly the
bytes the TCP transport carries, so the relays keep their byte-stream view:
`WebSocketStream` is a `trio.abc.Stream` whose `send_all` sends one binary
message and whose `receive_some` returns binary payload bytes as they arrive.

Message boundaries mean nothing to AMQP or MQTT, so a fragmented message needs
no reassembly buffer: its fragments' payload is returned in order as it comes.
What is bounded is the size of one message (`max_message_size`, counted as it
arrives) and what `receive_some` keeps between calls (at most one inner read).

wsproto does the HTTP/1.1 upgrade and the framing (client frames are masked as
RFC 6455 requires); this module moves bytes and decides what is an error:

- a text message, a frame wsproto cannot parse, or a message over the limit:
  the hub is sent a close frame with the matching code (1003, 1002/1007,
  1009) and the caller gets `WebSocketError` (a `trio.BrokenResourceError`),
  which the connectors treat as a lost connection;
- a close frame from the hub is answered; code 1000 is the end of the stream
  (``b""``), any other code a `WebSocketError` naming it;
- pings are answered with pongs by the receiving task. If the sending task is
  writing at that moment the pong is queued and goes out right after its write,
  so the receiver never waits behind a blocked send.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import ProtocolError

from .tls import TLSConnectError

__all__ = [
    "IOTHUB_WEBSOCKET_PATH",
    "WebSocketError",
    "WebSocketHandshakeError",
    "WebSocketStream",
    "open_websocket_stream",
    "subprotocol_for",
    "websocket_wrapper",
]

IOTHUB_WEBSOCKET_PATH = "/$iothub/websocket"
DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024  # far above IoT Hub's 256 KiB messages
DEFAULT_RECEIVE_SIZE = 65536
# The most a handshake answer may take before it is refused as garbage.
MAX_HANDSHAKE_SIZE = 65536
# How long a graceful `aclose` waits for the hub's close frame.
CLOSE_WAIT = 1.0  # within the MQTT relay's own 2 s bound on closing a stream
_INNER_READ_SIZE = 65536


class WebSocketHandshakeError(TLSConnectError):
    """The WebSocket upgrade failed. ``reason`` is ``websocket_refused`` (the hub
    answered with another HTTP status, ``status`` holds it), ``websocket_protocol``
    (an answer that is not a valid upgrade) or ``closed``."""

    def __init__(self, reason: str, detail: str, status: int | None = None) -> None:
        super().__init__(reason, detail)
        self.status = status


class WebSocketError(trio.BrokenResourceError):
    """The WebSocket connection ended in error; ``code`` is the close code (sent or
    received), ``local`` says whether the gateway closed it (the hub broke the protocol)."""

    def __init__(self, message: str, code: int, *, local: bool) -> None:
        super().__init__(message)
        self.code = code
        self.local = local


def _code_name(code: int) -> str:
    try:
        return f"{code} {CloseReason(code).name}"
    except ValueError:
        return str(code)


class WebSocketStream(trio.abc.Stream):
    """A connected client WebSocket as a byte stream (see the module doc).

    One task may receive and one task send at a time, as with any trio stream.
    """

    __slots__ = (
        "_inner", "_ws", "_max_message", "_message_size", "_pending", "_pending_at",
        "_control", "_sending", "_send_free", "_receiving", "_closed", "_error", "_eof",
        "_deferred_close", "_events_buffered", "subprotocol",
    )  # fmt: skip

    def __init__(
        self,
        inner: trio.abc.Stream,
        ws: WSConnection,
        *,
        subprotocol: str | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self._inner = inner
        self._ws = ws
        self._max_message = max_message_size
        self._message_size = 0  # bytes of the binary message being received so far
        self._pending = b""  # payload received beyond what a caller asked for
        self._pending_at = 0
        self._control: list[bytes] = []  # pongs / close frames waiting for the sender
        self._sending = False
        self._send_free: trio.Event | None = None
        self._receiving = False
        self._closed = False
        self._error: BaseException | None = None  # how it ended, raised again by later calls
        self._eof = False  # ended cleanly (close 1000 or the transport's end)
        self._deferred_close: CloseConnection | None = None  # after payload already returned
        # The upgrade answer may have carried frames already: look before reading.
        self._events_buffered = True
        self.subprotocol = subprotocol

    @property
    def inner(self) -> trio.abc.Stream:
        return self._inner

    # -- sending --------------------------------------------------------------------

    async def _acquire_send(self) -> None:
        while self._sending:
            if self._send_free is None:
                self._send_free = trio.Event()
            await self._send_free.wait()
        self._sending = True

    def _release_send(self) -> None:
        self._sending = False
        if self._send_free is not None:
            self._send_free.set()
            self._send_free = None

    async def _flush_control(self) -> None:
        while self._control:
            frames = b"".join(self._control)
            self._control.clear()
            await self._inner.send_all(frames)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("the WebSocket stream is closed")
        if self._error is not None or self._eof:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("the WebSocket connection has ended") from self._error
        if self._ws.state is not ConnectionState.OPEN:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("the WebSocket connection is closing")
        if not isinstance(data, bytes | bytearray):
            data = bytes(data)  # a memoryview: wsproto takes bytes or bytearray
        # wsproto copies the payload once while masking it; no copy here before that.
        frame = self._ws.send(BytesMessage(data=data)) if data else b""
        if self._sending:
            await self._acquire_send()
            if self._ws.state is not ConnectionState.OPEN:
                # A close frame went out meanwhile: nothing may follow it.
                self._release_send()
                raise trio.BrokenResourceError("the WebSocket connection is closing")
        else:
            self._sending = True  # uncontended: no task switch for the lock
        try:
            if frame:
                await self._inner.send_all(frame)
            else:
                await trio.lowlevel.checkpoint()
            if self._control:
                await self._flush_control()
        finally:
            self._release_send()

    async def _send_control(self, frame: bytes) -> None:
        """Send a pong or close frame from the receiving task; never waits for the sender."""
        self._control.append(frame)
        if self._sending:
            return  # the sender flushes it after its write
        self._sending = True
        try:
            await self._flush_control()
        finally:
            self._release_send()

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    # -- receiving ------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("the WebSocket stream is closed")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        limit = DEFAULT_RECEIVE_SIZE if max_bytes is None else max_bytes
        if limit < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._pending:
            await trio.lowlevel.checkpoint()
            return self._take_pending(limit)
        if self._error is not None:
            await trio.lowlevel.checkpoint()
            raise self._again()
        if self._eof:
            await trio.lowlevel.checkpoint()
            return b""
        self._receiving = True
        try:
            data = await self._receive_payload()
        finally:
            self._receiving = False
        if len(data) > limit:
            self._pending = data
            self._pending_at = 0
            return self._take_pending(limit)
        return data

    def _again(self) -> trio.BrokenResourceError:
        """The error that ended the connection, for a later call."""
        error = self._error
        if isinstance(error, WebSocketError):
            return WebSocketError(str(error), error.code, local=error.local)
        again = trio.BrokenResourceError(str(error))
        again.__cause__ = error
        return again

    def _take_pending(self, limit: int) -> bytes:
        start = self._pending_at
        end = start + limit
        chunk = self._pending[start:end]
        if end >= len(self._pending):
            self._pending = b""
            self._pending_at = 0
        else:
            self._pending_at = end
        return chunk

    async def _receive_payload(self) -> bytes:
        ws = self._ws
        if self._deferred_close is not None:
            close, self._deferred_close = self._deferred_close, None
            await self._handle_close(close)
            return b""
        while True:
            if self._events_buffered:
                self._events_buffered = False
            else:
                try:
                    raw = await self._inner.receive_some(_INNER_READ_SIZE)
                except trio.BrokenResourceError as exc:
                    self._error = exc
                    raise
                if not raw:
                    # The transport ended without a close frame: as on TCP, end of stream.
                    self._eof = True
                    return b""
                ws.receive_data(raw)
            chunks: list[bytes] = []
            close: CloseConnection | None = None
            for event in ws.events():
                kind = type(event)
                if kind is BytesMessage:
                    payload = event.data  # type: ignore[attr-defined]
                    self._message_size += len(payload)
                    if self._message_size > self._max_message:
                        await self._fail(
                            CloseReason.MESSAGE_TOO_BIG,
                            f"the hub sent a WebSocket message over {self._max_message} bytes",
                        )
                        break
                    if event.message_finished:  # type: ignore[attr-defined]
                        self._message_size = 0
                    if payload:
                        chunks.append(payload)
                elif kind is Ping:
                    if ws.state is ConnectionState.OPEN:
                        await self._send_control(ws.send(event.response()))  # type: ignore[attr-defined]
                elif kind is TextMessage:
                    await self._fail(
                        CloseReason.UNSUPPORTED_DATA,
                        "the hub sent a WebSocket text message (only binary is expected)",
                    )
                    break
                elif kind is CloseConnection:
                    close = event  # type: ignore[assignment]
                    break
                # Pongs (we send no pings) need nothing.
            if self._error is not None:
                if chunks:
                    return b"".join(chunks)  # what came before the error first
                raise self._error
            if close is not None:
                if chunks:
                    # What came before the close first; the close on the next call.
                    self._deferred_close = close
                    return b"".join(chunks)
                await self._handle_close(close)
                return b""
            if chunks:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _handle_close(self, close: CloseConnection) -> None:
        ws = self._ws
        code = int(close.code)
        if ws.state is ConnectionState.OPEN:
            # wsproto turns a frame it cannot parse into a close event without a
            # close frame from the hub: the hub broke the protocol.
            await self._fail(
                code, f"WebSocket protocol error from the hub: {close.reason or 'bad frame'}"
            )
            raise self._again()
        if ws.state is ConnectionState.REMOTE_CLOSING:
            try:
                await self._send_control(ws.send(close.response()))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        if code == CloseReason.NORMAL_CLOSURE:
            self._eof = True
            return
        reason = f": {close.reason}" if close.reason else ""
        error = WebSocketError(
            f"the hub closed the WebSocket ({_code_name(code)}){reason}", code, local=False
        )
        self._error = error
        raise error

    async def _fail(self, code: int, message: str) -> None:
        """Close with `code` because of the hub's protocol error; the error is kept
        in ``_error`` for the caller to raise."""
        error = WebSocketError(f"{message}; closed with {_code_name(code)}", code, local=True)
        self._error = error
        ws = self._ws
        if ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            try:
                await self._send_control(ws.send(CloseConnection(code=code)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # -- closing --------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close handshake, bounded by `CLOSE_WAIT`, then close the inner stream.

        The close frame goes out only if nothing else is being sent (never queued
        behind a blocked write); the hub's answer is awaited only if no other task
        is receiving. Cancelled (`trio.aclose_forcefully`), it just closes.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        ws = self._ws
        try:
            if ws.state is ConnectionState.OPEN and not self._sending and self._error is None:
                self._sending = True
                try:
                    await self._inner.send_all(ws.send(CloseConnection(code=1000)))
                finally:
                    self._release_send()
                if not self._receiving:
                    with trio.move_on_after(CLOSE_WAIT):
                        await self._await_close_answer()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError):
            pass
        finally:
            await self._inner.aclose()

    async def _await_close_answer(self) -> None:
        ws = self._ws
        while ws.state is ConnectionState.LOCAL_CLOSING:
            raw = await self._inner.receive_some(_INNER_READ_SIZE)
            if not raw:
                return
            ws.receive_data(raw)
            for event in ws.events():
                if isinstance(event, CloseConnection):
                    return


def _host_header(host: str, port: int, secure: bool) -> str:
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    if port == (443 if secure else 80):
        return name
    return f"{name}:{port}"


async def open_websocket_stream(
    inner: trio.abc.Stream,
    *,
    host: str,
    port: int,
    subprotocol: str,
    resource: str = IOTHUB_WEBSOCKET_PATH,
    secure: bool = True,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> WebSocketStream:
    """Upgrade `inner` (the TLS stream to the hub) to a WebSocket.

    Raises `WebSocketHandshakeError` if the hub refuses (another HTTP status: the
    status and the start of the body in the detail) or answers something that
    is not a valid upgrade; `trio.BrokenResourceError` from the inner stream as is.
    The caller bounds the time (the connect timeout) and closes `inner` on failure.
    """
    try:
        return await _upgrade(
            inner, host, port, subprotocol, resource, secure, extra_headers, max_message_size
        )
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        where = f"wss://{_host_header(host, port, True)}{resource}"
        cause = exc.__cause__ or exc
        raise WebSocketHandshakeError(
            "closed", f"WebSocket upgrade at {where}: connection lost ({cause})"
        ) from exc


async def _upgrade(
    inner: trio.abc.Stream,
    host: str,
    port: int,
    subprotocol: str,
    resource: str,
    secure: bool,
    extra_headers: list[tuple[bytes, bytes]] | None,
    max_message_size: int,
) -> WebSocketStream:
    ws = WSConnection(ConnectionType.CLIENT)
    request = Request(
        host=_host_header(host, port, secure),
        target=resource,
        subprotocols=[subprotocol],
        extra_headers=list(extra_headers or []),
    )
    await inner.send_all(ws.send(request))
    where = f"wss://{_host_header(host, port, True)}{resource}"
    received = 0
    rejected: RejectConnection | None = None
    body = b""
    while True:
        raw = await inner.receive_some(_INNER_READ_SIZE)
        if not raw and rejected is None:
            raise WebSocketHandshakeError(
                "closed", f"WebSocket upgrade at {where}: the hub closed the connection"
            )
        received += len(raw)
        if rejected is None and received > MAX_HANDSHAKE_SIZE:
            raise WebSocketHandshakeError(
                "websocket_protocol",
                f"WebSocket upgrade at {where}: answer over {MAX_HANDSHAKE_SIZE} bytes "
                "without completing",
            )
        try:
            ws.receive_data(raw)
        except ProtocolError as exc:
            raise WebSocketHandshakeError(
                "websocket_protocol",
                f"WebSocket upgrade at {where}: invalid answer from the hub ({exc})",
            ) from exc
        # Lazily: frames that came with the answer stay queued for the stream.
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                if event.subprotocol is not None and event.subprotocol != subprotocol:
                    raise WebSocketHandshakeError(
                        "websocket_protocol",
                        f"WebSocket upgrade at {where}: hub chose subprotocol "
                        f"{event.subprotocol!r}, asked for {subprotocol!r}",
                    )
                return WebSocketStream(
                    inner, ws, subprotocol=event.subprotocol, max_message_size=max_message_size
                )
            if isinstance(event, RejectConnection):
                rejected = event
                if not event.has_body:
                    raise _refused(where, event, b"")
            elif isinstance(event, RejectData) and rejected is not None:
                body += event.data
                if event.body_finished or len(body) >= 200:
                    raise _refused(where, rejected, body)
        if not raw and rejected is not None:
            raise _refused(where, rejected, body)


def _refused(where: str, event: RejectConnection, body: bytes) -> WebSocketHandshakeError:
    text = body[:200].decode("utf-8", "replace").strip()
    text = " ".join(text.split())  # one log line
    suffix = f": {text}" if text else ""
    return WebSocketHandshakeError(
        "websocket_refused",
        f"WebSocket upgrade at {where} refused: HTTP {event.status_code}{suffix}",
        status=event.status_code,
    )


def subprotocol_for(protocol: str) -> str:
    """IoT Hub's WebSocket subprotocol for a connector protocol."""
    return "AMQPWSB10" if protocol == "amqp" else "mqtt"


def websocket_wrapper(
    connector: Any,
) -> Callable[[trio.abc.Stream, Any, float], Awaitable[WebSocketStream]] | None:
    """The stream wrapper (see `gateway.net.dial`) of a ``transport: websockets``
    connector, None for TCP. The upgrade names the hub in the Host header as
    the TLS handshake did, at `IOTHUB_WEBSOCKET_PATH`."""
    if getattr(connector, "transport", "tcp") != "websockets":
        return None
    subprotocol = subprotocol_for(str(connector.protocol))
    secure = getattr(connector, "tls_profile", None) is not None

    async def wrap(stream: trio.abc.Stream, endpoint: Any, timeout: float) -> WebSocketStream:
        # The Host header names the hub as TLS did (SNI: the profile's server_name
        # if it has one), even when the endpoint is an address.
        ssl_object = getattr(stream, "ssl_object", None)
        host = getattr(ssl_object, "server_hostname", None) or str(endpoint.host)
        return await open_websocket_stream(
            stream,
            host=host,
            port=int(endpoint.port),
            subprotocol=subprotocol,
            secure=secure,
        )

    return wrap
