"""CBS on shared upstream connections (design items 7 and 8).

Direction: below the connections; imports only `linkpair` (error helpers).
What CBS needs of the router, the connections and a binding is declared here
(`CbsRouter`, `CbsDevice`, `CbsUpstream`, `CbsBinding`).

SDKs reuse CBS link names, reply-to values and message-ids, so on an
upstream connection shared by many devices `$cbs` cannot be tunnelled link
for link. Instead:

- `DeviceCbs` serves `$cbs` to one device connection locally: it answers the
  device's CBS links and takes its put-token requests;
- `GatewayCbs` owns one CBS link pair per upstream connection and forwards
  each request there with a gateway-unique message-id and reply-to (the only
  properties rewritten; every other section keeps its bytes); the hub's reply
  is matched by correlation-id, gets the device's own message-id back as its
  correlation-id, and goes to the device that asked.

A reply with status 200 (or 202) authorises the request's audience for that
device connection only (`Binding.authorise`).

A reply reaches the device after the hub's outcome for its request: a hub that
answers first (proton-based ones write the reply before the disposition) has
the reply held until the outcome is relayed, for at most HOLD_REPLY_MAX.
IoT Hub orders them that way, and uamqp-c (the Azure IoT C SDK's AMQP layer)
fails a put-token whose reply overtakes the request's settlement.

A hub that sets `to` on its reply addresses it to the gateway's reply link;
the device gets its own reply-to back there (only then, only that property).
A request no upstream connection can take (the connector's pool is full, or
the hub cannot be reached) is rejected if the device sent it unsettled and,
either way, answered with a CBS reply (status-code 500 or 503 and a
status-description; correlation-id = the request's message-id), so SDKs
waiting for a status get one.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from gateway.amqp import Delivery, Link, LinkState, LocalProtocolError, Session
from gateway.amqp.errors import AMQPError
from gateway.amqp.message import (
    APPLICATION_PROPERTIES,
    PROPERTIES,
    AmqpValue,
    Message,
    Properties,
    decode_section,
    encode_message,
    replace_section,
    split_sections,
)
from gateway.amqp.performatives import Accepted, Attach, Rejected, Source, Target
from gateway.amqp.types import Int

from .linkpair import RESOURCE_LIMIT, amqp_error

log = logging.getLogger("gateway.router.cbs")


class CbsRouter(Protocol):
    """What CBS needs of the router (`core.Router`)."""

    @property
    def container_id(self) -> str: ...
    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool: ...
    def forward_cbs_request(self, device: Any, connector: str, req: CbsRequest,
                            delivery: Delivery, settled: bool) -> None: ...  # fmt: skip


class CbsDevice(Protocol):
    """A device connection served `$cbs` (`device.DeviceConn`)."""

    @property
    def id(self) -> str: ...
    @property
    def router(self) -> CbsRouter: ...
    @property
    def closed(self) -> bool: ...
    @property
    def cbs(self) -> DeviceCbs | None: ...
    def remember_token(self, connector: str, audience: str, request: CbsRequest) -> None: ...
    def wake(self) -> None: ...


class CbsUpstream(Protocol):
    """An upstream connection carrying the gateway's CBS links (`upstream.UpstreamConn`)."""

    @property
    def id(self) -> str: ...
    @property
    def router(self) -> CbsRouter: ...
    def control_session(self) -> Session: ...
    def drop_cbs(self, cbs: GatewayCbs) -> None: ...
    def wake(self) -> None: ...


class CbsBinding(Protocol):
    """A device's place on an upstream connection (`core.Binding`)."""

    @property
    def device(self) -> CbsDevice: ...
    @property
    def connector(self) -> str: ...
    def authorise(self, audience: str) -> None: ...
    def put_finished(self) -> None: ...

CBS_ADDRESS = "$cbs"
PUT_TOKEN = "put-token"
SAS_TOKEN_TYPE = "servicebus.windows.net:sastoken"
# Requests a device may have in flight on its CBS sender link.
DEVICE_CBS_CREDIT = 16
# Replies the hub may have in flight on the gateway's CBS receiver link.
GATEWAY_CBS_CREDIT = 100
# Unanswered put-tokens kept per upstream connection; beyond it the oldest is dropped.
MAX_PENDING = 2000
# Longest a CBS reply waits for the hub's outcome of its request (see GatewayCbs._hold).
HOLD_REPLY_MAX = 2.0

_OK_STATUS = (200, 202)
# CBS status of a request the gateway could not forward: the connector's pool is
# full (like the hub's own 500 for too many tokens), or the hub is unreachable.
STATUS_POOL_FULL = 500
STATUS_UNREACHABLE = 503


def is_cbs_address(normalised: str) -> bool:
    return normalised == CBS_ADDRESS or normalised.startswith(CBS_ADDRESS + "/")


# --------------------------------------------------------------------------- messages


@dataclass(slots=True)
class CbsRequest:
    """What the router needs from a put-token request (the bytes stay as sent)."""

    raw: bytes
    properties: Properties
    operation: str | None
    audience: str | None


def _read_sections(data: bytes) -> tuple[Properties, dict[Any, Any]]:
    """A CBS message's properties and application-properties (each empty if absent);
    raise AMQPError if malformed."""
    props: Properties | None = None
    app: dict[Any, Any] = {}
    for code, start, end in split_sections(data):
        if code == PROPERTIES:
            props = decode_section(data, start, end)
        elif code == APPLICATION_PROPERTIES:
            app = decode_section(data, start, end).value or {}
    return (Properties() if props is None else props), app


def parse_request(raw: bytes | memoryview) -> CbsRequest:
    """Read properties and application-properties; raise AMQPError if malformed."""
    data = bytes(raw)
    props, app = _read_sections(data)
    operation = app.get("operation")
    name = app.get("name")
    return CbsRequest(
        data,
        props,
        str(operation) if operation is not None else None,
        str(name) if name is not None else None,
    )


def rewrite_request(req: CbsRequest, message_id: str, reply_to: str) -> bytes:
    """The request with only message-id and reply-to replaced."""
    props = dataclasses.replace(req.properties, message_id=message_id, reply_to=reply_to)
    return replace_section(req.raw, PROPERTIES, props)


@dataclass(slots=True)
class CbsReply:
    raw: bytes
    properties: Properties
    status: int | None
    description: str | None


def parse_reply(raw: bytes | memoryview) -> CbsReply:
    data = bytes(raw)
    props, app = _read_sections(data)
    status = app.get("status-code")
    try:
        status_code = int(status) if status is not None else None
    except (TypeError, ValueError):
        status_code = None
    desc = app.get("status-description")
    return CbsReply(data, props, status_code, None if desc is None else str(desc))


def restore_reply(reply: CbsReply, correlation_id: Any, reply_to: Any = None,
                  gateway_reply_to: str | None = None) -> bytes:  # fmt: skip
    """The reply with the device's own message-id as correlation-id and, where the
    hub addressed it to the gateway's reply link (`to` = `gateway_reply_to`), the
    device's own reply-to as `to`. Nothing else changes."""
    changes: dict[str, Any] = {"correlation_id": correlation_id}
    to = reply.properties.to
    if gateway_reply_to is not None and to is not None and str(to) == gateway_reply_to:
        changes["to"] = reply_to
    props = dataclasses.replace(reply.properties, **changes)
    return replace_section(reply.raw, PROPERTIES, props)


def status_reply(correlation_id: Any, reply_to: Any, status: int, description: str) -> bytes:
    """A CBS reply the gateway writes itself (the request never reached the hub)."""
    return encode_message(
        Message(
            properties=Properties(to=reply_to, correlation_id=correlation_id),
            application_properties={"status-code": Int(status), "status-description": description},
            body=[AmqpValue(None)],
        )
    )


def put_token_message(audience: str, token: str, message_id: str, reply_to: str) -> bytes:
    """A put-token request the gateway sends on a device's behalf (SASL PLAIN devices)."""
    return encode_message(
        Message(
            properties=Properties(message_id=message_id, to=CBS_ADDRESS, reply_to=reply_to),
            application_properties={
                "operation": PUT_TOKEN,
                "type": SAS_TOKEN_TYPE,
                "name": audience,
            },
            body=[AmqpValue(token)],
        )
    )


# ----------------------------------------------------------------------- device side


class DeviceCbs:
    """The `$cbs` node as one device connection sees it, served by the gateway."""

    def __init__(self, device: CbsDevice) -> None:
        self.device = device
        self.senders: list[Link] = []  # the device's request links (we receive)
        self.receivers: list[Link] = []  # the device's reply links (we send)
        self._tags = itertools.count()
        # Requests handed to the router and not yet forwarded upstream, with their
        # delivery: if the router cannot forward one, it is answered from here.
        self._waiting: list[tuple[CbsRequest, Delivery, bool]] = []

    def attach(self, link: Link, attach: Attach, connector: str) -> None:
        link.context = ("cbs", connector)
        link.answer_attach(source=attach.source, target=attach.target)
        if link.is_receiver:
            self.senders.append(link)
            link.flow(DEVICE_CBS_CREDIT)
        else:
            self.receivers.append(link)
        self.device.wake()

    def detached(self, link: Link, closed: bool) -> None:
        if link.state is LinkState.DETACH_RCVD:
            link.detach(None, closed)
        for links in (self.senders, self.receivers):
            if link in links:
                links.remove(link)
        self.device.wake()

    def on_request(self, link: Link, ev: Any) -> None:
        """A message on a device's CBS sender link."""
        if ev.aborted:
            return
        if link.credit < DEVICE_CBS_CREDIT // 2 and link.state is LinkState.ATTACHED:
            link.flow(DEVICE_CBS_CREDIT)
        _, connector = link.context
        try:
            req = parse_request(ev.payload)
        except AMQPError as exc:
            self._reject(ev, amqp_error(exc.condition, f"malformed CBS request: {exc.description}"))
            return
        self._waiting.append((req, ev.delivery, bool(ev.settled)))
        self.device.router.forward_cbs_request(self.device, connector, req, ev.delivery, ev.settled)
        self.device.wake()

    def forwarded(self, req: CbsRequest) -> None:
        """`req` went upstream: the hub answers it."""
        for i, entry in enumerate(self._waiting):
            if entry[0] is req:
                del self._waiting[i]
                return

    def _reject(self, ev: Any, error: Any) -> None:
        if not ev.settled:
            ev.delivery.settle(Rejected(error))
        self.device.wake()

    def fail_request(self, delivery: Delivery | None, condition: str, description: str,
                     request: CbsRequest | None = None) -> None:  # fmt: skip
        """No upstream could take the request: reject it if unsettled (the device
        retries) and answer it with a CBS status reply.

        `delivery` is None for a request the device sent settled; `request` is
        found among the waiting ones when not given.
        """
        if delivery is not None and not delivery.settled and not delivery.remote_settled:
            delivery.settle(Rejected(amqp_error(condition, description)))
        entry = self._take_waiting(delivery, request)
        if entry is not None:
            props = entry[0].properties
            status = STATUS_POOL_FULL if condition == RESOURCE_LIMIT else STATUS_UNREACHABLE
            reply = status_reply(props.message_id, props.reply_to, status, description)
            if not self.deliver_reply(reply, props.reply_to):
                log.info("device %s: CBS status reply dropped, no CBS receiver link",
                         self.device.id)  # fmt: skip
        self.device.wake()

    def _take_waiting(self, delivery: Delivery | None,
                      request: CbsRequest | None) -> tuple[CbsRequest, Delivery, bool] | None:  # fmt: skip
        """The waiting request failed: by request, else by its (unsettled) delivery,
        else the oldest one sent settled (the router names none of those)."""
        for i, (req, d, settled) in enumerate(self._waiting):
            if request is not None:
                found = req is request
            elif delivery is not None:
                found = d is delivery
            else:
                found = settled
            if found:
                return self._waiting.pop(i)
        return None

    def deliver_reply(self, payload: bytes, reply_to: Any) -> bool:
        """Send a reply on the device's CBS receiver link (the one reply-to names,
        else the most recently attached). False if the device has none open."""
        link = None
        open_links = [r for r in self.receivers if r.state is LinkState.ATTACHED]
        if reply_to is not None:
            for r in open_links:
                tgt = r.remote_target
                if tgt is not None and getattr(tgt, "address", None) == reply_to:
                    link = r
                    break
        if link is None and open_links:
            link = open_links[-1]
        if link is None:
            return False
        # Pre-settled, as the hub sends replies, unless the device's attach asked
        # for unsettled deliveries (snd-settle-mode 0).
        mode = link.remote_attach.snd_settle_mode if link.remote_attach is not None else 2
        settled = mode != 0
        tag = next(self._tags).to_bytes(8, "big")
        try:
            link.send_transfer(tag, payload, settled=settled)
        except LocalProtocolError:
            return False
        self.device.wake()
        return True

    def close(self) -> None:
        for link in self.senders + self.receivers:
            if link.state not in (LinkState.DETACH_SENT, LinkState.DETACHED):
                link.detach(None, True)
        self.senders.clear()
        self.receivers.clear()
        self._waiting.clear()


# ---------------------------------------------------------------------- upstream side


@dataclass(slots=True, eq=False)
class PendingPut:
    binding: CbsBinding
    audience: str | None
    original_message_id: Any
    original_reply_to: Any
    to_device: bool  # relay the reply to the device (False: the gateway's own put)
    device_delivery: Delivery | None = None  # the device's unsettled request
    on_done: Callable[[int | None, str | None], None] | None = None
    request: CbsRequest | None = None  # kept to put again on a new upstream connection
    # The reply, held until the hub's outcome for the request has reached the device.
    held_reply: bytes | None = None


class GatewayCbs:
    """The gateway's own CBS link pair on one upstream connection."""

    _serial = itertools.count(1)

    def __init__(self, upstream: CbsUpstream) -> None:
        self.upstream = upstream
        n = next(self._serial)
        gw = upstream.router.container_id
        self.reply_to = f"cbs-{gw}-{n}"
        self._ids = itertools.count(1)
        self._id_prefix = f"{gw}:{n}:"
        self._tags = itertools.count()
        self.pending: dict[str, PendingPut] = {}
        # Replies waiting for their request's outcome to reach the device, by its delivery.
        self.held: dict[Delivery, PendingPut] = {}
        session = upstream.control_session()
        self.sender = session.attach(
            f"$cbs-sender-{gw}-{n}",
            False,
            Source(address=self.reply_to),
            Target(address=CBS_ADDRESS),
        )
        self.receiver = session.attach(
            f"$cbs-receiver-{gw}-{n}",
            True,
            Source(address=CBS_ADDRESS),
            Target(address=self.reply_to),
        )
        self.sender.context = self
        self.receiver.context = self
        upstream.wake()

    def on_attach(self, link: Link) -> None:
        """The hub answered one of our attaches: grant the reply link credit."""
        if link is self.receiver and link.is_open:
            link.flow(GATEWAY_CBS_CREDIT)
            self.upstream.wake()

    @property
    def usable(self) -> bool:
        return all(
            link.state in (LinkState.ATTACH_SENT, LinkState.ATTACHED)
            for link in (self.sender, self.receiver)
        )

    def next_message_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def forward(self, req: CbsRequest, pending: PendingPut, settled: bool) -> Delivery:
        if pending.to_device:
            device_cbs = pending.binding.device.cbs
            if device_cbs is not None:
                device_cbs.forwarded(req)
        message_id = self.next_message_id()
        raw = rewrite_request(req, message_id, self.reply_to)
        return self._send(raw, message_id, pending, settled)

    def put_token(self, audience: str, token: str, pending: PendingPut) -> Delivery:
        message_id = self.next_message_id()
        raw = put_token_message(audience, token, message_id, self.reply_to)
        return self._send(raw, message_id, pending, False)

    def _send(self, raw: bytes, message_id: str, pending: PendingPut, settled: bool) -> Delivery:
        if len(self.pending) >= MAX_PENDING:
            oldest = next(iter(self.pending))
            self._complete(self.pending.pop(oldest), None, "no reply from the hub")
        self.pending[message_id] = pending
        tag = next(self._tags).to_bytes(8, "big")
        d = self.sender.send_transfer(tag, raw, settled=settled)
        if pending.device_delivery is not None and not settled:
            d.context = pending.device_delivery
            pending.device_delivery.context = d
        self.upstream.wake()
        return d

    def on_reply(self, ev: Any) -> None:
        if ev.aborted:
            return
        if not ev.settled:
            ev.delivery.settle(Accepted())
        if self.receiver.credit < GATEWAY_CBS_CREDIT // 2 and self.receiver.is_open:
            self.receiver.flow(GATEWAY_CBS_CREDIT)
        self.upstream.wake()
        try:
            reply = parse_reply(ev.payload)
        except AMQPError as exc:
            log.warning("upstream %s: malformed CBS reply dropped: %s", self.upstream.id, exc)
            return
        corr = reply.properties.correlation_id
        pending = self.pending.pop(str(corr), None) if corr is not None else None
        if pending is None:
            log.warning("upstream %s: CBS reply for an unknown request dropped", self.upstream.id)
            return
        if reply.status in _OK_STATUS and pending.audience:
            pending.binding.authorise(pending.audience)
            if pending.request is not None:
                pending.binding.device.remember_token(
                    pending.binding.connector, pending.audience, pending.request
                )
        if pending.to_device:
            device = pending.binding.device
            if not device.closed and device.cbs is not None:
                payload = restore_reply(reply, pending.original_message_id,
                                        pending.original_reply_to, self.reply_to)  # fmt: skip
                request = pending.device_delivery
                if request is not None and request.context is not None and not request.settled:
                    # The hub answered before settling the request. uamqp-c (the Azure C
                    # SDK) fails a put-token whose reply overtakes the request's outcome,
                    # so the reply waits for that outcome, as IoT Hub orders them.
                    self._hold(request, pending, payload)
                else:
                    self._deliver(pending, payload)
        self._complete(pending, reply.status, reply.description)

    def _hold(self, request: Delivery, pending: PendingPut, payload: bytes) -> None:
        """Keep `payload` until the hub's outcome for `request` has been relayed to the
        device (`on_disposition`), or HOLD_REPLY_MAX has passed: a hub that never
        settles its CBS requests still gets its replies through."""
        pending.held_reply = payload
        self.held[request] = pending
        if len(self.held) > MAX_PENDING:
            self._release(next(iter(self.held)))
        self.upstream.router.start_soon(self._release_later, request)

    async def _release_later(self, request: Delivery) -> None:
        await trio.sleep(HOLD_REPLY_MAX)
        self._release(request)

    def _release(self, request: Delivery) -> None:
        pending = self.held.pop(request, None)
        if pending is not None and pending.held_reply is not None:
            payload, pending.held_reply = pending.held_reply, None
            self._deliver(pending, payload)

    def _deliver(self, pending: PendingPut, payload: bytes) -> None:
        device = pending.binding.device
        if device.closed or device.cbs is None:
            return
        if not device.cbs.deliver_reply(payload, pending.original_reply_to):
            log.info("device %s: CBS reply dropped, no CBS receiver link", device.id)

    def on_disposition(self) -> None:
        """The hub's outcome for forwarded requests was relayed: held replies whose
        request the device now has settled go out."""
        for request, pending in list(self.held.items()):
            if request.settled or request.context is None or pending.binding.device.closed:
                self._release(request)

    @staticmethod
    def _complete(pending: PendingPut, status: int | None, description: str | None) -> None:
        pending.binding.put_finished()
        if pending.on_done is not None:
            pending.on_done(status, description)

    def on_detach(self, link: Link, error: Any) -> None:
        """The hub detached one of our CBS links: requests in flight are lost."""
        if link.state is LinkState.DETACH_RCVD:
            link.detach(None, True)
        self.fail_all(error)
        self.upstream.drop_cbs(self)

    def fail_all(self, error: Any = None) -> None:
        for request in list(self.held):  # the hub answered these: the devices get it
            self._release(request)
        pending = list(self.pending.values())
        self.pending.clear()
        for p in pending:
            self._complete(p, None, "upstream CBS link lost")

    def close(self) -> None:
        for link in (self.sender, self.receiver):
            if link.state not in (LinkState.DETACH_SENT, LinkState.DETACHED):
                link.detach(None, True)
        self.fail_all()
