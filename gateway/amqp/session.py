"""Sessions (spec 2.5): channels, transfer windows, handles, delivery ids.

A Session maps link handles both ways, numbers outgoing deliveries, tracks the
unsettled deliveries of each direction for dispositions, and writes every
session-scoped frame through its Connection. Window arithmetic lives in
``flow.py``; the per-frame work on the transfer path is constant time.

Direction: above `link`, below `connection`; what a session calls on its
connection is declared here (`SessionConnection`) instead of importing it.
"""

from __future__ import annotations

import heapq
from enum import Enum
from typing import Any, Protocol

from .constants import ErrorCondition as C
from .errors import LocalProtocolError, ProtocolError
from .events import (
    DispositionReceived,
    Event,
    LinkError,
    RemoteAttach,
    RemoteDetach,
    RemoteFlow,
    TransferReceived,
)
from .flow import MAX_WINDOW, SEQ_MASK, SenderCredit, SessionWindows, WindowViolation, seq_diff
from .framing import (
    PlainTransfer,
    encode_disposition,
    encode_flow,
    encode_plain_transfer_into,
    encode_transfer_frame_into,
    plain_transfer,
)
from .link import RECEIVER, SENDER, Delivery, Link, LinkState, role_of
from .performatives import Attach, Begin, Detach, Disposition, End, Error, Flow, Transfer
from .types import Symbol

__all__ = ["Session", "SessionState"]

class SessionConnection(Protocol):
    """What a session calls on its connection (`connection.Connection`): the
    engine's own interface between the two, not an application's."""

    pending_events: list[Event]  # events for the next receive_data / tick
    send_max_frame_size: int  # the peer's max-frame-size
    settled_by_peer: int

    @property
    def trace(self) -> Any: ...  # the per-frame trace hook, or None
    def map_local_session(self, session: Session) -> None: ...
    def unmap_session(self, session: Session) -> None: ...
    def can_send(self) -> bool: ...
    def begin_write(self) -> bytearray: ...
    def write_frame(self, frame: bytes) -> None: ...
    def write_performative(self, performative: Any, channel: int | None) -> None: ...
    def traced(self, channel: int | None, what: Any, payload_len: int) -> None: ...
    def dispositions_pending(self, session: Session) -> None: ...


class SessionState(Enum):
    BEGIN_SENT = "begin-sent"  # we began, waiting for the peer's begin
    BEGIN_RCVD = "begin-rcvd"  # the peer began, waiting for answer_begin()
    MAPPED = "mapped"
    END_SENT = "end-sent"
    END_RCVD = "end-rcvd"  # the peer ended, waiting for end()
    UNMAPPED = "unmapped"


# Upper bound of a transfer performative without delivery tag and state:
# frame header 8 + descriptor 3 + list32 header 9 + handle 5 + delivery-id 5 + tag header 2
# + message-format 5 + settled 1 + more 1 + rcv-settle-mode 1 + state 1 + 3 booleans.
_TRANSFER_OVERHEAD = 8 + 3 + 9 + 5 + 5 + 2 + 5 + 1 + 1 + 1 + 1 + 3


class Session:
    """One session on a Connection. Create with ``Connection.begin()`` or get one from
    a ``RemoteBegin`` event and answer it with ``answer_begin()``."""

    def __init__(
        self,
        connection: SessionConnection,
        *,
        state: SessionState,
        channel: int | None,
        remote_channel: int | None,
        incoming_window: int,
        outgoing_window: int,
        handle_max: int,
        auto_flow: bool = True,
    ) -> None:
        self.connection = connection
        self.state = state
        self.channel = channel
        self.remote_channel = remote_channel
        self.windows = SessionWindows(incoming_window=incoming_window, outgoing_window=outgoing_window)
        self.handle_max = handle_max
        #: restore the incoming window automatically (else call ``flow()``)
        self.auto_flow = auto_flow
        self.remote_handle_max = 0xFFFFFFFF
        self.remote_begin: Begin | None = None
        self.local_begin: Begin | None = None
        self.remote_end_error: Error | None = None
        self.context: Any = None
        self.next_delivery_id = 0
        self._links: dict[int, Link] = {}  # by our handle
        self._remote_links: dict[int, Link] = {}  # by the peer's handle
        self._attaching: dict[tuple[str, bool], Link] = {}  # (name, our role) awaiting peer attach
        self._free_handles: list[int] = []
        self._next_handle = 0
        # Unsettled deliveries by delivery-id: ones we sent, ones we received.
        self.out_unsettled: dict[int, Delivery] = {}
        self.in_unsettled: dict[int, Delivery] = {}
        self.blocked: dict[Link, None] = {}  # links with queued transfers, in order
        # Dispositions to send, as runs: [role, first, last, settled, state].
        self.pending_dispositions: list[list[Any]] = []
        # Flows asked for before the session was mapped (a flow's next-incoming-id
        # needs the peer's begin): link (None: the session) -> (drain, echo, properties).
        self._held_flows: dict[Link | None, tuple[bool, bool, Any]] = {}

    def __repr__(self) -> str:
        return f"<Session channel={self.channel} remote={self.remote_channel} {self.state.value}>"

    # ------------------------------------------------------------------------ public API

    @property
    def links(self) -> list[Link]:
        links = dict.fromkeys(self._links.values())
        links.update(dict.fromkeys(self._remote_links.values()))
        return list(links)

    @property
    def is_open(self) -> bool:
        return self.state is SessionState.MAPPED

    def answer_begin(
        self,
        *,
        incoming_window: int | None = None,
        outgoing_window: int | None = None,
        handle_max: int | None = None,
        auto_flow: bool = True,
        offered_capabilities: Any = None,
        desired_capabilities: Any = None,
        properties: dict[Any, Any] | None = None,
    ) -> None:
        """Accept a session the peer began. See ``Connection.begin`` for the options.
        A no-op when the peer already ended it (``end()`` answers both then)."""
        if self.state is not SessionState.BEGIN_RCVD:
            if self.state is SessionState.END_RCVD and self.channel is None:
                return
            raise LocalProtocolError(f"answer_begin on a session in state {self.state.value}")
        w = self.windows
        if incoming_window is not None:
            if not 1 <= incoming_window <= MAX_WINDOW:
                raise LocalProtocolError(f"incoming_window must be in 1..{MAX_WINDOW}")
            w.incoming_window = w.max_incoming_window = incoming_window
        if outgoing_window is not None:
            w.outgoing_window = outgoing_window
        if handle_max is not None:
            self.handle_max = handle_max
        self.auto_flow = auto_flow
        self._map_and_begin(offered_capabilities, desired_capabilities, properties)
        self.state = SessionState.MAPPED
        self.on_mapped()

    def _map_and_begin(self, *args: Any) -> None:
        self.connection.map_local_session(self)
        self.send_begin(*args)

    def flow(self, incoming_window: int | None = None, *, echo: bool = False) -> None:
        """Send a session flow, first restoring our incoming window to its maximum
        (or setting a new maximum). Needed only with ``auto_flow=False``. Before the
        session is mapped the flow is held and sent once it is."""
        w = self.windows
        if incoming_window is not None:
            if not 1 <= incoming_window <= MAX_WINDOW:
                raise LocalProtocolError(f"incoming_window must be in 1..{MAX_WINDOW}")
            w.max_incoming_window = incoming_window
        w.replenish()
        self._send_session_flow(echo)

    def end(self, error: Error | None = None) -> None:
        """End the session (answers the peer's end when it ended first)."""
        if self.state in (SessionState.END_SENT, SessionState.UNMAPPED):
            return
        conn = self.connection
        if self.channel is None and conn.can_send():
            # The peer's begin was never answered; a begin must precede our end.
            if self.state is SessionState.BEGIN_RCVD:
                self.answer_begin()
            else:
                self._map_and_begin()
        if conn.can_send() and self.channel is not None:
            conn.write_performative(End(error), self.channel)
        for link in self.links:
            self._forget_link_deliveries(link)
            link.state = LinkState.DETACHED
            link.pending_transfers.clear()
        self.blocked.clear()
        self.pending_dispositions.clear()
        self._held_flows.clear()
        if self.state is SessionState.END_RCVD:
            self.state = SessionState.UNMAPPED
            conn.unmap_session(self)
        else:
            self.state = SessionState.END_SENT

    def attach(
        self,
        name: str,
        role: bool | str,
        source: Any = None,
        target: Any = None,
        *,
        snd_settle_mode: int = 2,
        rcv_settle_mode: int = 0,
        unsettled: dict[Any, Any] | None = None,
        incomplete_unsettled: bool = False,
        initial_delivery_count: int | None = None,
        max_message_size: int | None = None,
        offered_capabilities: Any = None,
        desired_capabilities: Any = None,
        properties: dict[Any, Any] | None = None,
        extra: tuple[Any, ...] = (),
    ) -> Link:
        """Attach a link; everything is put in the attach as given (a router passes
        the device's values through). ``extra`` holds fields beyond the ones the spec
        defines, appended after them (a router passes the device attach's ``_extra``).
        A sender's initial-delivery-count defaults to 0."""
        if self.state not in (SessionState.MAPPED, SessionState.BEGIN_SENT):
            raise LocalProtocolError(f"attach on a session in state {self.state.value}")
        r = role_of(role)
        if (name, r) in self._attaching:
            raise LocalProtocolError(f"link {name!r} is already being attached")
        handle = self._alloc_handle()
        link = Link(self, name, r, handle=handle, state=LinkState.ATTACH_SENT)
        if r == SENDER:
            if initial_delivery_count is None:
                initial_delivery_count = 0
            link.sender_credit = SenderCredit(initial_delivery_count)
        elif max_message_size:
            link.max_message_size = min(max_message_size, link.max_message_size)
        attach = Attach(
            name=name,
            handle=handle,
            role=r,
            snd_settle_mode=snd_settle_mode,
            rcv_settle_mode=rcv_settle_mode,
            source=source,
            target=target,
            unsettled=unsettled,
            incomplete_unsettled=incomplete_unsettled,
            initial_delivery_count=initial_delivery_count,
            max_message_size=max_message_size,
            offered_capabilities=offered_capabilities,
            desired_capabilities=desired_capabilities,
            properties=properties,
            _extra=tuple(extra),
        )
        link.local_attach = attach
        self._links[handle] = link
        self._attaching[(name, r)] = link
        self.connection.write_performative(attach, self.channel)
        return link

    # From here on, the public methods are what the connection and the links call
    # (`link.LinkSession`, and the connection's frame dispatch): the engine's own,
    # not an application's.

    # ------------------------------------------------------------------ handle bookkeeping

    def _alloc_handle(self) -> int:
        if self._free_handles:
            return heapq.heappop(self._free_handles)
        h = self._next_handle
        if h > min(self.handle_max, self.remote_handle_max):
            raise LocalProtocolError("no free link handle on this session (handle-max reached)")
        self._next_handle = h + 1
        return h

    def _release_link(self, link: Link) -> None:
        """Both ends have detached: drop the link and recycle its handle."""
        link.state = LinkState.DETACHED
        handle = link.handle
        if handle is not None:
            owner = self._links.get(handle)
            if owner is link:
                del self._links[handle]
                heapq.heappush(self._free_handles, handle)
            elif owner is None and link.local_attach is None:
                heapq.heappush(self._free_handles, handle)  # reserved, never answered
        self._attaching.pop((link.name, link.role), None)
        self.blocked.pop(link, None)
        self._held_flows.pop(link, None)
        self._forget_link_deliveries(link)

    def _forget_link_deliveries(self, link: Link) -> None:
        link.pending_transfers.clear()
        link.queued_bytes = 0
        link.partial = None
        link.partial_buf = None
        if link.unsettled_count:
            for table in (self.out_unsettled, self.in_unsettled):
                for did in [k for k, d in table.items() if d.link is link]:
                    del table[did]
            link.unsettled_count = 0

    # -------------------------------------------------------------------- frames we send

    def send_begin(
        self, offered_capabilities: Any = None, desired_capabilities: Any = None,
        properties: dict[Any, Any] | None = None,
    ) -> None:  # fmt: skip
        w = self.windows
        begin = Begin(
            remote_channel=self.remote_channel,
            next_outgoing_id=w.next_outgoing_id,
            incoming_window=w.incoming_window,
            outgoing_window=w.outgoing_window,
            handle_max=self.handle_max,
            offered_capabilities=offered_capabilities,
            desired_capabilities=desired_capabilities,
            properties=properties,
        )
        self.local_begin = begin
        self.connection.write_performative(begin, self.channel)

    def _flow_fields(self, link: Link | None, drain: bool, echo: bool,
                     properties: dict[Any, Any] | None) -> tuple[Any, ...]:  # fmt: skip
        """The flow's fields in spec order (next-incoming-id .. properties)."""
        w = self.windows
        if link is None:
            return (w.next_incoming_id, w.incoming_window, w.next_outgoing_id,
                    w.outgoing_window, None, None, None, None, False, echo, properties)  # fmt: skip
        if link.sender_credit is not None:
            s = link.sender_credit
            delivery_count: int | None = s.delivery_count
            credit, available = s.credit, s.available
            drain = drain or s.drain
        else:
            r = link.receiver_credit
            assert r is not None
            delivery_count = r.delivery_count if r.started else None
            credit, available = r.credit, None
        return (w.next_incoming_id, w.incoming_window, w.next_outgoing_id, w.outgoing_window,
                link.handle, delivery_count, credit, available, drain, echo, properties)  # fmt: skip

    def _write_flow(self, link: Link | None, drain: bool = False, echo: bool = False,
                    properties: dict[Any, Any] | None = None) -> None:  # fmt: skip
        conn = self.connection
        assert self.channel is not None
        fields = self._flow_fields(link, drain, echo, properties)
        conn.write_frame(encode_flow(self.channel, *fields))
        if conn.trace is not None:
            conn.traced(self.channel, Flow(*fields), 0)

    def _send_session_flow(self, echo: bool = False) -> None:
        conn = self.connection
        if not conn.can_send():
            return
        if self.state is SessionState.MAPPED:
            self._write_flow(None, echo=echo)
        elif self.state is SessionState.BEGIN_SENT or self.state is SessionState.BEGIN_RCVD:
            self._hold_flow(None, False, echo, None)

    def send_link_flow(self, link: Link, *, drain: bool = False, echo: bool = False,
                        properties: dict[Any, Any] | None = None) -> None:  # fmt: skip
        conn = self.connection
        if not conn.can_send():
            return
        if self.state is SessionState.MAPPED:
            self._write_flow(link, drain, echo, properties)
        elif self.state is SessionState.BEGIN_SENT:
            self._hold_flow(link, drain, echo, properties)

    def _hold_flow(self, link: Link | None, drain: bool, echo: bool, properties: Any) -> None:
        # A flow carries the link's state when it is written, so held flows coalesce:
        # only the request bits (drain, echo) and the latest properties are kept.
        held = self._held_flows.get(link)
        if held is not None:
            drain = drain or held[0]
            echo = echo or held[1]
            if properties is None:
                properties = held[2]
        self._held_flows[link] = (drain, echo, properties)

    def on_mapped(self) -> None:
        """The session is mapped both ways: send the flows held until now."""
        held = self._held_flows
        if not held:
            return
        self._held_flows = {}
        link_flows = False
        for link, (drain, echo, properties) in held.items():
            if link is not None and link.state in (LinkState.ATTACHED, LinkState.ATTACH_SENT):
                if link.receiver_credit is not None:
                    drain = link.receiver_credit.drain  # the latest grant decides
                self.send_link_flow(link, drain=drain, echo=echo, properties=properties)
                link_flows = True
        session_flow = held.get(None)
        if session_flow is not None and (session_flow[1] or not link_flows):
            self._send_session_flow(session_flow[1])

    def answer_link_attach(self, link: Link, attach: Attach) -> None:
        if self.state is not SessionState.MAPPED:
            raise LocalProtocolError(f"answer_attach on a session in state {self.state.value}")
        handle = link.handle  # reserved when the peer's attach arrived
        if handle is None:
            handle = link.handle = self._alloc_handle()
        if link.sender_credit is not None:
            if attach.initial_delivery_count is None:
                attach.initial_delivery_count = 0
            link.sender_credit.initial_delivery_count = attach.initial_delivery_count & SEQ_MASK
            link.sender_credit.delivery_count = link.sender_credit.initial_delivery_count
        elif attach.max_message_size:
            link.max_message_size = min(attach.max_message_size, link.max_message_size)
        attach.handle = handle
        link.local_attach = attach
        self._links[handle] = link
        link.state = LinkState.ATTACHED
        self.connection.write_performative(attach, self.channel)
        # A flow that came with the peer's attach may have granted credit already.
        if link.pending_transfers:
            self.pump_link(link)

    def detach_link(self, link: Link, error: Error | None, closed: bool) -> None:
        conn = self.connection
        # Our attach may have gone out before the peer's begin came back (BEGIN_SENT):
        # the detach can follow it the same way.
        if (
            (self.state is SessionState.MAPPED or self.state is SessionState.BEGIN_SENT)
            and conn.can_send()
            and link.local_attach is not None
        ):
            conn.write_performative(Detach(link.handle, closed, error), self.channel)
        if error is not None:
            link.local_detach_error = error
        link.pending_transfers.clear()
        link.queued_bytes = 0
        self.blocked.pop(link, None)
        self._held_flows.pop(link, None)
        if link.state is LinkState.DETACH_RCVD:
            self._release_link(link)
        else:
            link.state = LinkState.DETACH_SENT

    def send_abort(self, link: Link, delivery: Delivery) -> None:
        conn = self.connection
        if self.state is SessionState.MAPPED and conn.can_send() and link.handle is not None:
            self.windows.on_transfer_sent()
            encode_transfer_frame_into(
                conn.begin_write(), self.channel, link.handle, delivery.delivery_id, None,
                None, None, False, b"", aborted=True,
            )  # fmt: skip
            if conn.trace is not None:
                self._trace_transfer(link.handle, delivery.delivery_id, None, None, None, False,
                                     None, False, 0, aborted=True)  # fmt: skip
        if delivery.delivery_id is not None and self.out_unsettled.pop(delivery.delivery_id, None):
            link.unsettled_count -= 1

    # ------------------------------------------------------------------- outgoing transfers

    def pump_link(self, link: Link) -> None:
        """Send as much of ``link``'s queue as credit and the peer's window allow."""
        if self.state is not SessionState.MAPPED or link.state is not LinkState.ATTACHED:
            if link.pending_transfers:
                self.blocked[link] = None
            return
        conn = self.connection
        if not conn.can_send():
            return
        sender = link.sender_credit
        assert sender is not None
        queue = link.pending_transfers
        w = self.windows
        while queue:
            if w.remote_incoming_window <= 0:
                break
            p = queue[0]
            if p.offset == 0 and sender.credit <= 0:
                break
            if not self._send_pending(link, p):
                break
            queue.popleft()
            link.queued_bytes -= p.payload.nbytes
        if queue:
            self.blocked[link] = None
        else:
            self.blocked.pop(link, None)

    def send_now(self, link: Link, d: Delivery, payload: memoryview) -> bool:
        """Write a whole message with no delivery state in one frame right away, if
        nothing waits before it and credit, window and frame size allow (the relay's
        usual case); False: the caller queues it (``_pump_link`` then decides)."""
        if self.state is not SessionState.MAPPED:
            return False
        conn = self.connection
        sender = link.sender_credit
        w = self.windows
        if (
            sender is None
            or sender.credit <= 0
            or w.remote_incoming_window <= 0
            or not conn.can_send()
        ):
            return False
        tag = d.delivery_tag
        size = payload.nbytes
        if size + _TRANSFER_OVERHEAD + len(tag) > conn.send_max_frame_size:
            return False
        did = self.next_delivery_id
        self.next_delivery_id = (did + 1) & SEQ_MASK
        d.delivery_id = did
        sender.on_delivery_sent()
        settled = d.settled
        if not settled:
            self.out_unsettled[did] = d
            link.unsettled_count += 1
        w.on_transfer_sent()
        handle = link.handle
        encode_plain_transfer_into(
            conn.begin_write(), self.channel, handle, did, tag,  # type: ignore[arg-type]
            d.message_format, settled, payload,
        )  # fmt: skip
        if conn.trace is not None:
            self._trace_transfer(handle, did, tag, d.message_format, settled, False, None,
                                 False, size)  # fmt: skip
        return True

    def pump_all(self) -> None:
        if not self.blocked:
            return
        for link in list(self.blocked):
            if self.windows.remote_incoming_window <= 0:
                break
            self.pump_link(link)

    def _send_pending(self, link: Link, p: Any) -> bool:
        """Write frames of one delivery; True when its last frame is out."""
        conn = self.connection
        w = self.windows
        d = p.delivery
        payload = p.payload
        size = payload.nbytes
        max_frame = conn.send_max_frame_size
        channel = self.channel
        handle = link.handle
        if p.offset == 0:
            did = self.next_delivery_id
            self.next_delivery_id = (did + 1) & SEQ_MASK
            d.delivery_id = did
            assert link.sender_credit is not None
            link.sender_credit.on_delivery_sent()
            if not d.settled:
                self.out_unsettled[did] = d
                link.unsettled_count += 1
            tag = d.delivery_tag
            state = d.state
            if state is None and size + _TRANSFER_OVERHEAD + len(tag) <= max_frame:
                # The common case: the whole message fits in one frame.
                w.on_transfer_sent()
                encode_transfer_frame_into(
                    conn.begin_write(), channel, handle, did, tag, d.message_format,
                    d.settled, False, payload, batchable=p.batchable,
                )  # fmt: skip
                if conn.trace is not None:
                    self._trace_transfer(handle, did, tag, d.message_format, d.settled, False,
                                         None, p.batchable, size)  # fmt: skip
                return True
            room = max_frame - self._overhead(handle, did, tag, d, True)
            more = size > room
            w.on_transfer_sent()
            encode_transfer_frame_into(
                conn.begin_write(), channel, handle, did, tag, d.message_format, d.settled,
                more, payload[:room] if more else payload, state=state, batchable=p.batchable,
            )  # fmt: skip
            if conn.trace is not None:
                self._trace_transfer(handle, did, tag, d.message_format, d.settled, more, state,
                                     p.batchable, room if more else size)  # fmt: skip
            if not more:
                return True
            p.offset = room
        did = d.delivery_id
        room = max_frame - self._overhead(handle, did, None, d, False)
        settled = True if d.settled else None
        while w.remote_incoming_window > 0:
            end = p.offset + room
            more = end < size
            w.on_transfer_sent()
            encode_transfer_frame_into(
                conn.begin_write(), channel, handle, did, None, None, settled, more,
                payload[p.offset : end] if more else payload[p.offset :],
                batchable=p.batchable,
            )  # fmt: skip
            if conn.trace is not None:
                self._trace_transfer(handle, did, None, None, settled, more, None, p.batchable,
                                     (end if more else size) - p.offset)  # fmt: skip
            if not more:
                return True
            p.offset = end
        return False

    def _trace_transfer(self, handle: int | None, did: int | None, tag: bytes | None,
                        fmt: int | None, settled: bool | None, more: bool, state: Any,
                        batchable: bool, size: int, *, aborted: bool = False) -> None:  # fmt: skip
        transfer = Transfer(handle, did, tag, fmt, settled, more, None, state, False, aborted,
                            batchable)  # fmt: skip
        self.connection.traced(self.channel, transfer, size)

    def _overhead(self, handle: int | None, did: int, tag: bytes | None, d: Delivery,
                  first: bool) -> int:  # fmt: skip
        probe = bytearray()
        encode_transfer_frame_into(
            probe, self.channel or 0, handle or 0, did, tag,
            d.message_format if first else None,
            d.settled if first else (True if d.settled else None),
            True, b"", state=d.state if first else None, batchable=True,
        )  # fmt: skip
        room = self.connection.send_max_frame_size - len(probe)
        if room <= 0:
            raise ProtocolError(
                f"transfer performative ({len(probe)} bytes) does not fit the peer's "
                f"max-frame-size {self.connection.send_max_frame_size}",
                C.FRAME_SIZE_TOO_SMALL,
            )
        return len(probe)

    # ---------------------------------------------------------------- dispositions we send

    def queue_disposition(self, d: Delivery, settled: bool, state: Any) -> None:
        if d.settled or d.link.state is LinkState.DETACHED:
            return
        if state is not None:
            d.state = state
        if d.delivery_id is None:
            # Still queued on the link: the transfer will carry the settlement.
            d.settled = settled
            return
        if settled:
            d.settled = True
            table = self.in_unsettled if d.incoming else self.out_unsettled
            if table.pop(d.delivery_id, None) is not None:
                d.link.unsettled_count -= 1
            if d.remote_settled:
                return  # the peer already forgot it: nothing to tell
        if self.state is not SessionState.MAPPED:
            return
        # Our role: the receiver of an incoming delivery, the sender of an outgoing one.
        # Runs of consecutive ids with the same role, settlement and state are
        # coalesced here, as they are queued: one first..last range each.
        role = d.incoming
        did = d.delivery_id
        pending = self.pending_dispositions
        if pending:
            run = pending[-1]
            if (
                run[2] + 1 & SEQ_MASK == did
                and run[0] == role
                and run[3] == settled
                and (run[4] is state or run[4] == state)
            ):
                run[2] = did
                return  # the session is already noted as having dispositions to send
        pending.append([role, did, did, settled, state])
        self.connection.dispositions_pending(self)

    def flush_dispositions(self) -> bytes:
        """Encode the queued disposition ranges (see ``_queue_disposition``)."""
        pending = self.pending_dispositions
        self.pending_dispositions = []
        if self.state is not SessionState.MAPPED or self.channel is None:
            return b""
        channel = self.channel
        traced = self.connection.trace is not None
        if len(pending) == 1:
            role, first, last, settled, state = pending[0]
            if traced:
                self._trace_disposition(role, first, last, settled, state)
            return encode_disposition(channel, role, first, None if last == first else last,
                                      settled, state)  # fmt: skip
        frames = []
        for role, first, last, settled, state in pending:
            frames.append(encode_disposition(channel, role, first, None if last == first else last,
                                             settled, state))  # fmt: skip
            if traced:
                self._trace_disposition(role, first, last, settled, state)
        return b"".join(frames)

    def _trace_disposition(self, role: bool, first: int, last: int, settled: bool,
                           state: Any) -> None:  # fmt: skip
        disposition = Disposition(role, first, None if last == first else last, settled, state)
        self.connection.traced(self.channel, disposition, 0)

    # --------------------------------------------------------------- frames we receive

    def on_remote_begin(self, begin: Begin) -> None:
        self.remote_begin = begin
        self.remote_handle_max = begin.handle_max
        self.windows.on_remote_begin(
            begin.next_outgoing_id, begin.incoming_window, begin.outgoing_window  # type: ignore[arg-type]
        )

    def on_attach(self, attach: Attach) -> None:
        handle = attach.handle
        assert handle is not None and attach.name is not None and attach.role is not None
        if handle > self.handle_max:
            raise ProtocolError(
                f"attach of link {attach.name!r:.80} uses handle {handle} above handle-max "
                f"{self.handle_max}",
                C.NOT_ALLOWED,
            )
        if handle in self._remote_links:
            raise ProtocolError(
                f"attach of link {attach.name!r:.80} on handle {handle}, which is in use",
                C.HANDLE_IN_USE,
            )
        our_role = not attach.role
        link = self._attaching.pop((attach.name, our_role), None)
        conn = self.connection
        if link is not None:
            # The peer answered our attach.
            link.state = LinkState.ATTACHED if link.state is LinkState.ATTACH_SENT else link.state
        else:
            # Reserve the handle our answer will use now, so that answer_attach cannot
            # run out: a peer that attaches more links than the handle space it allows
            # us (its handle-max) is refused here, not in the application's answer.
            try:
                ours = self._alloc_handle()
            except LocalProtocolError:
                raise ProtocolError(
                    f"attach of link {attach.name!r:.80}: no handle left to answer it within "
                    f"handle-max {min(self.handle_max, self.remote_handle_max)}",
                    C.RESOURCE_LIMIT_EXCEEDED,
                ) from None
            link = Link(self, attach.name, our_role, handle=ours, state=LinkState.ATTACH_RCVD)
        link.remote_handle = handle
        link.remote_attach = attach
        self._remote_links[handle] = link
        if link.receiver_credit is not None:
            link.receiver_credit.on_remote_attach(attach.initial_delivery_count or 0)
        conn.pending_events.append(RemoteAttach(link, attach))
        if link.pending_transfers and link.state is LinkState.ATTACHED:
            self.pump_link(link)

    def on_flow(self, flow: Flow) -> None:
        w = self.windows
        w.on_remote_flow(
            flow.next_incoming_id, flow.incoming_window, flow.next_outgoing_id,  # type: ignore[arg-type]
            flow.outgoing_window,  # type: ignore[arg-type]
        )
        link = None
        if flow.handle is not None:
            link = self._remote_links.get(flow.handle)
            if link is None:
                raise ProtocolError(f"flow on unattached handle {flow.handle}", C.UNATTACHED_HANDLE)
            if link.sender_credit is not None:
                if flow.link_credit is not None:
                    link.sender_credit.on_flow(flow.delivery_count, flow.link_credit, flow.drain)
            else:
                assert link.receiver_credit is not None
                link.receiver_credit.on_flow(flow.delivery_count, flow.available)
            if flow.echo:
                self.send_link_flow(link)
        elif flow.echo:
            self._send_session_flow()
        self.connection.pending_events.append(RemoteFlow(self, link, flow))
        if link is not None and link.pending_transfers:
            self.pump_link(link)
        if self.blocked:
            self.pump_all()

    def on_plain_transfer(self, fields: PlainTransfer, payload: memoryview) -> None:
        """``_on_transfer`` for a plain transfer (a whole message in one frame, no
        delivery state; see ``FrameReader.read_frame``) on an attached receiving
        link with nothing in reassembly: the receive path of almost every message.
        Anything less usual takes ``_on_transfer`` with the performative."""
        handle, did, tag, fmt, settled, _ = fields
        link = self._remote_links.get(handle)
        if (
            link is None
            or link.partial is not None
            or link.receiver_credit is None
            or link.state is LinkState.DETACH_SENT
            or payload.nbytes > link.max_message_size
        ):
            self.on_transfer(plain_transfer(fields), payload)
            return
        w = self.windows
        try:
            w.on_transfer_received()
        except WindowViolation as exc:
            raise ProtocolError(str(exc), C.WINDOW_VIOLATION) from None
        if self.auto_flow and w.incoming_window <= w.max_incoming_window >> 1:
            w.replenish()
            self._send_session_flow()
        try:
            link.receiver_credit.on_delivery_received()
        except WindowViolation as exc:
            raise ProtocolError(f"link {link.name!r:.80}: {exc}", C.TRANSFER_LIMIT_EXCEEDED) from None
        if fmt is None:
            fmt = 0
        if settled is True:
            d = Delivery(link, did, tag, fmt, True, False, True)
        else:
            settled = False
            d = Delivery(link, did, tag, fmt, True, False, False)
            self.in_unsettled[did] = d
            link.unsettled_count += 1
        self.connection.pending_events.append(
            TransferReceived(link, d, tag, payload, fmt, settled, None, False, False, False)
        )

    def on_transfer(self, t: Transfer, payload: memoryview) -> None:
        link = self._remote_links.get(t.handle)  # type: ignore[arg-type]
        if link is None:
            raise ProtocolError(f"transfer on unattached handle {t.handle}", C.UNATTACHED_HANDLE)
        w = self.windows
        try:
            w.on_transfer_received()
        except WindowViolation as exc:
            raise ProtocolError(str(exc), C.WINDOW_VIOLATION) from None
        rc = link.receiver_credit
        if rc is None:
            raise ProtocolError(
                f"transfer from the receiving end of link {link.name!r:.80}", C.INVALID_FIELD
            )
        if self.auto_flow and w.incoming_window <= w.max_incoming_window >> 1:
            w.replenish()
            self._send_session_flow()
        d = link.partial
        if d is None:
            did = t.delivery_id
            tag = t.delivery_tag
            if did is None or tag is None:
                raise ProtocolError(
                    f"first transfer of a delivery on link {link.name!r:.80} lacks "
                    f"{'delivery-id' if did is None else 'delivery-tag'}",
                    C.INVALID_FIELD,
                )
            try:
                rc.on_delivery_received()
            except WindowViolation as exc:
                raise ProtocolError(
                    f"link {link.name!r:.80}: {exc}", C.TRANSFER_LIMIT_EXCEEDED
                ) from None
            settled = t.settled is True
            fmt = t.message_format
            d = Delivery(link, did, tag, 0 if fmt is None else fmt, True, False, settled, None, t.state)
            if link.state is LinkState.DETACH_SENT:
                if t.more:
                    link.partial = d
                    link.partial_buf = None
                return  # the link is going away: count the frame, drop the message
            if not settled:
                self.in_unsettled[did] = d
                link.unsettled_count += 1
            if t.aborted:
                self._finish_aborted(link, d)
                return
            if payload.nbytes > link.max_message_size:
                self._too_big(link, d, payload.nbytes, t.more)
                return
            if t.more:
                link.partial = d
                link.partial_buf = bytearray(payload)
                link.partial_state = t.state
                return
            self.connection.pending_events.append(
                TransferReceived(link, d, tag, payload, d.message_format, settled, t.state,
                                 False, False, t.batchable)  # fmt: skip
            )
            return
        # Continuation of a multi-frame delivery.
        if t.delivery_id is not None and t.delivery_id != d.delivery_id:
            raise ProtocolError(
                f"link {link.name!r:.80}: delivery-id {t.delivery_id} in the middle of "
                f"delivery {d.delivery_id}",
                C.INVALID_FIELD,
            )
        buf = link.partial_buf
        if buf is None:  # a delivery we are dropping (link detaching)
            if not t.more or t.aborted:
                link.partial = None
            return
        if t.settled and not d.remote_settled:
            d.remote_settled = True
            if self.in_unsettled.pop(d.delivery_id, None) is not None:  # type: ignore[arg-type]
                link.unsettled_count -= 1
        if t.state is not None:
            link.partial_state = t.state
        if t.aborted:
            link.partial = None
            link.partial_buf = None
            self._finish_aborted(link, d)
            return
        if len(buf) + payload.nbytes > link.max_message_size:
            self._too_big(link, d, len(buf) + payload.nbytes, t.more)
            return
        buf += payload
        if t.more:
            return
        link.partial = None
        link.partial_buf = None
        d.remote_state = link.partial_state
        self.connection.pending_events.append(
            TransferReceived(link, d, d.delivery_tag, bytes(buf), d.message_format,
                             d.remote_settled, link.partial_state, False, False, t.batchable)  # fmt: skip
        )

    def _too_big(self, link: Link, d: Delivery, size: int, more: bool) -> None:
        """The peer's message outgrew what the link accepts (its max-message-size or
        the reassembly cap): detach that link with amqp:link:message-size-exceeded
        (spec 2.6.x) and drop the message; the session and connection stay up."""
        error = Error(
            Symbol(C.MESSAGE_SIZE_EXCEEDED),
            f"message of {'more than ' if more else ''}{size} bytes exceeds the maximum "
            f"message size {link.max_message_size} of link {link.name!r:.80}",
        )
        if self.in_unsettled.pop(d.delivery_id, None) is not None:  # type: ignore[arg-type]
            link.unsettled_count -= 1
        # The rest of the delivery's frames are counted and discarded (see DETACH_SENT).
        link.partial = d if more else None
        link.partial_buf = None
        self.detach_link(link, error, True)
        self.connection.pending_events.append(LinkError(link, error, True))

    def _finish_aborted(self, link: Link, d: Delivery) -> None:
        d.aborted = True
        d.remote_settled = True
        if self.in_unsettled.pop(d.delivery_id, None) is not None:  # type: ignore[arg-type]
            link.unsettled_count -= 1
        self.connection.pending_events.append(
            TransferReceived(link, d, d.delivery_tag, b"", d.message_format, True, None,
                             False, True)  # fmt: skip
        )

    def on_disposition(self, disp: Disposition) -> None:
        role = disp.role
        # From a receiver: about deliveries we sent. From a sender: ones we received.
        table = self.out_unsettled if role == RECEIVER else self.in_unsettled
        first = disp.first
        assert first is not None
        last = first if disp.last is None else disp.last
        span = seq_diff(last, first)
        if span < 0:
            raise ProtocolError(f"disposition range {first}..{last} runs backwards", C.INVALID_FIELD)
        if not table:
            return
        state = disp.state
        settled = disp.settled
        touched: list[Delivery] = []
        if span < len(table):
            # The usual case, a short range: look its ids up (and settle them at once).
            if settled:
                pop = table.pop
                for i in range(span + 1):
                    d = pop((first + i) & SEQ_MASK, None)
                    if d is not None:
                        touched.append(d)
                        if state is not None:
                            d.remote_state = state
                        d.remote_settled = True
                        d.link.unsettled_count -= 1
            else:
                get = table.get
                for i in range(span + 1):
                    d = get((first + i) & SEQ_MASK)
                    if d is not None:
                        touched.append(d)
                        if state is not None:
                            d.remote_state = state
            if not touched:
                return
        else:
            for did, d in table.items():
                if seq_diff(did, first) >= 0 and seq_diff(last, did) >= 0:
                    touched.append(d)
            if not touched:
                return
            for d in touched:
                if state is not None:
                    d.remote_state = state
                if settled:
                    d.remote_settled = True
                    del table[d.delivery_id]  # type: ignore[arg-type]
                    d.link.unsettled_count -= 1
        if settled and role == RECEIVER:
            self.connection.settled_by_peer += len(touched)
        self.connection.pending_events.append(
            DispositionReceived(self, touched, state, settled, first, last, role,  # type: ignore[arg-type]
                                disp.batchable)  # fmt: skip
        )

    def on_detach(self, detach: Detach) -> None:
        link = self._remote_links.pop(detach.handle, None)  # type: ignore[arg-type]
        if link is None:
            raise ProtocolError(f"detach of unattached handle {detach.handle}", C.UNATTACHED_HANDLE)
        link.remote_closed = detach.closed
        link.remote_detach_error = detach.error
        link.partial = None
        link.partial_buf = None
        self._attaching.pop((link.name, link.role), None)
        events = self.connection.pending_events
        if link.state is LinkState.DETACH_SENT:
            self._release_link(link)
        elif link.state is LinkState.ATTACH_RCVD:
            # Detached before we answered: answer both now (a refusal, as it were), so the
            # peer's handle is free again; the application only hears of the detach.
            if self.state is SessionState.MAPPED:
                self.answer_link_attach(
                    link, Attach(name=link.name, handle=0, role=link.role, source=None, target=None)
                )
                link.state = LinkState.DETACH_RCVD
                self.detach_link(link, None, detach.closed)
            else:
                self._release_link(link)
        else:
            link.state = LinkState.DETACH_RCVD
            link.pending_transfers.clear()
            link.queued_bytes = 0
            self.blocked.pop(link, None)
        events.append(RemoteDetach(link, detach.closed, detach.error))

    def on_end(self, end: End) -> None:
        """The peer ended the session; its links are implicitly detached."""
        self.remote_end_error = end.error
        for link in self.links:
            self._forget_link_deliveries(link)
            link.state = LinkState.DETACHED
        self.blocked.clear()
        if self.state is SessionState.END_SENT:
            self.state = SessionState.UNMAPPED
            self.connection.unmap_session(self)
        else:
            self.state = SessionState.END_RCVD
            self.pending_dispositions.clear()
