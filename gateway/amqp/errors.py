"""AMQP 1.0 protocol errors.

Every error carries the AMQP error condition symbol that a connection close or
link detach should report, and a human-readable description.
"""

from __future__ import annotations


class AMQPError(Exception):
    """Base class for every AMQP protocol error raised by gateway.amqp."""

    condition: str = "amqp:internal-error"

    def __init__(self, description: str = "", condition: str | None = None) -> None:
        super().__init__(description)
        self.description: str = description
        if condition is not None:
            self.condition = condition

    def __repr__(self) -> str:
        return f"{type(self).__name__}(condition={self.condition!r}, description={self.description!r})"


class DecodeError(AMQPError):
    """Malformed AMQP type encoding, or a value of the wrong type for a field."""

    condition = "amqp:decode-error"


class FramingError(AMQPError):
    """Malformed frame, or a frame that breaks negotiated limits."""

    condition = "amqp:connection:framing-error"


class EncodeError(AMQPError, ValueError):
    """A value that cannot be encoded as the AMQP type asked for (a local bug)."""

    condition = "amqp:internal-error"


# Endpoint engine (connection.py, session.py, link.py).


class ProtocolError(AMQPError):
    """The peer broke the protocol; the connection is closed with ``condition``."""

    condition = "amqp:internal-error"


class LocalProtocolError(AMQPError):
    """The application called the engine in a state that does not allow it."""

    condition = "amqp:illegal-state"
