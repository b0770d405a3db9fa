"""The AMQP 1.0 connection endpoint, sans-I/O (h11 style).

Feed received bytes to ``receive_data`` and get events back; call methods to act;
write whatever ``data_to_send`` returns. Time only enters through ``tick(now)``.

One Connection handles the protocol headers, SASL (``sasl.py``), open/close with
max-frame-size, channel-max and idle timeouts, and the channel -> Session mapping;
sessions and links do the rest. A protocol error from the peer closes the
connection with the matching AMQP error condition and a readable description, and
is reported as a ``ConnectionError`` event; after that nothing more is received.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Iterable
from typing import Any

from .constants import SASL_OK
from .constants import ErrorCondition as C
from .errors import AMQPError, FramingError, LocalProtocolError
from .events import ConnectionError, Event, RemoteBegin, RemoteClose, RemoteEnd, RemoteOpen
from .flow import MAX_WINDOW
from .framing import (
    AMQP_HEADER,
    FRAME_AMQP,
    FRAME_SASL,
    HEADER_AMQP,
    HEADER_SASL,
    MIN_MAX_FRAME_SIZE,
    PRE_OPEN_FRAME_LIMIT,
    SASL_FRAME_LIMIT,
    SASL_HEADER,
    FrameReader,
    encode_frame_into,
    plain_transfer,
    read_protocol_header,
)
from .link import Delivery
from .performatives import (
    Attach,
    Begin,
    Close,
    Detach,
    Disposition,
    End,
    Error,
    Flow,
    Open,
    Performative,
    SaslChallenge,
    SaslInit,
    SaslMechanisms,
    SaslOutcome,
    SaslResponse,
    Transfer,
)
from .sasl import SaslClient, SaslDecision, SaslServer
from .session import Session, SessionState
from .types import Symbol

__all__ = ["Connection", "DEFAULT_MAX_MESSAGE_SIZE", "TRACE_RECV", "TRACE_SEND", "Tracer"]

#: Largest message reassembled on a link that does not set max-message-size.
DEFAULT_MAX_MESSAGE_SIZE = 1 << 20

#: Trace directions, as proton's frame trace writes them.
TRACE_RECV = "<-"
TRACE_SEND = "->"

#: trace(direction, channel, what, payload_len), called once per frame in and out:
#: ``what`` is the performative (SASL frames included), None for an empty frame, or
#: the 8 protocol header bytes (channel None then). ``payload_len`` is the length of
#: the message bytes a transfer frame carries (0 for every other frame); the bytes
#: themselves are never passed. Secrets are blanked first: a PLAIN sasl-init keeps
#: authzid and user name but not the password, other SASL data become zero bytes of
#: the same length. Sent frames are reported when ``data_to_send`` hands them over.
#: Matches ``functools.partial(FrameTracer.amqp, conn_id)``.
Tracer = Callable[[str, "int | None", Any, int], None]

_EMPTY_FRAME = b"\x00\x00\x00\x08\x02\x00\x00\x00"

# Input phases.
_HEADER = "header"  # waiting for a protocol header
_SASL = "sasl"  # SASL frames
_AMQP = "amqp"  # AMQP frames
_DONE = "done"  # closed or failed: input is ignored


class Connection:
    """One AMQP connection, either end.

    ``role="client"``: ``open()`` sends the protocol header(s), runs SASL with
    ``sasl`` (a SaslClient) if given, then sends open. ``role="server"``: answers
    the peer's header; with ``sasl`` (a SaslServer) it runs SASL first. The server
    sends its open when ``open()`` is called (at any time; it waits for the header).
    """

    def __init__(
        self,
        role: str,
        container_id: str,
        *,
        sasl: SaslServer | SaslClient | None = None,
        hostname: str | None = None,
        max_frame_size: int = 65536,
        channel_max: int = 255,
        idle_timeout: float | None = None,
        properties: dict[Any, Any] | None = None,
        offered_capabilities: Any = None,
        desired_capabilities: Any = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        trace: Tracer | None = None,
    ) -> None:
        if role not in ("client", "server"):
            raise ValueError("role must be 'client' or 'server'")
        if role == "client" and sasl is not None and not isinstance(sasl, SaslClient):
            raise ValueError("a client connection takes a SaslClient")
        if role == "server" and sasl is not None and not isinstance(sasl, SaslServer):
            raise ValueError("a server connection takes a SaslServer")
        if not MIN_MAX_FRAME_SIZE <= max_frame_size <= 0xFFFFFFFF:
            raise ValueError(f"max_frame_size must be at least {MIN_MAX_FRAME_SIZE}")
        if not 0 <= channel_max <= 0xFFFF:
            raise ValueError("channel_max must be in 0..65535")
        if idle_timeout is not None and idle_timeout < 0:
            raise ValueError("idle_timeout must not be negative")
        self.role = role
        self.container_id = container_id
        self.sasl = sasl
        self.hostname = hostname
        self.max_frame_size = max_frame_size
        self.channel_max = channel_max
        self.idle_timeout = idle_timeout or None
        self.properties = properties
        self.offered_capabilities = offered_capabilities
        self.desired_capabilities = desired_capabilities
        self.max_message_size = max_message_size
        self._trace = trace
        # Frames written but not yet handed out by data_to_send (for the trace):
        # (channel, performative, payload length); held ones wait for our open.
        self._trace_out: list[tuple[int | None, Any, int]] = []
        self._trace_held: list[tuple[int | None, Any, int]] = []
        #: the peer's open performative, once received
        self.remote_open: Open | None = None
        #: the peer's close error (if it closed with one)
        self.remote_close_error: Error | None = None
        #: what SASL established (server: the peer's identity; client: ours)
        self.authenticated: Any = None
        #: the error we closed the connection with after a protocol failure
        self.error: Error | None = None
        self.context: Any = None

        self._phase = _HEADER
        self._pre = bytearray()  # header and SASL bytes (before the AMQP frame phase)
        # A server reads small frames until the peer's open (see PRE_OPEN_FRAME_LIMIT).
        self._reader = FrameReader(
            min(max_frame_size, PRE_OPEN_FRAME_LIMIT) if role == "server" else max_frame_size
        )
        self._sasl_frame_limit = (
            min(max_frame_size, SASL_FRAME_LIMIT) if role == "server" else max_frame_size
        )
        self._out = bytearray()
        self._held = bytearray()  # frames written before our open went out
        self.pending_events: list[Event] = []
        # Deliveries of ours the peer has settled, all sessions, ever (only grows).
        self.settled_by_peer = 0
        self._header_sent: str | None = None
        self._sasl_done = False
        self._open_wanted = False
        self._open_sent = False
        self._close_sent = False
        self._close_rcvd = False
        # Limits for what we send, until the peer's open says otherwise.
        self.send_max_frame_size = 0xFFFFFFFF
        self._remote_channel_max = 0xFFFF
        self.remote_idle_timeout: float | None = None
        self._local_sessions: dict[int, Session] = {}
        self._remote_sessions: dict[int, Session] = {}
        self._free_channels: list[int] = []
        self._next_channel = 0
        self._dispo_sessions: dict[Session, None] = {}
        # Idle-timeout bookkeeping (see tick()).
        self._last_tick: float | None = None
        self._last_recv = 0.0
        self._last_sent = 0.0
        self._rx_activity = False
        self._tx_activity = False

    def __repr__(self) -> str:
        return f"<Connection {self.role} {self.container_id!r} {self.state}>"

    # ------------------------------------------------------------------------ state

    @property
    def state(self) -> str:
        if self._phase is _DONE:
            return "failed" if self.error is not None else "closed"
        if self._close_sent or self._close_rcvd:
            return "closing"
        if self._open_sent and self.remote_open is not None:
            return "opened"
        if self._phase is _SASL:
            return "sasl"
        return "opening"

    @property
    def is_open(self) -> bool:
        """Both opens exchanged and no close yet."""
        return (
            self._open_sent
            and self.remote_open is not None
            and not self._close_sent
            and not self._close_rcvd
            and self._phase is not _DONE
        )

    @property
    def closed(self) -> bool:
        """Nothing more will be exchanged: flush data_to_send() and close the socket."""
        return self._phase is _DONE or (self._close_sent and self._close_rcvd)

    @property
    def trace(self) -> Tracer | None:
        """The per-frame trace hook (see ``Tracer``); may be set or cleared at any time."""
        return self._trace

    @trace.setter
    def trace(self, trace: Tracer | None) -> None:
        self._trace = trace
        if trace is None:
            self._trace_out.clear()
            self._trace_held.clear()

    @property
    def sessions(self) -> list[Session]:
        s = dict.fromkeys(self._local_sessions.values())
        s.update(dict.fromkeys(self._remote_sessions.values()))
        return list(s)

    @property
    def outgoing_unsettled(self) -> int:
        """Deliveries sent unsettled on any session and not settled since."""
        n = 0
        for session in self._local_sessions.values():
            n += len(session.out_unsettled)
        return n

    # ------------------------------------------------------------------------ I/O

    @property
    def wants_write(self) -> bool:
        """``data_to_send()`` would return bytes (frames or dispositions are queued)."""
        return bool(self._out) or bool(self._dispo_sessions)

    def data_to_send(self) -> bytes | bytearray:
        """Everything queued for the wire (may be b"").

        Not a copy: the buffer the frames were written to is handed over and the
        engine starts a new one, so the caller owns what it gets (the engine never
        writes to a returned buffer again) and may pass it on to a socket as is.
        It is a bytearray, so a caller that needs ``bytes`` (to hash or keep as a
        key) converts it."""
        if self._dispo_sessions:
            self._flush_dispositions()
        out = self._out
        if not out:
            return b""
        self._out = bytearray()
        self._tx_activity = True
        trace = self._trace
        if trace is not None and self._trace_out:
            records = self._trace_out
            self._trace_out = []
            for channel, what, size in records:
                trace(TRACE_SEND, channel, what, size)
        return out

    @property
    def buffered(self) -> int:
        """Bytes received and not yet processed (a partial header, SASL frame or frame)."""
        return len(self._pre) + self._reader.buffered

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Process received bytes (b"" = the peer closed its end) and return events.

        Only ``errors.AMQPError`` subclasses can escape, and only for bugs in the
        caller's use; protocol errors from the peer become a ConnectionError event.
        """
        if self._phase is _DONE:
            return self._take_events()
        if not data:
            self._on_eof()
            return self._take_events()
        self._rx_activity = True
        try:
            if self._phase is not _AMQP:
                data = self._receive_pre(data)
                if self._phase is not _AMQP or not data:
                    return self._take_events()
            self._receive_frames(data)
        except AMQPError as exc:
            # LocalProtocolError here is our own misuse, not the peer's fault.
            self._fail(exc.condition, exc.description,
                       protocol=not isinstance(exc, LocalProtocolError))  # fmt: skip
        return self._take_events()

    def _take_events(self) -> list[Event]:
        events = self.pending_events
        if events:
            self.pending_events = []
        return events

    # --------------------------------------------------------------- idle timeouts

    def tick(self, now: float) -> list[Event]:
        """Idle-timeout housekeeping; call at ``next_deadline(now)`` (and, for exact
        accounting, after each receive/send). Queues an empty frame when the peer needs
        a heartbeat; fails the connection when the peer was silent for our idle timeout."""
        if self._last_tick is None:
            self._last_recv = self._last_sent = now
        else:
            if self._rx_activity:
                self._last_recv = now
            if self._tx_activity:
                # The bytes went out at some point since the previous tick; assume the
                # earliest, so the heartbeat is never late.
                self._last_sent = self._last_tick
        self._rx_activity = self._tx_activity = False
        self._last_tick = now
        if self._phase is _DONE or (self._close_sent and self._close_rcvd):  # closed
            return self._take_events()
        if self.idle_timeout and self._open_sent and now - self._last_recv >= self.idle_timeout:
            self._fail(C.RESOURCE_LIMIT_EXCEEDED, "local-idle-timeout expired")
            return self._take_events()
        remote = self.remote_idle_timeout
        if remote and self._open_sent and not self._close_sent:
            if now - self._last_sent >= remote / 2:
                self._out += _EMPTY_FRAME
                if self._trace is not None:
                    self._trace_out.append((0, None, 0))
                self._last_sent = now
                self._tx_activity = False
        return self._take_events()

    def next_deadline(self, now: float) -> float | None:
        """When tick() must be called next (None: no idle timeout in force)."""
        if self._phase is _DONE or self.closed or not self._open_sent:
            return None
        deadlines = []
        last_recv = now if self._rx_activity else self._last_recv
        last_sent = (self._last_tick or now) if self._tx_activity else self._last_sent
        if self._last_tick is None:
            last_recv = last_sent = now
        if self.idle_timeout:
            deadlines.append(last_recv + self.idle_timeout)
        if self.remote_idle_timeout and not self._close_sent:
            deadlines.append(last_sent + self.remote_idle_timeout / 2)
        return min(deadlines) if deadlines else None

    # -------------------------------------------------------------------- public API

    def open(self) -> None:
        """Start the connection (client: header, SASL, open) or send our open (server)."""
        if self._open_wanted or self._phase is _DONE:
            return
        self._open_wanted = True
        if self.role == "client" and self._header_sent is None:
            if self.sasl is not None:
                self._header_sent = HEADER_SASL
                self._write_header(SASL_HEADER)
                self._phase = _HEADER
                return
            self._send_amqp_header()
            return
        if self._header_sent == HEADER_AMQP:
            self._send_open()

    def close(self, error: Error | None = None) -> None:
        """Close the connection (answers the peer's close when it closed first)."""
        if self._close_sent or self._phase is _DONE:
            return
        if self._header_sent != HEADER_AMQP:
            # Still negotiating headers or SASL: there is no AMQP connection to close.
            self._phase = _DONE
            return
        if not self._open_sent:
            self._open_wanted = True
            self._send_open()
        self._write_raw_performative(Close(error))
        self._close_sent = True
        if self._close_rcvd:
            self._phase = _DONE

    def begin(
        self,
        *,
        incoming_window: int = 2048,
        outgoing_window: int = MAX_WINDOW,
        handle_max: int = 0xFFFFFFFF,
        auto_flow: bool = True,
        offered_capabilities: Any = None,
        desired_capabilities: Any = None,
        properties: dict[Any, Any] | None = None,
    ) -> Session:
        """Begin a session. ``incoming_window`` is in transfer frames; with ``auto_flow``
        the engine sends a session flow restoring it whenever half of it is used,
        otherwise the application calls ``session.flow()`` (and a peer that sends
        beyond the window is a protocol error)."""
        if not self.can_send():
            raise LocalProtocolError(f"begin() on a connection in state {self.state}")
        if not 1 <= incoming_window <= MAX_WINDOW:
            raise LocalProtocolError(f"incoming_window must be in 1..{MAX_WINDOW}")
        session = Session(
            self,
            state=SessionState.BEGIN_SENT,
            channel=None,
            remote_channel=None,
            incoming_window=incoming_window,
            outgoing_window=outgoing_window,
            handle_max=handle_max,
            auto_flow=auto_flow,
        )
        self.map_local_session(session)
        session.send_begin(offered_capabilities, desired_capabilities, properties)
        return session

    def disposition(
        self, deliveries: Iterable[Delivery] | Delivery, settled: bool = False, state: Any = None
    ) -> None:
        """Update deliveries (ours or the peer's) with an outcome and/or settle them.

        Dispositions are queued and coalesced into first..last ranges when written.
        Deliveries already settled locally are skipped; settling a delivery the peer
        already settled sends nothing.
        """
        if isinstance(deliveries, Delivery):
            deliveries = (deliveries,)
        for d in deliveries:
            d.link.session.queue_disposition(d, settled, state)

    # ------------------------------------------------------------- writing helpers
    # (The public ones here and in channel bookkeeping are what sessions call:
    # `session.SessionConnection`. They are the engine's, not an application's.)

    def traced(self, channel: int | None, what: Any, payload_len: int) -> None:
        """Note a frame written to the output (only called while tracing)."""
        (self._trace_out if self._open_sent else self._trace_held).append(
            (channel, what, payload_len)
        )

    def _write_header(self, header: bytes) -> None:
        self._out += header
        if self._trace is not None:
            self._trace_out.append((None, header, 0))

    def can_send(self) -> bool:
        return (
            self._open_wanted
            and not self._close_sent
            and not self._close_rcvd
            and self._phase is not _DONE
        )

    def begin_write(self) -> bytearray:
        """The buffer to append a frame to (after flushing queued dispositions)."""
        if self._dispo_sessions:
            self._flush_dispositions()
        return self._out if self._open_sent else self._held

    def write_frame(self, frame: bytes) -> None:
        self.begin_write().extend(frame)

    def write_performative(self, performative: Performative, channel: int | None) -> None:
        out = self.begin_write()
        start = len(out)
        encode_frame_into(out, performative, channel or 0)
        size = len(out) - start
        if size > self.send_max_frame_size:
            del out[start:]
            self._fail(
                C.FRAME_SIZE_TOO_SMALL,
                f"{type(performative).__name__} of {size} bytes does not fit the peer's "
                f"max-frame-size {self.send_max_frame_size}",
            )
        elif self._trace is not None:
            self.traced(channel or 0, performative, 0)

    def _write_raw_performative(self, performative: Performative, frame_type: int = FRAME_AMQP) -> None:
        if self._dispo_sessions:
            self._flush_dispositions()
        encode_frame_into(self._out, performative, 0, b"", frame_type)
        if self._trace is not None:
            what = blank_sasl_secrets(performative) if frame_type == FRAME_SASL else performative
            self._trace_out.append((0, what, 0))

    def dispositions_pending(self, session: Session) -> None:
        self._dispo_sessions[session] = None

    def _flush_dispositions(self) -> None:
        sessions = self._dispo_sessions
        self._dispo_sessions = {}
        out = self._out if self._open_sent else self._held
        for session in sessions:
            if session.pending_dispositions:
                out += session.flush_dispositions()

    def _send_amqp_header(self) -> None:
        self._header_sent = HEADER_AMQP
        self._write_header(AMQP_HEADER)
        if self._open_wanted:
            self._send_open()

    def _send_open(self) -> None:
        if self._open_sent:
            return
        idle_ms = None
        if self.idle_timeout:
            idle_ms = min(int(self.idle_timeout * 1000), 0xFFFFFFFF)
        self._write_raw_performative(
            Open(
                container_id=self.container_id,
                hostname=self.hostname,
                max_frame_size=self.max_frame_size,
                channel_max=self.channel_max,
                idle_time_out=idle_ms,
                offered_capabilities=self.offered_capabilities,
                desired_capabilities=self.desired_capabilities,
                properties=self.properties,
            )
        )
        self._open_sent = True
        if self._held:
            self._out += self._held
            self._held = bytearray()
        if self._trace_held:
            self._trace_out += self._trace_held
            self._trace_held = []

    # -------------------------------------------------------------- failure paths

    def _fail(self, condition: str, description: str, *, protocol: bool = False) -> None:
        """Close the connection because of a protocol error and report it
        (``protocol``: the peer's, see `ConnectionError`)."""
        if self._phase is _DONE:
            return
        error = Error(Symbol(condition), description)
        if self._header_sent == HEADER_AMQP and not self._close_sent:
            if not self._open_sent:
                self._open_wanted = True
                self._send_open()
            self._write_raw_performative(Close(error))
            self._close_sent = True
        self._phase = _DONE
        self.error = error
        self.pending_events.append(ConnectionError(error, protocol))

    def _on_eof(self) -> None:
        if self._close_rcvd:
            self._phase = _DONE
            return
        self._fail(C.FRAMING_ERROR, "connection aborted: the peer closed the transport without a close")

    # -------------------------------------------------- headers and SASL (pre-AMQP)

    def _receive_pre(self, data: bytes | bytearray | memoryview) -> bytes:
        """Consume protocol headers and SASL frames; return bytes for the AMQP phase."""
        pre = self._pre
        pre += data
        while self._phase is _HEADER or self._phase is _SASL:
            if self._phase is _HEADER:
                try:
                    kind, rest = read_protocol_header(pre)
                except FramingError as exc:
                    self._header_mismatch(f"{exc.description}")
                    return b""
                if kind is None:
                    return b""
                if self._trace is not None:
                    self._trace(TRACE_RECV, None, bytes(pre[:8]), 0)
                del pre[:8]
                self._on_header(kind)
            else:
                if not self._receive_sasl_frame(pre):
                    return b""
        if self._phase is _AMQP:
            rest = bytes(pre)
            pre.clear()
            return rest
        return b""

    def _receive_sasl_frame(self, pre: bytearray) -> bool:
        """Handle one complete SASL frame from ``pre``; False: wait for more bytes."""
        if len(pre) < 8:
            return False
        size = int.from_bytes(pre[:4], "big")
        limit = self._sasl_frame_limit
        if size > limit or size < 8:
            description = f"SASL frame of {size} bytes (limit {limit})"
            sasl = self.sasl
            if isinstance(sasl, SaslServer) and self._phase is _SASL:
                # Refused from its header, not read whole: a SASL outcome, then closed.
                pre.clear()
                self._answer_sasl(sasl.on_malformed(description))
                return True
            raise FramingError(description)
        if len(pre) < size:
            return False
        raw = bytes(pre[:size])
        del pre[:size]
        reader = FrameReader(self.max_frame_size)
        reader.feed(raw)
        if raw[5] != FRAME_SASL:  # the frame type byte
            frame = reader.next_frame()
            if frame is None or frame.performative is None:
                return True  # an empty frame is allowed anywhere
            raise FramingError(f"{type(frame.performative).__name__} frame during SASL negotiation")
        try:
            frame = reader.next_frame()
            if self._trace is not None and frame is not None:
                self._trace(TRACE_RECV, frame.channel, blank_sasl_secrets(frame.performative), 0)
            if frame is None or frame.performative is None:
                return True
            self._on_sasl_frame(frame.performative)
        except AMQPError as exc:
            sasl = self.sasl
            if not isinstance(sasl, SaslServer) or self._phase is not _SASL:
                raise
            # A client's unreadable or out-of-turn SASL frame still gets a SASL outcome.
            self._answer_sasl(sasl.on_malformed(exc.description))
        return True

    def _header_mismatch(self, reason: str) -> None:
        """Answer a header we do not accept with ours, then give up (spec 2.2)."""
        if self._header_sent is None:
            want_sasl = self.sasl is not None and not self._sasl_done
            self._header_sent = HEADER_SASL if want_sasl else HEADER_AMQP
            self._write_header(SASL_HEADER if want_sasl else AMQP_HEADER)
        self._phase = _DONE
        error = Error(Symbol(C.FRAMING_ERROR), reason)
        self.error = error
        self.pending_events.append(ConnectionError(error, True))

    def _on_header(self, kind: str) -> None:
        if self.role == "server":
            self._server_header(kind)
        else:
            self._client_header(kind)

    def _server_header(self, kind: str) -> None:
        sasl = self.sasl
        if kind == HEADER_SASL:
            if isinstance(sasl, SaslServer) and not self._sasl_done:
                self._header_sent = HEADER_SASL
                self._write_header(SASL_HEADER)
                self._write_raw_performative(sasl.mechanisms_frame(), FRAME_SASL)
                self._phase = _SASL
                return
            self._header_mismatch("SASL is not offered on this listener")
            return
        if kind == HEADER_AMQP:
            if isinstance(sasl, SaslServer) and sasl.required and not self._sasl_done:
                self._header_mismatch("SASL authentication is required")
                return
            self._phase = _AMQP
            self._send_amqp_header()
            return
        self._header_mismatch(f"protocol header {kind!r} is not supported")

    def _client_header(self, kind: str) -> None:
        if self._header_sent is None:
            self._header_mismatch("received a protocol header before open()")
            return
        if kind != self._header_sent:
            self._header_mismatch(
                f"the server answered the {self._header_sent.upper()} header with {kind.upper()}"
            )
            return
        self._phase = _SASL if kind == HEADER_SASL else _AMQP

    def _on_sasl_frame(self, perf: Performative) -> None:
        sasl = self.sasl
        if isinstance(sasl, SaslServer):
            if type(perf) is SaslInit:
                decision = sasl.on_init(perf)
            elif type(perf) is SaslResponse:
                decision = sasl.on_response(perf)
            else:
                raise FramingError(f"unexpected {type(perf).__name__} from a SASL client")
            self._answer_sasl(decision)
            return
        assert isinstance(sasl, SaslClient)
        if type(perf) is SaslMechanisms:
            self._write_raw_performative(sasl.on_mechanisms(perf, self.hostname), FRAME_SASL)
        elif type(perf) is SaslChallenge:
            self._write_raw_performative(sasl.on_challenge(perf), FRAME_SASL)
        elif type(perf) is SaslOutcome:
            if perf.code != SASL_OK:
                self._sasl_failed(f"SASL authentication failed (outcome code {perf.code})")
                return
            self._sasl_done = True
            self.authenticated = sasl.authenticated(self.hostname)
            self.pending_events.append(self.authenticated)
            self._phase = _HEADER
            # Pipeline the AMQP header and our open; the server answers with its header.
            self._send_amqp_header()
        else:
            raise FramingError(f"unexpected {type(perf).__name__} from a SASL server")

    def _answer_sasl(self, decision: SaslDecision) -> None:
        """Server side: send the outcome; on ok the client's AMQP header comes next."""
        self._write_raw_performative(decision.outcome, FRAME_SASL)
        if decision.outcome.code != SASL_OK or decision.authenticated is None:
            self._sasl_failed(f"SASL {decision.reason}")
            return
        self._sasl_done = True
        self.authenticated = decision.authenticated
        self.pending_events.append(decision.authenticated)
        self._phase = _HEADER

    def _sasl_failed(self, description: str) -> None:
        self._phase = _DONE
        error = Error(Symbol(C.UNAUTHORIZED_ACCESS), description)
        self.error = error
        self.pending_events.append(ConnectionError(error))

    # ------------------------------------------------------------------ AMQP frames

    def _receive_frames(self, data: bytes | bytearray | memoryview) -> None:
        reader = self._reader
        reader.feed(data)
        sessions = self._remote_sessions
        trace = self._trace
        read_frame = reader.read_frame
        while self._phase is _AMQP:
            frame = read_frame()
            if frame is None:
                return
            frame_type, channel, perf, payload = frame
            if type(perf) is tuple:
                # A plain transfer (see FrameReader.read_frame): the usual message.
                session = sessions.get(channel)
                if session is not None and trace is None and not self._close_sent:
                    session.on_plain_transfer(perf, payload)
                    continue
                perf = plain_transfer(perf)
            if trace is not None:
                trace(TRACE_RECV, channel, perf, payload.nbytes)
            if perf is None:
                continue  # keep-alive
            if frame_type != FRAME_AMQP:
                raise FramingError(f"SASL frame {type(perf).__name__} after SASL negotiation")
            if type(perf) is Transfer:
                session = sessions.get(channel)
                if session is None or self._close_sent:
                    self._no_session(channel, perf)
                    continue
                session.on_transfer(perf, payload)
                continue
            if self.remote_open is None:
                if type(perf) is not Open:
                    raise FramingError(f"expected open, got {type(perf).__name__}")
                self._on_open(perf)
                continue
            if self._close_rcvd:
                continue  # nothing may follow a close
            handler = _HANDLERS.get(type(perf))
            if handler is None:
                raise FramingError(f"unexpected {type(perf).__name__} on an open connection")
            handler(self, channel, perf)

    def _no_session(self, channel: int, perf: Performative) -> None:
        if self._close_sent:
            return  # we closed: discard until the peer's close
        raise FramingError(f"{type(perf).__name__} on channel {channel}, which has no session")

    def _on_open(self, open_: Open) -> None:
        self.remote_open = open_
        mfs = open_.max_frame_size
        if mfs < MIN_MAX_FRAME_SIZE:
            raise AMQPError(
                f"peer max-frame-size {mfs} is below the minimum {MIN_MAX_FRAME_SIZE}",
                C.INVALID_FIELD,
            )
        self.send_max_frame_size = min(mfs, self.max_frame_size)
        self._reader.max_frame_size = self.max_frame_size  # as our open says, from now on
        self._remote_channel_max = open_.channel_max
        if open_.idle_time_out:
            self.remote_idle_timeout = open_.idle_time_out / 1000.0
        self.pending_events.append(RemoteOpen(open_))

    def _on_close(self, channel: int, close: Close) -> None:
        self._close_rcvd = True
        self.remote_close_error = close.error
        self.pending_events.append(RemoteClose(close.error))
        if self._close_sent:
            self._phase = _DONE

    def _on_begin(self, channel: int, begin: Begin) -> None:
        if self._close_sent:
            return
        if channel in self._remote_sessions:
            raise AMQPError(f"begin on channel {channel}, which already has a session", C.NOT_ALLOWED)
        if channel > self.channel_max:
            raise AMQPError(
                f"begin on channel {channel} above our channel-max {self.channel_max}",
                C.NOT_ALLOWED,
            )
        mapped = False
        if begin.remote_channel is not None:
            session = self._local_sessions.get(begin.remote_channel)
            if session is None or session.remote_channel is not None:
                raise AMQPError(
                    f"begin answers channel {begin.remote_channel}, where we began no session",
                    C.NOT_ALLOWED,
                )
            if session.state is SessionState.BEGIN_SENT:
                session.state = SessionState.MAPPED
                mapped = True
            # else we ended it before the answer came: the peer's end will follow
        else:
            session = Session(
                self,
                state=SessionState.BEGIN_RCVD,
                channel=None,
                remote_channel=channel,
                incoming_window=2048,
                outgoing_window=MAX_WINDOW,
                handle_max=0xFFFFFFFF,
            )
        session.remote_channel = channel
        self._remote_sessions[channel] = session
        session.on_remote_begin(begin)
        if mapped:
            session.on_mapped()  # flows asked for while the begin was in flight
        self.pending_events.append(RemoteBegin(session, begin))
        if session.blocked:
            session.pump_all()

    def _session_for(self, channel: int, perf: Performative) -> Session | None:
        session = self._remote_sessions.get(channel)
        if session is None:
            self._no_session(channel, perf)
            return None
        if self._close_sent:
            return None
        return session

    def _on_attach(self, channel: int, attach: Attach) -> None:
        session = self._session_for(channel, attach)
        if session is not None:
            session.on_attach(attach)

    def _on_flow(self, channel: int, flow: Flow) -> None:
        session = self._session_for(channel, flow)
        if session is not None:
            session.on_flow(flow)

    def _on_disposition(self, channel: int, disp: Disposition) -> None:
        session = self._session_for(channel, disp)
        if session is not None:
            session.on_disposition(disp)

    def _on_detach(self, channel: int, detach: Detach) -> None:
        session = self._session_for(channel, detach)
        if session is not None:
            session.on_detach(detach)

    def _on_end(self, channel: int, end: End) -> None:
        session = self._session_for(channel, end)
        if session is None:
            return
        del self._remote_sessions[channel]
        session.on_end(end)
        self.pending_events.append(RemoteEnd(session, end.error))

    # ----------------------------------------------------------- channel bookkeeping

    def map_local_session(self, session: Session) -> None:
        if self._free_channels:
            channel = heapq.heappop(self._free_channels)
        else:
            channel = self._next_channel
            if channel > min(self.channel_max, self._remote_channel_max):
                raise LocalProtocolError("no free channel on this connection (channel-max reached)")
            self._next_channel = channel + 1
        session.channel = channel
        self._local_sessions[channel] = session

    def unmap_session(self, session: Session) -> None:
        channel = session.channel
        if channel is not None and self._local_sessions.get(channel) is session:
            del self._local_sessions[channel]
            heapq.heappush(self._free_channels, channel)
        if session.remote_channel is not None and (
            self._remote_sessions.get(session.remote_channel) is session
        ):
            del self._remote_sessions[session.remote_channel]
        self._dispo_sessions.pop(session, None)


_HANDLERS = {
    Close: Connection._on_close,
    Begin: Connection._on_begin,
    Attach: Connection._on_attach,
    Flow: Connection._on_flow,
    Disposition: Connection._on_disposition,
    Detach: Connection._on_detach,
    End: Connection._on_end,
}


def blank_sasl_secrets(performative: Any) -> Any:
    """The SASL frame as the trace may show it: a PLAIN sasl-init keeps authzid and
    user name but not the password; every other SASL response, challenge or outcome
    data becomes zero bytes of the same length. Other frames are returned as they are."""
    t = type(performative)
    if t is SaslInit:
        data = performative.initial_response
        if not data:
            return performative
        if str(performative.mechanism).upper() == "PLAIN":
            parts = bytes(data).split(b"\x00")
            blanked = b"\x00".join((*parts[:2], b"")) if len(parts) == 3 else bytes(len(data))
        else:
            blanked = bytes(len(data))
        return dataclasses.replace(performative, initial_response=blanked)
    if t is SaslResponse and performative.response:
        return dataclasses.replace(performative, response=bytes(len(performative.response)))
    if t is SaslChallenge and performative.challenge:
        return dataclasses.replace(performative, challenge=bytes(len(performative.challenge)))
    if t is SaslOutcome and performative.additional_data:
        return dataclasses.replace(
            performative, additional_data=bytes(len(performative.additional_data))
        )
    return performative
