"""Links and deliveries (spec 2.6): attach/detach state, credit, transfers.

A Link belongs to a Session; the Session owns handles, delivery ids and the
session window and writes the frames. The Link keeps its credit (``flow.py``),
the queue of deliveries waiting for credit or window, and the reassembly of an
incoming multi-frame delivery.

Direction: below `session` and `connection`; what a link calls on its session
is declared here (`LinkSession`) instead of importing it.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Any, Protocol

from .constants import ROLE_RECEIVER, ROLE_SENDER
from .errors import LocalProtocolError
from .flow import MAX_WINDOW, ReceiverCredit, SenderCredit
from .performatives import Attach, Error

__all__ = ["Link", "LinkState", "Delivery", "SENDER", "RECEIVER", "role_of"]

SENDER = ROLE_SENDER
RECEIVER = ROLE_RECEIVER


def role_of(role: bool | str) -> bool:
    """Accept the spec's boolean role or "sender"/"receiver"."""
    if isinstance(role, bool):
        return role
    if role == "sender":
        return SENDER
    if role == "receiver":
        return RECEIVER
    raise ValueError(f"link role must be 'sender', 'receiver' or a bool, not {role!r}")


class LinkState(Enum):
    ATTACH_SENT = "attach-sent"  # we attached, waiting for the peer's attach
    ATTACH_RCVD = "attach-rcvd"  # the peer attached, waiting for answer_attach()
    ATTACHED = "attached"
    DETACH_SENT = "detach-sent"  # we detached, waiting for the peer's detach
    DETACH_RCVD = "detach-rcvd"  # the peer detached, waiting for detach()
    DETACHED = "detached"


class Delivery:
    """One message on one link, in one direction.

    ``delivery_id`` is the session-scoped id on this hop (None for an outgoing
    delivery still queued); ``delivery_tag`` is the link-scoped identity that stays
    the same across hops. ``context`` is free for the application (a router keeps
    the paired delivery there).
    """

    __slots__ = (
        "link",
        "delivery_id",
        "delivery_tag",
        "message_format",
        "incoming",
        "settled",
        "remote_settled",
        "state",
        "remote_state",
        "aborted",
        "context",
    )

    def __init__(
        self,
        link: Link,
        delivery_id: int | None,
        delivery_tag: bytes,
        message_format: int,
        incoming: bool,
        settled: bool,
        remote_settled: bool,
        state: Any = None,
        remote_state: Any = None,
    ) -> None:
        self.link = link
        self.delivery_id = delivery_id
        self.delivery_tag = delivery_tag
        self.message_format = message_format
        self.incoming = incoming
        self.settled = settled
        self.remote_settled = remote_settled
        self.state = state
        self.remote_state = remote_state
        self.aborted = False
        self.context: Any = None

    def update(self, state: Any = None, settled: bool = False) -> None:
        """Send a disposition for this delivery (coalesced with its neighbours)."""
        self.link.session.connection.disposition((self,), settled=settled, state=state)

    def settle(self, state: Any = None) -> None:
        self.update(state, settled=True)

    def __repr__(self) -> str:
        way = "in" if self.incoming else "out"
        return (
            f"<Delivery {way} id={self.delivery_id} tag={self.delivery_tag!r} "
            f"link={self.link.name!r} settled={self.settled}/{self.remote_settled}>"
        )


class LinkConnection(Protocol):
    """What a link and its deliveries use of the connection (`connection.Connection`)."""

    max_message_size: int

    def disposition(self, deliveries: Any, settled: bool = False, state: Any = None) -> None: ...


class LinkSession(Protocol):
    """What a link calls on its session (`session.Session`): the engine's own
    interface between the two, not an application's."""

    @property
    def connection(self) -> LinkConnection: ...
    @property
    def out_unsettled(self) -> dict[int, Delivery]: ...  # by delivery id
    @property
    def in_unsettled(self) -> dict[int, Delivery]: ...
    def answer_link_attach(self, link: Link, attach: Attach) -> None: ...
    def detach_link(self, link: Link, error: Error | None, closed: bool) -> None: ...
    def send_now(self, link: Link, d: Delivery, payload: memoryview) -> bool: ...
    def pump_link(self, link: Link) -> None: ...
    def send_abort(self, link: Link, delivery: Delivery) -> None: ...
    def send_link_flow(self, link: Link, *, drain: bool = False, echo: bool = False,
                       properties: dict[Any, Any] | None = None) -> None: ...  # fmt: skip


class _Pending:
    """An outgoing delivery not yet completely written."""

    __slots__ = ("delivery", "payload", "offset", "batchable")

    def __init__(self, delivery: Delivery, payload: memoryview, batchable: bool) -> None:
        self.delivery = delivery
        self.payload = payload
        self.offset = 0
        self.batchable = batchable


class Link:
    """One end of a link. Create with ``Session.attach`` (ours) or get one from a
    ``RemoteAttach`` event (the peer's) and answer it with ``answer_attach``."""

    def __init__(
        self,
        session: LinkSession,
        name: str,
        role: bool,
        *,
        handle: int | None,
        state: LinkState,
    ) -> None:
        self.session = session
        self.name = name
        self.role = role
        self.handle = handle
        self.remote_handle: int | None = None
        self.state = state
        self.local_attach: Attach | None = None
        self.remote_attach: Attach | None = None
        self.remote_detach_error: Error | None = None
        #: the error our detach carried (set by ``detach(error)`` or a LinkError)
        self.local_detach_error: Error | None = None
        self.remote_closed = False
        self.context: Any = None
        # Largest message we accept on a receiver: our attach's max-message-size, never
        # more than the connection's cap (which bounds reassembly memory).
        self.max_message_size = session.connection.max_message_size
        # The rest is kept by the session too, which schedules transfers and
        # reassembles deliveries; read-only for everyone else.
        if role == SENDER:
            self.sender_credit: SenderCredit | None = SenderCredit()
            self.receiver_credit: ReceiverCredit | None = None
        else:
            self.sender_credit = None
            self.receiver_credit = ReceiverCredit()
        # ``len(unsettled)`` without building the list: our entries in the session's
        # unsettled tables.
        self.unsettled_count = 0
        self.pending_transfers: deque[_Pending] = deque()  # waiting for credit or window
        self.queued_bytes = 0  # payload bytes in pending_transfers
        self.partial: Delivery | None = None
        self.partial_buf: bytearray | None = None
        self.partial_state: Any = None

    # ----------------------------------------------------------------------- properties

    @property
    def is_sender(self) -> bool:
        return self.role == SENDER

    @property
    def is_receiver(self) -> bool:
        return self.role == RECEIVER

    @property
    def credit(self) -> int:
        """Link credit as this end sees it (sender: what it may still send)."""
        c = self.sender_credit if self.sender_credit is not None else self.receiver_credit
        assert c is not None
        return c.credit

    @property
    def delivery_count(self) -> int:
        c = self.sender_credit if self.sender_credit is not None else self.receiver_credit
        assert c is not None
        return c.delivery_count

    @property
    def available(self) -> int:
        c = self.sender_credit if self.sender_credit is not None else self.receiver_credit
        assert c is not None
        return c.available

    @property
    def drain(self) -> bool:
        """Sender: the receiver asked to drain. Receiver: we asked to drain."""
        c = self.sender_credit if self.sender_credit is not None else self.receiver_credit
        assert c is not None
        return c.drain

    @property
    def queued(self) -> int:
        """Outgoing deliveries not completely sent yet (waiting for credit or window)."""
        return len(self.pending_transfers)

    @property
    def unsettled(self) -> list[Delivery]:
        """Deliveries on this link not yet settled by both ends (a scan of the
        session's tables: for detach handling, not the per-message path)."""
        if not self.unsettled_count:
            return []
        s = self.session
        out_table = s.out_unsettled
        in_table = s.in_unsettled
        if self.unsettled_count == len(out_table) + len(in_table):
            # Every entry is this link's (the usual one busy link per session):
            # the same list, without testing each delivery.
            return [*out_table.values(), *in_table.values()]
        return [
            d
            for table in (s.out_unsettled, s.in_unsettled)
            for d in table.values()
            if d.link is self
        ]

    @property
    def is_open(self) -> bool:
        return self.state is LinkState.ATTACHED

    @property
    def remote_source(self) -> Any:
        return self.remote_attach.source if self.remote_attach is not None else None

    @property
    def remote_target(self) -> Any:
        return self.remote_attach.target if self.remote_attach is not None else None

    def __repr__(self) -> str:
        role = "sender" if self.role == SENDER else "receiver"
        return f"<Link {self.name!r} {role} handle={self.handle} {self.state.value}>"

    # ------------------------------------------------------------------- attach / detach

    def answer_attach(
        self,
        source: Any = None,
        target: Any = None,
        *,
        snd_settle_mode: int | None = None,
        rcv_settle_mode: int | None = None,
        unsettled: dict[Any, Any] | None = None,
        incomplete_unsettled: bool = False,
        initial_delivery_count: int | None = None,
        max_message_size: int | None = None,
        offered_capabilities: Any = None,
        desired_capabilities: Any = None,
        properties: dict[Any, Any] | None = None,
        extra: tuple[Any, ...] = (),
    ) -> None:
        """Answer the peer's attach (server side of a link, or a router mirroring).

        Everything is sent as given; settle modes default to the peer's. ``extra``
        holds fields beyond the ones the spec defines, appended after them (a router
        passes the mirrored attach's ``_extra``). To refuse, answer with
        ``source=None, target=None`` and then ``detach(error)``. A no-op when the
        peer detached first (the engine has answered for us then).
        """
        if self.state is LinkState.DETACHED:
            return
        if self.state is not LinkState.ATTACH_RCVD:
            raise LocalProtocolError(f"answer_attach on link {self.name!r} in state {self.state.value}")
        remote = self.remote_attach
        assert remote is not None
        self.session.answer_link_attach(
            self,
            Attach(
                name=self.name,
                handle=0,  # set by the session
                role=self.role,
                snd_settle_mode=remote.snd_settle_mode if snd_settle_mode is None else snd_settle_mode,
                rcv_settle_mode=remote.rcv_settle_mode if rcv_settle_mode is None else rcv_settle_mode,
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
            ),
        )

    def detach(self, error: Error | None = None, closed: bool = True) -> None:
        """Detach (closed=True: close) the link. A link the peer attached and we never
        answered is answered with null terminus first, which is how a refusal looks."""
        if self.state is LinkState.ATTACH_RCVD:
            self.answer_attach(None, None)
        if self.state in (LinkState.DETACH_SENT, LinkState.DETACHED):
            return
        self.session.detach_link(self, error, closed)

    # -------------------------------------------------------------------------- sending

    def send_transfer(
        self,
        delivery_tag: bytes,
        payload: bytes | bytearray | memoryview,
        *,
        message_format: int = 0,
        settled: bool = False,
        state: Any = None,
        batchable: bool = False,
    ) -> Delivery:
        """Send one message. It goes out now when credit and the peer's session window
        allow, fragmented to the peer's max-frame-size; otherwise it is queued (see
        ``queued``) and sent as credit arrives. The payload is not copied while queued:
        do not mutate it."""
        if self.sender_credit is None:
            raise LocalProtocolError(f"send_transfer on receiver link {self.name!r}")
        link_state = self.state
        if link_state is not LinkState.ATTACHED and link_state is not LinkState.ATTACH_SENT:
            raise LocalProtocolError(f"send_transfer on link {self.name!r} in state {link_state.value}")
        if type(delivery_tag) is not bytes:
            delivery_tag = bytes(delivery_tag)
        if len(delivery_tag) > 32:
            raise LocalProtocolError("a delivery tag is at most 32 bytes")
        delivery = Delivery(self, None, delivery_tag, message_format, False, settled, False, state)
        t = type(payload)
        if t is bytes or t is bytearray:
            view = memoryview(payload)  # always one-dimensional bytes
        else:
            view = payload if t is memoryview else memoryview(payload)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
        if (
            state is None
            and link_state is LinkState.ATTACHED
            and not batchable
            and not self.pending_transfers
            and self.session.send_now(self, delivery, view)
        ):
            return delivery  # written: one frame, nothing queued before it
        pending = _Pending(delivery, view, batchable)
        self.pending_transfers.append(pending)
        self.queued_bytes += view.nbytes
        if len(self.pending_transfers) == 1:
            self.session.pump_link(self)
        return delivery

    def abort(self, delivery: Delivery) -> None:
        """Abandon an outgoing delivery: dropped if not started, aborted on the wire if
        some of its frames are out."""
        for i, p in enumerate(self.pending_transfers):
            if p.delivery is delivery:
                del self.pending_transfers[i]
                self.queued_bytes -= p.payload.nbytes
                delivery.aborted = True
                if p.offset > 0:
                    self.session.send_abort(self, delivery)
                return

    def drained(self) -> int:
        """Sender answering a drain: give back unused credit (advance delivery-count)
        and tell the receiver. Returns the credit consumed. A no-op unless the
        receiver asked to drain and nothing is queued."""
        s = self.sender_credit
        if s is None:
            raise LocalProtocolError(f"drained() on receiver link {self.name!r}")
        if not s.drain or self.pending_transfers:
            return 0
        consumed = s.drain_credit()
        self.session.send_link_flow(self, drain=True)
        return consumed

    # ------------------------------------------------------------------------ receiving

    def flow(
        self,
        credit: int | None = None,
        *,
        drain: bool = False,
        echo: bool = False,
        available: int | None = None,
        properties: dict[Any, Any] | None = None,
    ) -> None:
        """Send a link flow. Receiver: set the link credit (absolute, as the spec has it)
        and optionally drain. Sender: report ``available`` and/or ask for an echo.
        Before the peer has answered our begin the flow is held and sent, with the
        link's state at that time, as soon as the session is mapped. A no-op once the
        link is detaching (either end)."""
        if self.state not in (LinkState.ATTACHED, LinkState.ATTACH_SENT):
            if self.state is LinkState.ATTACH_RCVD:
                raise LocalProtocolError(f"flow on link {self.name!r} before answer_attach")
            return
        if self.receiver_credit is not None:
            if credit is None:
                credit = self.receiver_credit.credit
            if not 0 <= credit <= MAX_WINDOW:
                raise LocalProtocolError(f"link credit must be in 0..{MAX_WINDOW}")
            self.receiver_credit.grant(credit, drain)
        else:
            assert self.sender_credit is not None
            if credit is not None:
                raise LocalProtocolError("a sender does not grant credit")
            if available is not None:
                self.sender_credit.available = available
        self.session.send_link_flow(self, drain=drain, echo=echo, properties=properties)

    def add_credit(self, n: int) -> None:
        """Receiver: grant ``n`` more credit on top of what is outstanding."""
        if self.receiver_credit is None:
            raise LocalProtocolError(f"add_credit on sender link {self.name!r}")
        self.flow(self.receiver_credit.credit + n, drain=self.receiver_credit.drain)
