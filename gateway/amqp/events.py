"""Events a Connection reports from ``receive_data`` and ``tick``.

Small value classes, one per thing that happened on the wire. Performatives are
handed over untouched so a router can relay them field for field.

Direction: below the engine's endpoints (`link`, `session`, `connection`,
`sasl` all report events), so the endpoints an event carries are named, not
imported: ``EventSession`` is a `session.Session`, ``EventLink`` a `link.Link`,
``EventDelivery`` a `link.Delivery`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from .performatives import Attach, Begin, Error, Flow, Open

EventSession: TypeAlias = Any  # session.Session
EventLink: TypeAlias = Any  # link.Link
EventDelivery: TypeAlias = Any  # link.Delivery

__all__ = [
    "Event",
    "SaslAuthenticated",
    "RemoteOpen",
    "RemoteBegin",
    "RemoteAttach",
    "TransferReceived",
    "RemoteFlow",
    "DispositionReceived",
    "RemoteDetach",
    "LinkError",
    "RemoteEnd",
    "RemoteClose",
    "ConnectionError",
]


class Event:
    """Base class of every engine event."""

    __slots__ = ()


@dataclass(slots=True, eq=False)
class SaslAuthenticated(Event):
    """SASL finished with outcome ok.

    Server side: what the peer authenticated as. ``identity`` is the PLAIN authcid
    (None for ANONYMOUS and EXTERNAL); ``password`` is the PLAIN password (for IoT Hub
    a SAS token), never shown in repr. Client side: the mechanism we used.
    """

    mechanism: str
    identity: str | None = None
    password: str | None = field(default=None, repr=False)
    authzid: str | None = None
    hostname: str | None = None


@dataclass(slots=True, eq=False)
class RemoteOpen(Event):
    """The peer's open performative arrived."""

    open: Open


@dataclass(slots=True, eq=False)
class RemoteBegin(Event):
    """The peer began a session, or answered our begin (``session.local_begun``)."""

    session: EventSession
    begin: Begin


@dataclass(slots=True, eq=False)
class RemoteAttach(Event):
    """The peer attached a link, or answered our attach.

    ``attach`` is the performative as received (source, target, properties, ...
    untouched). For a new link answer with ``link.answer_attach(...)``.
    """

    link: EventLink
    attach: Attach


@dataclass(slots=True, eq=False)
class TransferReceived(Event):
    """A complete delivery (all frames reassembled), or an aborted one.

    ``payload`` is the message bytes exactly as received: a memoryview into the
    received data when the delivery came in one frame, bytes when reassembled.
    It stays valid after later receive_data calls. ``state`` is the transfer's
    delivery state field (None unless the sender resumed or set one).
    """

    link: EventLink
    delivery: EventDelivery
    delivery_tag: bytes
    payload: bytes | memoryview
    message_format: int
    settled: bool
    state: Any = None
    more: bool = False
    aborted: bool = False
    batchable: bool = False


@dataclass(slots=True, eq=False)
class RemoteFlow(Event):
    """A flow frame arrived. ``link`` is None for a session-only flow.

    The link's counters (``link.credit``, ``link.drain``, ``link.available``) and the
    session window are already updated, and queued transfers sent where possible.
    """

    session: EventSession
    link: EventLink | None
    flow: Flow


@dataclass(slots=True, eq=False)
class DispositionReceived(Event):
    """A disposition arrived; ``deliveries`` are the known deliveries in first..last.

    ``state`` is the delivery state object as received (Accepted(), Rejected(error),
    ... or an unknown Described), ``settled`` the peer's settlement.
    """

    session: EventSession
    deliveries: list[EventDelivery]
    state: Any
    settled: bool
    first: int
    last: int
    role: bool
    batchable: bool = False


@dataclass(slots=True, eq=False)
class RemoteDetach(Event):
    """The peer detached (or closed, ``closed=True``) a link, or answered our detach."""

    link: EventLink
    closed: bool
    error: Error | None


@dataclass(slots=True, eq=False)
class LinkError(Event):
    """We detached a link because of what the peer sent on it: a message larger than
    the link's max-message-size or the connection's reassembly cap
    (``amqp:link:message-size-exceeded``, spec 2.6.x). Only that link ends: its
    session and the connection stay up.

    ``error`` is what our detach carried (also ``link.local_detach_error``), ``closed``
    whether it closed the link. The link is in DETACH_SENT; the offending delivery is
    dropped and later frames on the link are discarded. The peer's answering detach
    arrives later as a ``RemoteDetach``. A router relays this like the peer's own
    detach: detach the paired link with ``error``.
    """

    link: EventLink
    error: Error
    closed: bool = True


@dataclass(slots=True, eq=False)
class RemoteEnd(Event):
    """The peer ended a session, or answered our end. Its links are gone with it."""

    session: EventSession
    error: Error | None


@dataclass(slots=True, eq=False)
class RemoteClose(Event):
    """The peer closed the connection, or answered our close."""

    error: Error | None


@dataclass(slots=True, eq=False)
class ConnectionError(Event):
    """We closed the connection because of a protocol error (or the transport failed).

    ``error`` is what we sent in our close (or would have, when the failure was
    before open: SASL refusal, header mismatch, idle timeout, EOF).
    Nothing more is received afterwards; flush ``data_to_send()`` then close the socket.

    ``protocol`` is True when the peer broke the protocol (a malformed,
    oversized or out-of-state frame, a header we do not accept): what an
    operator counts as a protocol error, unlike EOF, idle timeout or a SASL
    refusal.
    """

    error: Error
    protocol: bool = False
