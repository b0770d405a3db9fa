"""The relay's upstream connections: how one is opened (handed in) and what it holds.

The relay does no network I/O of its own: the daemon hands it an
`OpenUpstream`, a callable that opens a connection to a connector (TCP, TLS
with the given profile) and returns the stream, or raises `UpstreamUnavailable`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import trio

from gateway.mqtt.reader import PacketReader

__all__ = [
    "HandshakeBudget",
    "HandshakeHold",
    "OpenUpstream",
    "Opened",
    "UpstreamLink",
    "UpstreamUnavailable",
]


class UpstreamUnavailable(Exception):
    """Opening a connection to a connector failed.

    `reason` is one word fit for a metric label (the daemon's opener passes on
    `gateway.net.tls.TLSConnectError.reason`); `detail` is for logs.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Opened(NamedTuple):
    """A connection opened to a connector."""

    stream: trio.abc.Stream
    endpoint: str | None = None  # which of the connector's endpoints, for the log


class OpenUpstream(Protocol):
    """Open a connection to `connector` with TLS profile `profile` (None: plaintext).

    `profile` is the connector's own, or a device's client certificate put into
    it (`credentials.ClientCertProfile`). Raises UpstreamUnavailable.
    """

    async def __call__(self, connector: Any, profile: Any) -> Opened: ...


class HandshakeHold(Protocol):
    """One connection's bytes in the daemon's handshake budget."""

    async def grow_to(self, amount: int) -> None: ...
    def release(self) -> None: ...


class HandshakeBudget(Protocol):
    """The bytes device connections may hold before they are authenticated, across
    all of them (`gateway.net.handshake.HandshakeBudget`, handed in by the daemon)."""

    def hold(self) -> HandshakeHold: ...


class UpstreamLink:
    """One upstream connection of a relayed session, and how far along it is.

    A session normally has one; during a renewal it has two, the old one
    `retired` (its end is expected) and the new one `awaiting_connack`.
    `generation` numbers them, as `SessionTracker.generation` does.
    """

    __slots__ = (
        "stream",
        "reader",
        "generation",
        "retired",
        "awaiting_connack",
        "connack_code",
        "connack_received",
        "ended",
        "_stop_reading",
        "_receive_scope",
        "record",
    )

    def __init__(self, stream: trio.abc.Stream, reader: PacketReader, generation: int) -> None:
        self.stream = stream
        self.reader = reader
        self.generation = generation
        self.retired = False
        self.awaiting_connack = False
        self.connack_code: int | None = None
        self.connack_received = trio.Event()
        self.ended = trio.Event()  # its pump has finished
        self._stop_reading = False
        self._receive_scope: trio.CancelScope | None = None
        self.record: Any = None  # its live record (the admin API), if the observer keeps one

    async def receive_some(self, max_bytes: int) -> bytes | bytearray | None:
        """The next bytes from the hub; None once `stop_reading()` was called."""
        if self._stop_reading:
            return None
        with trio.CancelScope() as scope:
            self._receive_scope = scope
            try:
                return await self.stream.receive_some(max_bytes)
            finally:
                self._receive_scope = None
        return None

    def stop_reading(self) -> None:
        """End the pump at its next (or current) read, never in the middle of a
        write to the device, which would corrupt the device's stream."""
        self._stop_reading = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()
