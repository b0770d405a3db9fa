"""Sans-I/O AMQP 1.0: type codec, frames, performatives, SASL and the
connection/session/link endpoint engine.

    conn = Connection("server", "gw", sasl=SaslServer(["PLAIN", "ANONYMOUS"]))
    events = conn.receive_data(data)
    sock.send(conn.data_to_send())
"""

from __future__ import annotations

from .connection import DEFAULT_MAX_MESSAGE_SIZE, Connection
from .errors import AMQPError, DecodeError, FramingError, LocalProtocolError, ProtocolError
from .events import (
    ConnectionError,
    DispositionReceived,
    Event,
    LinkError,
    RemoteAttach,
    RemoteBegin,
    RemoteClose,
    RemoteDetach,
    RemoteEnd,
    RemoteFlow,
    RemoteOpen,
    SaslAuthenticated,
    TransferReceived,
)
from .link import RECEIVER, SENDER, Delivery, Link, LinkState
from .sasl import SaslClient, SaslServer
from .session import Session, SessionState

__all__ = [
    "AMQPError",
    "Connection",
    "ConnectionError",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DecodeError",
    "Delivery",
    "DispositionReceived",
    "Event",
    "FramingError",
    "Link",
    "LinkError",
    "LinkState",
    "LocalProtocolError",
    "ProtocolError",
    "RECEIVER",
    "RemoteAttach",
    "RemoteBegin",
    "RemoteClose",
    "RemoteDetach",
    "RemoteEnd",
    "RemoteFlow",
    "RemoteOpen",
    "SENDER",
    "SaslAuthenticated",
    "SaslClient",
    "SaslServer",
    "Session",
    "SessionState",
    "TransferReceived",
]
