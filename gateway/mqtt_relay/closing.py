"""Why a relayed connection ends: the close reasons and the exception that carries one."""

from __future__ import annotations

import ssl

import trio

from .credentials import CREDENTIAL_ERROR, LOCAL_ADDRESS_REFUSED, LOCAL_AUTH_FAILED
from .renewal import RENEWAL_FAILED, TOKEN_EXPIRED

__all__ = ["AFTER_DISCONNECT", "ROUTINE", "CloseReason", "Stop"]


class CloseReason:
    """Why a relayed connection ended; a fixed vocabulary fit for metric labels."""

    CONNECT_TIMEOUT = "connect_timeout"  # no CONNECT within handshake_timeout
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    NO_ROUTE = "no_route"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"  # connect/TLS to the connector failed
    UPSTREAM_REFUSED = "upstream_refused"  # the hub's CONNACK refused the device
    TOPIC_REFUSED = "topic_refused"  # allowed_topics policy
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    PACKET_TOO_LARGE = "packet_too_large"  # from the device
    CONNECT_TOO_LARGE = "connect_too_large"  # over the pre-authentication limits
    DEVICE_PROTOCOL_ERROR = "device_protocol_error"
    UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error"
    DEVICE_DISCONNECT = "device_disconnect"  # the device sent DISCONNECT
    DEVICE_CLOSED = "device_closed"  # closed without DISCONNECT
    DEVICE_ERROR = "device_error"  # reset / broken device connection
    UPSTREAM_CLOSED = "upstream_closed"
    UPSTREAM_ERROR = "upstream_error"
    SHUTDOWN = "shutdown"  # the gateway stopped
    INTERNAL_ERROR = "internal_error"  # a bug in the gateway (logged with a traceback)
    # Credentials held by the gateway:
    LOCAL_AUTH_FAILED = LOCAL_AUTH_FAILED  # missing/wrong local password
    LOCAL_ADDRESS_REFUSED = LOCAL_ADDRESS_REFUSED  # not in allowed_addresses
    CREDENTIAL_ERROR = CREDENTIAL_ERROR  # the entry's key is unusable
    TOKEN_EXPIRED = TOKEN_EXPIRED  # renewals failed until the token expired
    TOKEN_RENEWAL_FAILED = RENEWAL_FAILED  # renewal lost the session
    # Store-and-forward local sessions (gateway.mqtt_relay.local_session):
    STORE_FULL = "store_full"  # no room for a PUBLISH within the wait
    STORE_UNAVAILABLE = "store_unavailable"  # the store failed
    HUB_REQUIRED = "hub_required"  # a twin/method PUBLISH while the hub is unreachable
    HUB_REACHABLE = "hub_reachable"  # the backlog was delivered: back to the hub


class Stop(Exception):
    """Ends a relayed connection with a reason (and a detail for the log)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# Ends that, once the device has sent DISCONNECT, are just the connection winding down.
AFTER_DISCONNECT = {
    CloseReason.UPSTREAM_CLOSED,
    CloseReason.UPSTREAM_ERROR,
    CloseReason.DEVICE_CLOSED,
    CloseReason.DEVICE_ERROR,
}

# Closes that are part of normal life, logged at INFO; the rest at WARNING.
ROUTINE = {
    CloseReason.DEVICE_DISCONNECT,
    CloseReason.DEVICE_CLOSED,
    CloseReason.UPSTREAM_CLOSED,
    CloseReason.SHUTDOWN,
    CloseReason.HUB_REACHABLE,
}


def only_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(only_cancellation(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def is_ragged_eof(exc: BaseException) -> bool:
    """A TLS peer that closed its socket without close_notify."""
    return isinstance(exc.__cause__, ssl.SSLEOFError)


def describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {cause or exc}" if cause or str(exc) else type(exc).__name__
