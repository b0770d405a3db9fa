"""Store-and-forward, the device side: a telemetry link the gateway answers itself.

Direction: below the connections (`device` dispatches to it); imports only
`linkpair`'s error helpers and `routes`. What it needs of the store-and-forward
coordinator (`forwarder.StoreAndForward`) is declared here (`LocalOwner`).

For a device that opted in to store-and-forward (see `forwarder.py` for who is
eligible and when), an attach of ``devices/{id}/messages/events`` (or the
module form) that the hub cannot serve is answered by the gateway: source and
target mirrored as the device sent them, a max-message-size of 256 KiB as IoT
Hub's, and at most `CREDIT` messages outstanding (being stored or granted).
Each complete transfer (the engine reassembles multi-frame ones) is appended to
the store with its message bytes exactly as received and, in ``meta``, its
message-format and delivery tag; only once ``append`` returned is the delivery
settled ``accepted``. Appends of one link run one at a time, so the store's
order is the device's order. A full store is answered ``released`` (the
device may send again later; nothing it sent is lost or acknowledged), and so
is a store that cannot be written (one log line, counted). Pre-settled
transfers are stored best effort: the device asked for no acknowledgement.

The forwarder detaches the link with ``amqp:link:detach-forced`` ("hub
reachable again") once the device's backlog is empty and the hub is
reachable, so the device's next attach goes to the hub (`detach_forced`).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote

from gateway.amqp import Delivery, Link, LinkState
from gateway.amqp.performatives import Accepted, Attach, Released

from .linkpair import amqp_error
from .routes import normalise_address, split_segments

log = logging.getLogger("gateway.router.store")

# IoT Hub's largest device-to-cloud message, which the hub's attach advertises.
MAX_MESSAGE_SIZE = 256 * 1024
# Messages a device may have outstanding on a local link (being stored or granted):
# bounds the memory one link can hold at CREDIT x MAX_MESSAGE_SIZE.
CREDIT = 16
DETACH_FORCED = "amqp:link:detach-forced"
HUB_REACHABLE = "hub reachable again"

_GONE = (LinkState.DETACH_SENT, LinkState.DETACHED)


def telemetry_key(address: str) -> str | None:
    """``dev1`` for ``devices/dev1/messages/events``, ``dev1/m1`` for the module
    form (any scheme, host or leading ``/``; ids percent-decoded, as identities are
    compared); None for any other address."""
    segs = tuple(unquote(s) for s in split_segments(normalise_address(address)))
    if len(segs) == 4 and segs[0] == "devices" and segs[2:] == ("messages", "events"):
        return segs[1] or None
    if (len(segs) == 6 and segs[0] == "devices" and segs[2] == "modules"
            and segs[4:] == ("messages", "events") and segs[1] and segs[3]):  # fmt: skip
        return f"{segs[1]}/{segs[3]}"
    return None


def encode_meta(message_format: int, delivery_tag: bytes) -> bytes:
    """What the forwarder needs besides the message bytes (opaque to the store)."""
    return json.dumps({"v": 1, "format": message_format, "tag": delivery_tag.hex()},
                      separators=(",", ":")).encode()  # fmt: skip


@dataclass(frozen=True, slots=True)
class Meta:
    message_format: int
    delivery_tag: bytes | None


def decode_meta(meta: bytes) -> Meta:
    """The stored message-format and delivery tag (defaults for unreadable meta)."""
    try:
        d = json.loads(meta)
        tag = d.get("tag")
        return Meta(int(d.get("format", 0)), bytes.fromhex(tag) if tag is not None else None)
    except (ValueError, TypeError, AttributeError):
        return Meta(0, None)


class LocalOwner(Protocol):
    """The store-and-forward coordinator (`forwarder.StoreAndForward`)."""

    @property
    def store(self) -> Any: ...  # gateway.store.MessageStore
    @property
    def full_errors(self) -> tuple[type[Exception], type[Exception]]: ...  # StoreFull, StoreUnavailable
    def start_soon(self, fn: Callable[..., Any], *args: Any) -> bool: ...
    def stored(self, link: LocalLink) -> None: ...
    def refused(self, link: LocalLink, kind: str, reason: str) -> None: ...
    def link_gone(self, link: LocalLink) -> None: ...


class LocalDevice(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def wake(self) -> None: ...


class LocalLink:
    """A device's telemetry link answered by the gateway, its messages stored."""

    def __init__(self, owner: LocalOwner, device: LocalDevice, link: Link, attach: Attach,
                 key: str, connector: str) -> None:  # fmt: skip
        self.owner = owner
        self.device = device
        self.link = link
        self.key = key  # the store's device key: "dev1" or "dev1/m1"
        self.connector = connector
        # The target address as the device attached it: replayed unchanged.
        self.address = str(getattr(attach.target, "address", "") or "")
        self.pending = 0  # transfers received, not yet settled (being stored)
        self.stored_count = 0
        self.gone = False
        self._queue: deque[tuple[Delivery, bytes, int, bytes, bool]] = deque()
        self._working = False
        link.context = self
        link.answer_attach(
            source=attach.source,
            target=attach.target,
            snd_settle_mode=attach.snd_settle_mode,
            rcv_settle_mode=0,  # first: we settle as soon as the message is stored
            max_message_size=MAX_MESSAGE_SIZE,
        )
        link.flow(CREDIT)
        device.wake()

    def __repr__(self) -> str:
        return f"<LocalLink {self.key} {self.link.name!r} pending={self.pending}>"

    @property
    def open(self) -> bool:
        return not self.gone and self.link.state is LinkState.ATTACHED

    # --------------------------------------------------------------- transfers

    def on_transfer(self, ev: Any) -> None:
        """A complete message from the device: stored, then settled."""
        if ev.aborted or not self.open:
            return
        self.pending += 1
        self._queue.append((ev.delivery, bytes(ev.payload), ev.message_format,
                            bytes(ev.delivery_tag), bool(ev.settled)))  # fmt: skip
        if not self._working:
            self._working = self.owner.start_soon(self._store_queued)

    async def _store_queued(self) -> None:
        store = self.owner.store
        full, unavailable = self.owner.full_errors
        try:
            while self._queue:
                delivery, payload, fmt, tag, settled = self._queue.popleft()
                outcome: Any = Accepted()
                try:
                    await store.append(device=self.key, connector=self.connector, protocol="amqp",
                                       address=self.address, meta=encode_meta(fmt, tag),
                                       payload=payload)  # fmt: skip
                except full as exc:
                    outcome = Released()
                    self.owner.refused(self, "full", getattr(exc, "reason", str(exc)))
                except unavailable as exc:
                    outcome = Released()
                    self.owner.refused(self, "unavailable", getattr(exc, "reason", str(exc)))
                else:
                    self.stored_count += 1
                    self.owner.stored(self)
                self.pending -= 1
                self._settle(delivery, settled, outcome)
        finally:
            self._working = False

    def _settle(self, delivery: Delivery, settled: bool, outcome: Any) -> None:
        if self.open and not self.device.closed:
            if not settled:
                delivery.settle(outcome)
            want = CREDIT - self.pending
            if self.link.credit < want // 2 or (self.link.credit == 0 and want > 0):
                self.link.flow(want)
            self.device.wake()

    # ------------------------------------------------------------------ ending

    def detach_forced(self) -> bool:
        """The hub is reachable and the device's backlog is empty: detach, so the
        device attaches again, through to the hub. False while messages are still
        being stored (they are the backlog's newest)."""
        if self.pending or not self.open:
            return False
        self.link.detach(amqp_error(DETACH_FORCED, HUB_REACHABLE), True)
        log.info("device %s: local telemetry link of %s detached: %s", self.device.id, self.key,
                 HUB_REACHABLE)  # fmt: skip
        self._end()
        self.device.wake()
        return True

    def on_detach(self, closed: bool) -> None:
        """The device detached (or the engine did, e.g. a message over 256 KiB).
        Messages received but not yet stored are dropped unacknowledged: the device
        sends them again."""
        if self.link.state is LinkState.DETACH_RCVD:
            self.link.detach(None, closed)
        self._end()
        self.device.wake()

    def device_lost(self) -> None:
        self._end()

    def _end(self) -> None:
        if self.gone:
            return
        self.gone = True
        dropped = len(self._queue)
        self._queue.clear()
        self.pending -= dropped
        self.owner.link_gone(self)


__all__ = ["CREDIT", "DETACH_FORCED", "HUB_REACHABLE", "LocalLink", "LocalOwner",
           "MAX_MESSAGE_SIZE", "Meta", "decode_meta", "encode_meta", "telemetry_key"]  # fmt: skip
