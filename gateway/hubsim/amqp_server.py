"""The hub's AMQP 1.0 front: TLS (Python ssl), SASL (amqp_frames), then proton's engine.

Each TLS connection is an asyncio protocol that feeds a proton ``Transport`` and
answers the ``Collector``'s events: ``$cbs`` put-token, the device nodes
(telemetry, C2D, twin, methods) and the service feedback node.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from cproton import (
    ffi,
    lib,
    pn_message_get_content_encoding,
    pn_message_get_content_type,
)
from proton import (
    Collector,
    Condition,
    Connection,
    Delivery,
    Endpoint,
    Event,
    Link,
    Message,
    Receiver,
    Sender,
    Terminus,
    Transport,
    int32,
    symbol,
)

from .amqp_frames import (
    AMQP_HEADER,
    SASL_HEADER,
    FrameError,
    SaslResult,
    SaslServer,
    TransferSniffer,
    owned,
)
from .certs import peer_common_name
from .netutil import TrackingSocket, drop, end_handshakes, tracking_listener
from .records import CbsRecord, D2CRecord, LinkRecord, Recorder
from .state import SERVICE, C2DMessage, HubState, MethodCall, identity_from_path

log = logging.getLogger("gateway.hubsim.amqp")

CREDIT_WINDOW = 100
MAX_FRAME_SIZE = 65536
# MSSBCBS: the Azure stacks' "token follows over CBS" (uamqp-c asks for nothing else).
SASL_MECHANISMS = ["MSSBCBS", "EXTERNAL", "PLAIN", "ANONYMOUS"]
# D2C limit: 256 KiB like the hub, plus room for properties and section framing.
DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024 + 16 * 1024

_conn_ids = itertools.count(1)


def delivery_tag(delivery: Delivery) -> bytes:
    """The raw tag: proton's Python binding decodes tags as UTF-8, which binary tags are not."""
    tag = lib.pn_delivery_tag(delivery._impl)
    return bytes(ffi.buffer(tag.start, tag.size))


def split_address(address: str | None) -> list[str] | None:
    """`amqps://host[:port]/devices/x`, `/devices/x`, `devices/x` -> decoded segments."""
    if address is None:
        return None
    if "://" in address:
        address = address.split("://", 1)[1]
        address = address.partition("/")[2]
    return [unquote(s) for s in address.strip("/").split("/") if s]


def classify(segments: list[str]) -> tuple[str, str | None] | None:
    """Map an address to (node kind, identity)."""
    if segments == ["$cbs"]:
        return "cbs", None
    if [s.lower() for s in segments] == ["messages", "servicebound", "feedback"]:
        return "feedback", None
    for split, tail in ((2, segments[2:]), (4, segments[4:])):
        identity = identity_from_path(segments[:split])
        if identity is None:
            continue
        if tail == ["messages", "events"]:
            return "events", identity
        if [t.lower() for t in tail] == ["messages", "devicebound"]:
            return "devicebound", identity
        if tail == ["twin"]:
            return "twin", identity
        if tail == ["methods", "devicebound"]:
            return "methods", identity
    return None


# node kind -> roles the hub takes ("receiver": the device sends)
NODE_ROLES = {
    "cbs": {"sender", "receiver"},
    "events": {"receiver"},
    "devicebound": {"sender"},
    "twin": {"sender", "receiver"},
    "methods": {"sender", "receiver"},
    "feedback": {"sender"},
}


def message_properties(msg: Message) -> dict[str, Any]:
    props = {
        "message-id": msg.id,
        "user-id": bytes(msg.user_id) if msg.user_id else None,
        "to": msg.address,
        "subject": msg.subject,
        "reply-to": msg.reply_to,
        "correlation-id": msg.correlation_id,
        # proton's Message turns an absent symbol into symbol("None"); read the C values.
        "content-type": pn_message_get_content_type(msg._msg),
        "content-encoding": pn_message_get_content_encoding(msg._msg),
        "absolute-expiry-time": msg.expiry_time or None,
        "creation-time": msg.creation_time or None,
        "group-id": msg.group_id,
        "group-sequence": msg.group_sequence or None,
        "reply-to-group-id": msg.reply_to_group_id,
    }
    return {k: owned(v) for k, v in props.items() if v not in (None, "", b"")}


def body_bytes(msg: Message) -> bytes:
    body = msg.body
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, list) and all(isinstance(b, (bytes, memoryview)) for b in body):
        return b"".join(bytes(b) for b in body)
    return b"" if body is None else repr(body).encode()


class AmqpC2DConsumer:
    """A device's receiver on /devices/{id}/messages/devicebound."""

    protocol = "amqp"

    def __init__(self, conn: AmqpConnection, link: Sender) -> None:
        self.conn = conn
        self.link = link

    def offer(self, msg: C2DMessage) -> bool:
        if self.link.state & Endpoint.LOCAL_CLOSED or self.link.credit <= 0:
            return False
        self.conn.send_c2d(self.link, msg)
        return True


class AmqpMethodTarget:
    def __init__(self, conn: AmqpConnection, link: Sender) -> None:
        self.conn = conn
        self.link = link

    def send_method(self, call: MethodCall) -> bool:
        if self.link.state & Endpoint.LOCAL_CLOSED:
            return False
        msg = Message(
            correlation_id=uuid.UUID(int=int(call.request_id, 16)),
            properties={"IoThub-methodname": call.name},
            body=call.payload,
        )
        msg.inferred = True
        self.conn.send_response(self.link, msg)
        return True


class AmqpTwinWatcher:
    def __init__(self, conn: AmqpConnection, identity: str) -> None:
        self.conn = conn
        self.identity = identity

    def desired_changed(self, patch: dict[str, Any], version: int) -> None:
        link = self.conn.twin_senders.get(self.identity)
        if link is None:
            return
        msg = Message(
            annotations={symbol("version"): version},
            body=json.dumps(patch).encode(),
        )
        msg.inferred = True
        self.conn.send_response(link, msg)


class AmqpConnection(asyncio.Protocol):
    sasl_mechanisms = SASL_MECHANISMS

    def __init__(self, server: AmqpServer) -> None:
        self.server = server
        self.state: HubState = server.state
        self.recorder: Recorder = server.state.recorder
        self.id = next(_conn_ids)
        self.transport: asyncio.Transport | None = None
        self.phase = "header"
        self.header = bytearray()
        self.sasl: SaslServer | None = None
        self.pt: Transport | None = None
        self.conn: Connection | None = None
        self.collector: Collector | None = None
        self.sniffer = TransferSniffer(1 << 31)
        self.fixed_identities: set[str] = set()  # SASL PLAIN / certificate: for the connection's life
        self.tokens: dict[str, float] = {}  # identity -> CBS token valid-until (epoch)
        self.connected_identities: list[str] = []
        self.cert_identity: str | None = None
        self.cbs_senders: list[Sender] = []
        self.twin_senders: dict[str, Sender] = {}
        self.twin_watchers: dict[str, AmqpTwinWatcher] = {}
        self.outq: dict[Sender, deque[tuple[Message, bool, Callable[[Delivery], None] | None]]] = {}
        self.tags = itertools.count(1)
        self.tick_handle: asyncio.TimerHandle | None = None
        self.expiry_handles: list[asyncio.TimerHandle] = []
        self.processing = False
        self.closed = False
        self.close_reason = ""

    # -- socket side -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)
        cn = peer_common_name(transport.get_extra_info("ssl_object"))
        if cn is not None and cn in self.state.devices:
            self.cert_identity = cn
        self.recorder.connection_opened(self.server.label, self.id)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.tick_handle:
            self.tick_handle.cancel()
        for handle in self.expiry_handles:
            handle.cancel()
        self._forget_links()
        reason = self.close_reason or (f"peer: {exc}" if exc else "peer closed")
        self.recorder.connection_closed(self.server.label, self.id, self.connected_identities, reason)

    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except FrameError as exc:
            log.info("amqp connection %d: framing error: %s", self.id, exc)
            self.abort(f"framing error: {exc}")
        except Exception:
            log.exception("amqp connection %d: internal error", self.id)
            self.abort("internal error")

    def eof_received(self) -> bool | None:
        if self.pt is not None:
            self.pt.close_tail()
            self.process()
        return None

    def _receive(self, data: bytes) -> None:
        if self.phase == "header":
            self.header += data
            if len(self.header) < 8:
                return
            head, data = bytes(self.header[:8]), bytes(self.header[8:])
            if head == SASL_HEADER:
                self.phase = "sasl"
                self.sasl = SaslServer(self.sasl_mechanisms, self._authenticate)
                self._write(self.sasl.greeting())
            elif head == AMQP_HEADER:
                # No SASL layer: identity from a client certificate only (the C SDK's X.509 mode).
                self._start_engine(head + data)
                return
            else:
                self._write(SASL_HEADER)
                self.close_socket(f"unsupported protocol header {head!r}")
                return
        if self.phase == "sasl":
            assert self.sasl is not None
            out, rest = self.sasl.receive(data)
            result = self.sasl.result
            if result is not None:
                self._record_auth(result)  # recorded before the device can see the outcome
            if out:
                self._write(out)
            if result is None:
                return
            if not result.ok:
                self.close_socket(f"SASL {result.mechanism} refused: {result.description}")
                return
            if result.identity:
                self._authorise_fixed(result.identity)
            self._start_engine(rest)
            return
        if self.phase == "amqp":
            self._push(data)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close_socket(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str, reset: bool = False) -> None:
        self.close_reason = self.close_reason or reason
        if self.transport is not None:
            if reset:
                drop(self.transport, reset=True)
            else:
                self.transport.abort()

    def disconnect(self, condition: str, description: str) -> None:
        """Close the AMQP connection with an error (the hub going away)."""
        self.close_reason = self.close_reason or f"{condition}: {description}"
        if self.conn is not None and not self.conn.state & Endpoint.LOCAL_CLOSED:
            self.conn.condition = Condition(condition, description)
            self.conn.close()
            self.process()
        self.close_socket(self.close_reason)

    # -- SASL ---------------------------------------------------------------------------

    def _authenticate(self, mech: str, response: bytes | None, hostname: str | None) -> SaslResult:
        if mech in ("ANONYMOUS", "MSSBCBS"):
            return SaslResult(mech, True)
        if mech == "EXTERNAL":
            if self.cert_identity is None:
                return SaslResult(mech, False, description="no trusted client certificate")
            return SaslResult(mech, True, self.cert_identity)
        # PLAIN: authzid NUL authcid NUL password; user {id}@sas.{hub} or {id}/modules/{m}@sas.{hub}
        parts = (response or b"").split(b"\x00")
        if len(parts) != 3:
            return SaslResult(mech, False, description="malformed PLAIN response")
        user, password = parts[1].decode(errors="replace"), parts[2].decode(errors="replace")
        name, _, realm = user.rpartition("@")
        hub = self.state.hub_name
        if realm.lower() == f"sas.root.{hub}".lower():
            audience = self.state.hub_host
        elif realm.lower() == f"sas.{hub}".lower():
            dev, sep, mod = name.partition("/modules/")
            identity = f"{dev}/{mod}" if sep else dev
            audience = self.state.resource_of(identity)
        else:
            return SaslResult(mech, False, description=f"user {user!r} is not of this hub")
        check = self.state.check_token(password, audience)
        if check.status != 200:
            return SaslResult(mech, False, check.identity, check.description)
        return SaslResult(mech, True, check.identity, "OK")

    def _record_auth(self, result: SaslResult) -> None:
        from .records import AuthRecord

        self.recorder.add(
            "auth",
            AuthRecord("amqp", result.identity, result.mechanism, result.ok, result.description, self.id),
        )
        log.info(
            "amqp conn %d: SASL %s %s%s",
            self.id,
            result.mechanism,
            "accepted" if result.ok else "refused",
            f" for {result.identity}" if result.identity else "",
        )

    # -- identities -----------------------------------------------------------------------

    def _authorise_fixed(self, identity: str) -> None:
        self.fixed_identities.add(identity)
        self._note_connected(identity)

    def _note_connected(self, identity: str) -> None:
        if identity not in self.connected_identities:
            self.connected_identities.append(identity)
            self.recorder.device_connected("amqp", identity)

    def authorised(self, identity: str) -> bool:
        if identity in self.fixed_identities:
            return True
        until = self.tokens.get(identity)
        return until is not None and until > self.state.clock()

    # -- proton engine -------------------------------------------------------------------

    def _start_engine(self, data: bytes) -> None:
        self.phase = "amqp"
        if self.cert_identity is not None:
            self._authorise_fixed(self.cert_identity)
        self.pt = Transport(Transport.SERVER)
        self.pt.require_auth(False)
        self.pt.max_frame_size = MAX_FRAME_SIZE
        if self.server.idle_timeout:
            self.pt.idle_timeout = self.server.idle_timeout
        self.conn = Connection()
        self.collector = Collector()
        self.conn.collect(self.collector)
        self.pt.bind(self.conn)
        if data:
            self._push(data)
        else:
            self.process()

    def _push(self, data: bytes) -> None:
        assert self.pt is not None
        self.sniffer.feed(data)
        view = memoryview(data)
        while view:
            capacity = self.pt.capacity()
            if capacity < 0:
                break
            if capacity == 0:
                self.process()
                if self.pt.capacity() == 0:
                    # proton takes input as it parses it; a full buffer that stays full is a bug.
                    log.warning("amqp conn %d: proton accepts no more input", self.id)
                    self.abort("input stalled")
                    return
                continue
            self.pt.push(bytes(view[:capacity]))
            view = view[capacity:]
            self.process()
        self.process()

    def process(self) -> None:
        # Handlers may ask to process again; the running loop picks their events up.
        if self.pt is None or self.collector is None or self.closed or self.processing:
            return
        self.processing = True
        try:
            while True:
                event = self.collector.peek()
                if event is None:
                    break
                try:
                    self._dispatch(event)
                finally:
                    self.collector.pop()
            self._flush()
        finally:
            self.processing = False

    def _flush(self) -> None:
        assert self.pt is not None
        while True:
            pending = self.pt.pending()
            if pending < 0:
                self.close_socket(self.close_reason or "AMQP connection closed")
                break
            if pending == 0:
                break
            self._write(self.pt.peek(pending))
            self.pt.pop(pending)
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        assert self.pt is not None
        if self.tick_handle:
            self.tick_handle.cancel()
            self.tick_handle = None
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        deadline = self.pt.tick(loop.time())
        if deadline > 0:
            self.tick_handle = loop.call_at(deadline, self._on_tick)

    def _on_tick(self) -> None:
        self.tick_handle = None
        self.process()

    def _dispatch(self, event: Event) -> None:
        etype = event.type
        if etype == Event.CONNECTION_REMOTE_OPEN:
            conn = event.connection
            if conn.state & Endpoint.LOCAL_UNINIT:
                conn.container = self.server.container_id
                conn.open()
        elif etype == Event.CONNECTION_REMOTE_CLOSE:
            event.connection.close()
        elif etype == Event.SESSION_REMOTE_OPEN:
            if event.session.state & Endpoint.LOCAL_UNINIT:
                event.session.open()
        elif etype == Event.SESSION_REMOTE_CLOSE:
            event.session.close()
        elif etype == Event.LINK_REMOTE_OPEN:
            if event.link.state & Endpoint.LOCAL_UNINIT:
                self._on_attach(event.link)
        elif etype in (Event.LINK_REMOTE_CLOSE, Event.LINK_REMOTE_DETACH):
            link = event.link
            self._forget_link(link)
            if not link.state & Endpoint.LOCAL_CLOSED:
                if etype == Event.LINK_REMOTE_DETACH:
                    link.detach()
                else:
                    link.close()
        elif etype == Event.LINK_FLOW:
            link = event.link
            if link.is_sender:
                self._drain(link)
        elif etype == Event.DELIVERY:
            delivery = event.delivery
            if delivery.link.is_receiver:
                self._on_transfer(delivery)
            else:
                self._on_outcome(delivery)

    # -- links ------------------------------------------------------------------------------

    def _on_attach(self, link: Link) -> None:
        role = "receiver" if link.is_receiver else "sender"
        address = link.remote_target.address if link.is_receiver else link.remote_source.address
        segments = split_address(address)
        node = classify(segments) if segments is not None else None
        properties = dict(link.remote_properties or {})
        if node is None or role not in NODE_ROLES[node[0]]:
            self._refuse(link, address, role, None, "amqp:not-found", f"no node {address!r} for a {role}")
            return
        kind, identity = node
        if kind == "feedback" and not self.authorised(SERVICE):
            self._refuse(link, address, role, None, "amqp:unauthorized-access", "feedback needs a service token")
            return
        if identity is not None and not self.authorised(identity):
            self._refuse(
                link, address, role, identity, "amqp:unauthorized-access",
                f"no valid token for {identity!r} on this connection",
            )
            return
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        link.hub_kind = kind
        link.hub_identity = identity
        link.open()
        if isinstance(link, Receiver):
            link.flow(CREDIT_WINDOW)
        self.recorder.add("link", LinkRecord(self.id, address, role, link.name, identity, True, None, properties))
        if not isinstance(link, Sender):
            return
        self.outq[link] = deque()
        if kind == "cbs":
            self.cbs_senders.append(link)
        elif kind == "devicebound":
            assert identity is not None
            link.hub_consumer = AmqpC2DConsumer(self, link)
            self.state.add_c2d_consumer(identity, link.hub_consumer)
        elif kind == "twin":
            assert identity is not None
            self.twin_senders[identity] = link
        elif kind == "methods":
            assert identity is not None
            link.hub_target = AmqpMethodTarget(self, link)
            self.state.add_method_target(identity, link.hub_target)
        elif kind == "feedback":
            link.hub_sink = lambda record, link=link: self._send_feedback(link, record)
            self.state.feedback_sinks.append(link.hub_sink)

    def _refuse(
        self, link: Link, address: str | None, role: str, identity: str | None, condition: str, description: str
    ) -> None:
        # Refusal as the hub does it: an attach with a null terminus, then a detach with the error.
        if link.is_receiver:
            link.source.copy(link.remote_source)
            link.target.type = Terminus.UNSPECIFIED
        else:
            link.source.type = Terminus.UNSPECIFIED
            link.target.copy(link.remote_target)
        link.open()
        link.condition = Condition(condition, description)
        link.close()
        self.recorder.add(
            "link", LinkRecord(self.id, address, role, link.name, identity, False, condition)
        )
        log.info("amqp conn %d: attach %r refused: %s", self.id, address, condition)

    def _forget_link(self, link: Link) -> None:
        kind = getattr(link, "hub_kind", None)
        if kind is None or getattr(link, "hub_forgotten", False):
            return
        link.hub_forgotten = True
        identity = link.hub_identity
        if isinstance(link, Sender):
            self.outq.pop(link, None)
            if kind == "cbs" and link in self.cbs_senders:
                self.cbs_senders.remove(link)
            elif kind == "devicebound":
                self.state.remove_c2d_consumer(identity, link.hub_consumer)
            elif kind == "twin" and self.twin_senders.get(identity) == link:
                del self.twin_senders[identity]
            elif kind == "methods":
                self.state.remove_method_target(identity, link.hub_target)
            elif kind == "feedback" and link.hub_sink in self.state.feedback_sinks:
                self.state.feedback_sinks.remove(link.hub_sink)

    def _forget_links(self) -> None:
        if self.conn is None:
            return
        link = self.conn.link_head(0)
        while link is not None:
            self._forget_link(link)
            link = link.next(0)
        for identity, watcher in self.twin_watchers.items():
            self.state.unwatch_desired(identity, watcher)
        self.twin_watchers.clear()

    def revoke(self, identity: str, description: str) -> None:
        """Detach every link of an identity whose authorisation ended."""
        if self.conn is None:
            return
        link = self.conn.link_head(0)
        while link is not None:
            if getattr(link, "hub_identity", None) == identity and not link.state & Endpoint.LOCAL_CLOSED:
                self._forget_link(link)
                link.condition = Condition("amqp:unauthorized-access", description)
                link.close()
            link = link.next(0)
        watcher = self.twin_watchers.pop(identity, None)
        if watcher is not None:
            self.state.unwatch_desired(identity, watcher)
        self.process()

    # -- sending ------------------------------------------------------------------------------

    def send_response(
        self, link: Sender, msg: Message, on_outcome: Callable[[Delivery], None] | None = None
    ) -> None:
        settled = link.snd_settle_mode != Link.SND_UNSETTLED
        queue = self.outq.get(link)
        if queue is None:
            return
        queue.append((msg, settled and on_outcome is None, on_outcome))
        self._drain(link)
        self.process()

    def _drain(self, link: Sender) -> None:
        kind = getattr(link, "hub_kind", None)
        if kind == "devicebound":
            self.state.pump_c2d(link.hub_identity)
        queue = self.outq.get(link)
        while queue and link.credit > 0:
            msg, settled, on_outcome = queue.popleft()
            self._transfer(link, msg.encode(), f"{next(self.tags)}".encode(), settled, on_outcome)
        if link.drain_mode:
            link.drained()

    def _transfer(
        self,
        link: Sender,
        payload: bytes,
        tag: bytes,
        settled: bool,
        on_outcome: Callable[[Delivery], None] | None,
    ) -> Delivery:
        delivery = link.delivery(tag)
        link.send(payload)
        link.advance()
        if settled:
            delivery.settle()
        else:
            delivery.hub_on_outcome = on_outcome
        return delivery

    def send_c2d(self, link: Sender, msg: C2DMessage) -> None:
        props = msg.properties
        fields = {
            "id": props.get("message_id"),
            "correlation_id": props.get("correlation_id"),
            "content_type": props.get("content_type"),
            "content_encoding": props.get("content_encoding"),
            "user_id": props.get("user_id"),
        }
        out = Message(body=msg.body, **{k: v for k, v in fields.items() if v is not None})
        out.address = f"/devices/{msg.identity}/messages/deviceBound"
        out.delivery_count = msg.delivery_count
        out.inferred = True
        app = dict(msg.app_properties)
        if "ack" in props:
            app["iothub-ack"] = props["ack"]
        if app:
            out.properties = app
        lock_token = uuid.uuid4().bytes  # the hub's delivery tag is the 16-byte lock token
        settled = link.snd_settle_mode == Link.SND_SETTLED
        consumer = link.hub_consumer

        def outcome(delivery: Delivery) -> None:
            self.state.settle_c2d(msg, "amqp", lock_token, self._outcome_name(delivery), consumer)

        self._transfer(link, out.encode(), lock_token, settled, outcome)
        if settled:
            # Pre-settled delivery: the hub counts it completed once sent.
            asyncio.get_running_loop().call_soon(
                self.state.settle_c2d, msg, "amqp", lock_token, "accepted", consumer
            )
        self.process_soon()

    def process_soon(self) -> None:
        asyncio.get_running_loop().call_soon(self.process)

    @staticmethod
    def _outcome_name(delivery: Delivery) -> str:
        state = delivery.remote_state
        return {
            Delivery.ACCEPTED: "accepted",
            Delivery.REJECTED: "rejected",
            Delivery.RELEASED: "released",
            Delivery.MODIFIED: "modified",
        }.get(state, "accepted")

    def _on_outcome(self, delivery: Delivery) -> None:
        if not (delivery.updated or delivery.remote_state or delivery.settled):
            return
        terminal = delivery.remote_state in (
            Delivery.ACCEPTED, Delivery.REJECTED, Delivery.RELEASED, Delivery.MODIFIED
        )
        if not (terminal or delivery.settled):
            return
        callback = getattr(delivery, "hub_on_outcome", None)
        delivery.hub_on_outcome = None
        delivery.settle()
        if callback is not None:
            callback(delivery)

    def _send_feedback(self, link: Sender, record: Any) -> None:
        body = json.dumps(
            [
                {
                    "originalMessageId": record.message_id,
                    "description": record.status,
                    "statusCode": record.status,
                    "deviceId": record.device_id.partition("/")[0],
                    "enqueuedTimeUtc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            ]
        ).encode()
        msg = Message(body=body, content_type="application/vnd.microsoft.iothub.feedback.json")
        msg.inferred = True
        self.send_response(link, msg)

    # -- incoming transfers ---------------------------------------------------------------------

    def _on_transfer(self, delivery: Delivery) -> None:
        link = delivery.link
        if delivery.aborted:
            delivery.settle()
            return
        if not delivery.readable:
            return
        if not hasattr(delivery, "hub_size"):
            delivery.hub_buf = bytearray()
            delivery.hub_size = 0
        chunk = link.recv(delivery.pending) or b""
        delivery.hub_size += len(chunk)
        if delivery.hub_size <= self.server.max_message_size:
            delivery.hub_buf += chunk
        else:
            delivery.hub_buf = bytearray()  # over the limit: count, do not keep
        if delivery.partial:
            return
        data = bytes(delivery.hub_buf)
        tag = delivery_tag(delivery)
        fmt = self.sniffer.message_format(link.name, tag)
        kind = getattr(link, "hub_kind", None)
        if link.credit < CREDIT_WINDOW // 2:
            link.flow(CREDIT_WINDOW - link.credit)
        if delivery.hub_size > self.server.max_message_size:
            self._settle(
                delivery, Delivery.REJECTED,
                Condition(
                    "amqp:link:message-size-exceeded",
                    f"message of {delivery.hub_size} bytes exceeds {self.server.max_message_size}",
                ),
            )
            self.recorder.add("d2c-oversize", (link.hub_identity, delivery.hub_size))
            return
        msg = Message()
        try:
            msg.decode(data)
        except Exception as exc:
            self._settle(delivery, Delivery.REJECTED, Condition("amqp:decode-error", str(exc)))
            self.recorder.add("amqp-decode-error", (kind, str(exc)))
            return
        if kind == "events":
            self._on_d2c(delivery, link, msg, data, tag, fmt)
        elif kind == "cbs":
            # As IoT Hub: the request's disposition goes out before the reply (proton
            # would write the reply first); uamqp-c fails a put-token whose reply
            # arrives before its request was settled.
            self._settle(delivery, Delivery.ACCEPTED)
            if not self.server.reply_before_settle:
                self._flush()
            self._on_put_token(msg)
        elif kind == "twin":
            self._settle(delivery, Delivery.ACCEPTED)
            if not self.server.reply_before_settle:
                self._flush()
            self._on_twin_request(link.hub_identity, msg)
        elif kind == "methods":
            self._settle(delivery, Delivery.ACCEPTED)
            status = (msg.properties or {}).get("IoThub-status", 500)
            request_id = _method_request_id(msg.correlation_id)
            self.state.complete_method(request_id, int(status), body_bytes(msg))
        else:
            self._on_node_transfer(delivery, link, msg)

    def _on_node_transfer(self, delivery: Delivery, link: Link, msg: Message) -> None:
        """A transfer on a link of a node kind this front does not serve (subclasses may)."""
        self._settle(delivery, Delivery.REJECTED, Condition("amqp:not-allowed", "unexpected transfer"))

    def _settle(self, delivery: Delivery, outcome: Any, condition: Condition | None = None) -> None:
        if not delivery.settled:
            if condition is not None:
                delivery.local.condition = condition
            delivery.update(outcome)
        delivery.settle()

    def _on_d2c(
        self, delivery: Delivery, link: Link, msg: Message, raw: bytes, tag: bytes, fmt: int | None
    ) -> None:
        identity = link.hub_identity
        if not self.authorised(identity):
            self._settle(delivery, Delivery.REJECTED, Condition("amqp:unauthorized-access", "token expired"))
            return
        app = owned(dict(msg.properties or {}))
        record = D2CRecord(
            device_id=identity,
            protocol="amqp",
            body=body_bytes(msg),
            raw=raw,
            properties={**message_properties(msg), **app},
            message_format=fmt,
            delivery_tag=tag,
            settled=delivery.settled,
            app_properties=app,
            annotations=owned(dict(msg.annotations or {})),
            connection=self.id,
        )
        self.recorder.add("d2c", record)
        log.info("amqp conn %d: D2C from %s, %d bytes", self.id, identity, len(raw))
        self._settle(delivery, Delivery.ACCEPTED)

    # -- $cbs -------------------------------------------------------------------------------------

    def _on_put_token(self, req: Message) -> None:
        props = req.properties or {}
        token = req.body
        check = self.state.put_token(props.get("operation"), props.get("type"), props.get("name"), token)
        if check.status == 200 and check.identity is not None:
            until = self.state.token_valid_until(check.expiry)
            self.tokens[check.identity] = until
            if check.identity != SERVICE:
                self._note_connected(check.identity)
            loop = asyncio.get_running_loop()
            delay = max(0.0, until - self.state.clock())
            self.expiry_handles.append(loop.call_later(delay, self._check_expiry, check.identity))
        reply = Message(
            correlation_id=req.id,
            properties={"status-code": int32(check.status), "status-description": check.description},
        )
        link = self._cbs_reply_link(req.reply_to)
        self.recorder.add(
            "cbs",
            CbsRecord(
                audience=props.get("name"),
                device_id=check.identity,
                status=check.status,
                description=check.description,
                connection=self.id,
                token_type=props.get("type"),
                message_id=owned(req.id),
                reply_to=req.reply_to,
                replied=link is not None,
            ),
        )
        log.info(
            "amqp conn %d: CBS put-token %s -> %d %s",
            self.id, props.get("name"), check.status, check.description,
        )
        if link is not None:
            self.send_response(link, reply)

    def _cbs_reply_link(self, reply_to: str | None) -> Sender | None:
        """The sender whose target is the reply address; without reply-to, the last attached."""
        live = [s for s in self.cbs_senders if not s.state & Endpoint.LOCAL_CLOSED]
        if not live:
            return None
        if reply_to is None:
            return live[-1]
        for link in reversed(live):
            if link.remote_target.address == reply_to:
                return link
        # An SDK using a constant reply-to with one CBS pair (Java, Node) still gets its answer.
        return live[0] if len(live) == 1 else None

    def _check_expiry(self, identity: str) -> None:
        if self.closed:
            return
        until = self.tokens.get(identity)
        if until is None or until > self.state.clock():
            return
        del self.tokens[identity]
        if identity in self.fixed_identities:
            return
        log.info("amqp conn %d: token for %s expired", self.id, identity)
        self.recorder.add("token-expired", (self.id, identity))
        self.revoke(identity, "token expired")

    # -- twin -----------------------------------------------------------------------------------

    def _on_twin_request(self, identity: str, req: Message) -> None:
        ann = {str(k): v for k, v in (req.annotations or {}).items()}
        operation = str(ann.get("operation", ""))
        resource = str(ann.get("resource", ""))
        twin = self.state.twin(identity)
        body = b""
        if operation == "GET":
            status, version = 200, twin.reported_version
            body = json.dumps(twin.document()).encode()
        elif operation == "PATCH" and resource == "/properties/reported":
            status, version = self.state.patch_reported(identity, body_bytes(req))
        elif operation in ("PUT", "DELETE") and resource == "/notifications/twin/properties/desired":
            if operation == "PUT":
                watcher = self.twin_watchers.setdefault(identity, AmqpTwinWatcher(self, identity))
                self.state.watch_desired(identity, watcher)
            elif identity in self.twin_watchers:
                self.state.unwatch_desired(identity, self.twin_watchers.pop(identity))
            status, version = 200, twin.desired_version
        else:
            status, version = 400, twin.reported_version
        self.recorder.add("twin-request", (identity, "amqp", operation, resource, status))
        link = self.twin_senders.get(identity)
        if link is None:
            return
        reply = Message(
            correlation_id=req.correlation_id,
            annotations={symbol("status"): int32(status), symbol("version"): version},
            body=body or None,
        )
        if body:
            reply.inferred = True
        self.send_response(link, reply)


class AmqpServer:
    """Listens for TLS connections and serves them with AmqpConnection."""

    label = "amqp"  # the recorder's name for this front's connections
    connection_class: type[AmqpConnection] = AmqpConnection

    def __init__(
        self,
        state: HubState,
        container_id: str,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        idle_timeout: float | None = None,
    ) -> None:
        self.state = state
        self.container_id = container_id
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.connections: set[AmqpConnection] = set()
        self.server: asyncio.Server | None = None
        self.listener: TrackingSocket | None = None
        # True: answer $cbs and twin requests before settling them (proton's own order),
        # to test peers against hubs that do; IoT Hub settles first.
        self.reply_before_settle = False

    async def start(self, host: str, port: int, ssl_context: Any) -> int:
        loop = asyncio.get_running_loop()
        self.listener = tracking_listener(host, port)
        self.server = await loop.create_server(
            lambda: self.connection_class(self), sock=self.listener, ssl=ssl_context
        )
        return int(self.server.sockets[0].getsockname()[1])

    def open_links(self) -> list[LinkRecord]:
        """Links attached right now (both ends active), over all connections."""
        links = []
        for conn in list(self.connections):
            if conn.conn is None:
                continue
            link = conn.conn.link_head(0)
            while link is not None:
                if link.state & Endpoint.REMOTE_ACTIVE and link.state & Endpoint.LOCAL_ACTIVE:
                    is_receiver = link.is_receiver
                    address = link.remote_target.address if is_receiver else link.remote_source.address
                    links.append(
                        LinkRecord(
                            conn.id, address, "receiver" if is_receiver else "sender", link.name,
                            getattr(link, "hub_identity", None), True,
                        )
                    )
                link = link.next(0)
        return links

    def close_all(self, graceful: bool) -> None:
        for conn in list(self.connections):
            if graceful:
                conn.disconnect("amqp:connection:forced", "hub is closing the connection")
            else:
                conn.abort("killed", reset=True)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        end_handshakes(self.listener, [c.transport for c in self.connections if c.transport])
        self.close_all(graceful=False)
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            except TimeoutError:
                pass
            self.server = None


def _method_request_id(cid: Any) -> str:
    """The request id a method response answers. The request carried it as a UUID;
    the Node.js SDK sends it back as that UUID's string form unless it looks like a
    random (version 1-5) UUID, so both forms are taken."""
    if isinstance(cid, uuid.UUID):
        return f"{cid.int:x}"
    text = str(cid)
    try:
        return f"{uuid.UUID(text).int:x}"
    except ValueError:
        return text
