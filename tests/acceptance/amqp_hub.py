"""A minimal IoT-Hub-like AMQP 1.0 peer on python-qpid-proton, for black-box tests.

It listens with TLS (a trustme certificate), allows SASL ANONYMOUS, accepts every link
under `devices/` and `$cbs`, answers CBS put-token requests with status 200 on the link
whose target is the request's reply-to, records the exact bytes of every message it
receives, and can send cloud-to-device messages. Its reactor runs in a thread; tests
call into it through `call()` and read its records under a lock.
"""

from __future__ import annotations

import itertools
import queue
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proton import (
    Condition,
    Delivery,
    Endpoint,
    Handler,
    Link,
    Message,
    SSLDomain,
    Terminus,
    Transport,
    int32,
    symbol,
)
from proton.reactor import ApplicationEvent, Container, EventInjector

from tests.waiting import FAILSAFE

_SCHEME_HOST = re.compile(r"^amqps?://[^/]*")
_MESSAGE_FORMAT = re.compile(r"message-format=(0x[0-9a-fA-F]+|\d+)")


def raw_tag(dlv: Delivery) -> bytes:
    """The delivery tag as bytes (proton's `Delivery.tag` decodes it as UTF-8)."""
    from cproton_ffi import ffi, lib

    tag = lib.pn_delivery_tag(dlv._impl)
    return bytes(ffi.unpack(tag.start, tag.size))


def normalise(address: str | None) -> str:
    """The address the way a hub routes it: no scheme/host, no leading slash."""
    if not address:
        return ""
    return _SCHEME_HOST.sub("", address).lstrip("/")


@dataclass
class Received:
    """One complete message the hub received on a link (devices/... or $cbs)."""

    conn: int
    link_name: str
    address: str
    tag: bytes
    data: bytes
    remote_settled: bool
    delivery: Delivery | None = field(default=None, repr=False)


@dataclass
class Attach:
    conn: int
    name: str
    role: str  # the device's role: "sender" (hub receives) or "receiver"
    source: str | None
    target: str | None
    properties: dict[Any, Any] | None
    snd_settle_mode: int
    rcv_settle_mode: int
    max_message_size: int = 0


@dataclass
class Outcome:
    """A disposition the hub received for a message it sent (C2D)."""

    conn: int
    address: str
    tag: bytes
    state: int
    condition: str | None
    settled: bool
    failed: bool = False
    undeliverable: bool = False
    annotations: dict[Any, Any] | None = None


@dataclass
class Detach:
    conn: int
    name: str
    address: str
    condition: str | None
    closed: bool


@dataclass
class CbsRequest:
    conn: int
    message: Message
    reply_link: str | None


class AmqpHub:
    """Start with `start()`; `port` is the TLS port; `stop()` ends the reactor thread."""

    def __init__(self, cert_file: Path, key_file: Path, *, credit: int = 200) -> None:
        self.credit = credit
        self.port = 0
        self.lock = threading.Condition()
        self.received: list[Received] = []
        self.attaches: list[Attach] = []
        self.detaches: list[Detach] = []
        self.outcomes: list[Outcome] = []
        self.cbs_requests: list[CbsRequest] = []
        self.opens: list[dict[str, Any]] = []
        self.transfer_formats: list[int] = []  # message-format of each incoming transfer frame
        self.connections_opened = 0
        self.connections_closed = 0
        # Policy for D2C messages: called in the reactor thread with the Received record;
        # returns "accept", "hold" (leave it unsettled) or ("reject", condition, description).
        self.d2c_policy: Callable[[Received], Any] = lambda rec: "accept"
        self.cbs_status = 200
        # Attach policy: called with the normalised address; None admits the link, a
        # (condition, description) pair refuses it the way the hub does.
        self.attach_policy: Callable[[str], tuple[str, str] | None] = lambda address: None
        # Credit for device-sender links whose address starts with a key: granted once,
        # never topped up (tests grant more with `grant`).
        self.credit_limits: dict[str, int] = {}
        # Nodes this hub has: a link on any other address is refused with amqp:not-found.
        self.node_prefixes: tuple[str, ...] = ("$cbs", "devices/")
        self.link_properties: dict[Any, Any] = {symbol("com.microsoft:tracking-id"): "hub-link"}
        self.max_message_size = 262144
        self.drains = 0
        self.held: list[Received] = []
        self._tags = itertools.count()
        self._conn_ids = itertools.count(1)
        self._calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._injector = EventInjector()
        self._domain = SSLDomain(SSLDomain.MODE_SERVER)
        self._domain.set_credentials(str(cert_file), str(key_file), None)
        self._container = Container(_HubHandler(self))
        self._container.container_id = "acceptance-hub"
        self._container.selectable(self._injector)
        self._acceptor: Any = None
        self._thread: threading.Thread | None = None
        self._conns: dict[int, Any] = {}
        self._stopping = False
        self.error: BaseException | None = None

    # --- lifecycle -------------------------------------------------------

    def start(self) -> AmqpHub:
        self._acceptor = self._container.acceptor("127.0.0.1", 0)
        self._acceptor.set_ssl_domain(self._domain)
        # The acceptor's selectable delegates to the listening socket.
        self.port = int(self._acceptor._selectable.getsockname()[1])
        self._thread = threading.Thread(target=self._run, name="amqp-hub", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._container.run()
        except BaseException as exc:  # reported by wait_for instead of a silent timeout
            self.error = exc
            with self.lock:
                self.lock.notify_all()
            raise

    def stop(self, *, abrupt: bool = False) -> None:
        """Close every connection (AMQP close, or just the socket if abrupt), then end the
        reactor once their transports are closed."""
        if self._thread is None:
            return

        def shutdown() -> None:
            self._stopping = True
            self._acceptor.close()
            for conn in list(self._conns.values()):
                if abrupt:
                    conn.transport.close_tail()
                    conn.transport.close_head()
                elif not conn.state & Endpoint.LOCAL_CLOSED:
                    conn.close()
            if not self._conns:
                self._container.stop()

        try:
            self.call(shutdown, timeout=5)
        except Exception:
            pass
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            # A peer that never answered our close: stop without waiting for it.
            try:
                self._calls.put((self._container.stop, Future()))
                self._injector.trigger(ApplicationEvent("hub_call"))
            except Exception:
                pass
            self._thread.join(timeout=5)
        self._injector.close()
        self._thread = None

    def call(self, fn: Callable[[], Any], timeout: float = FAILSAFE) -> Any:
        """Run fn in the reactor thread and return its result."""
        future: Future[Any] = Future()
        self._calls.put((fn, future))
        self._injector.trigger(ApplicationEvent("hub_call"))
        return future.result(timeout=timeout)

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the calling thread
                future.set_exception(exc)

    # --- waiting ---------------------------------------------------------

    def wait_for(self, predicate: Callable[[], Any], timeout: float = FAILSAFE, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                result = predicate()
                if result:
                    return result
                if self.error is not None:
                    raise RuntimeError("the hub's reactor died") from self.error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"hub: timed out waiting for {what or predicate}")
                self.lock.wait(remaining)

    def messages_on(self, address_prefix: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.address.startswith(address_prefix)]

    # --- actions from tests -----------------------------------------------

    def send_c2d(self, device_id: str, payload: bytes, *, settled: bool = False) -> bytes:
        """Send encoded message bytes on the device's devicebound link; returns the tag.

        Tags are 16 bytes, not valid UTF-8, like the hub's lock-token GUIDs."""

        def tag_for(n: int) -> bytes:
            return b"\xff\xfe" + n.to_bytes(6, "big") + bytes(range(0x80, 0x88))

        address = f"devices/{device_id}/messages/devicebound"

        def send() -> bytes:
            for conn in self._conns.values():
                link = conn.link_head(Endpoint.LOCAL_ACTIVE | Endpoint.REMOTE_ACTIVE)
                while link:
                    if link.is_sender and normalise(link.remote_source.address) == address:
                        tag = tag_for(next(self._tags))
                        dlv = link.delivery(tag)
                        link.send(payload)
                        link.advance()
                        if settled:
                            dlv.settle()
                        return tag
                    link = link.next(Endpoint.LOCAL_ACTIVE | Endpoint.REMOTE_ACTIVE)
            raise LookupError(f"no open link for {address}")

        return self.call(send)

    def settle_held(
        self, outcome: int = Delivery.ACCEPTED, condition: Condition | None = None
    ) -> int:
        """Settle every held D2C delivery with the given outcome."""

        def settle() -> int:
            with self.lock:
                held, self.held = self.held, []
            for rec in held:
                assert rec.delivery is not None
                if condition is not None:
                    rec.delivery.local.condition = condition
                rec.delivery.update(outcome)
                rec.delivery.settle()
            return len(held)

        return self.call(settle)

    def _open_links(self, address: str, sender: bool) -> list[Link]:
        found = []
        for conn in self._conns.values():
            link = conn.link_head(Endpoint.LOCAL_ACTIVE)
            while link:
                terminus = link.remote_source if link.is_sender else link.remote_target
                if link.is_sender == sender and normalise(terminus.address) == address:
                    found.append(link)
                link = link.next(Endpoint.LOCAL_ACTIVE)
        return found

    def grant(self, address: str, credit: int) -> None:
        """Give more credit to the device-sender link(s) on `address`."""

        def flow() -> None:
            for link in self._open_links(address, sender=False):
                link.flow(credit)

        self.call(flow)

    def detach(self, address: str, condition: str, description: str) -> int:
        """Detach (close) every hub link on `address` with an error."""

        def close() -> int:
            links = self._open_links(address, sender=False) + self._open_links(address, sender=True)
            for link in links:
                link.condition = Condition(condition, description)
                link.close()
            return len(links)

        return self.call(close)

    def close_all_connections(self) -> None:
        def close() -> None:
            for conn in list(self._conns.values()):
                conn.close()

        self.call(close)

    # --- reactor side -------------------------------------------------------

    def _notify(self) -> None:
        with self.lock:
            self.lock.notify_all()


class _HubHandler(Handler):
    def __init__(self, hub: AmqpHub) -> None:
        super().__init__()
        self.hub = hub

    def on_hub_call(self, event: Any) -> None:
        self.hub._run_calls()

    # Connection setup: TLS is on the acceptor; allow SASL ANONYMOUS, trace frames.
    def on_connection_bound(self, event: Any) -> None:
        transport: Transport = event.transport
        sasl = transport.sasl()
        sasl.allowed_mechs("ANONYMOUS")
        transport.tracer = self._trace
        transport.trace(Transport.TRACE_FRM)
        conn_id = next(self.hub._conn_ids)
        event.connection.acc_id = conn_id
        self.hub._conns[conn_id] = event.connection

    def _trace(self, transport: Transport, text: str) -> None:
        if "<- @transfer(20)" not in text:
            return
        match = _MESSAGE_FORMAT.search(text)
        with self.hub.lock:
            self.hub.transfer_formats.append(int(match.group(1), 0) if match else 0)

    @staticmethod
    def _cid(conn: Any) -> int:
        return int(getattr(conn, "acc_id", 0))

    def on_connection_remote_open(self, event: Any) -> None:
        conn = event.connection
        with self.hub.lock:
            self.hub.opens.append(
                {"hostname": conn.remote_hostname, "container": conn.remote_container}
            )
            self.hub.connections_opened += 1
            self.hub.lock.notify_all()
        if conn.state & Endpoint.LOCAL_UNINIT:
            conn.open()

    def on_connection_remote_close(self, event: Any) -> None:
        conn = event.connection
        if not conn.state & Endpoint.LOCAL_CLOSED:
            conn.close()

    def on_transport_closed(self, event: Any) -> None:
        conn = event.connection
        if conn is not None:
            self.hub._conns.pop(self._cid(conn), None)
        with self.hub.lock:
            self.hub.connections_closed += 1
            self.hub.lock.notify_all()
        if self.hub._stopping and not self.hub._conns:
            event.container.stop()

    def on_session_remote_open(self, event: Any) -> None:
        if event.session.state & Endpoint.LOCAL_UNINIT:
            event.session.open()

    def on_session_remote_close(self, event: Any) -> None:
        if not event.session.state & Endpoint.LOCAL_CLOSED:
            event.session.close()

    def on_link_remote_open(self, event: Any) -> None:
        link: Link = event.link
        if not link.state & Endpoint.LOCAL_UNINIT:
            return
        address = normalise(
            link.remote_target.address if link.is_receiver else link.remote_source.address
        )
        with self.hub.lock:
            self.hub.attaches.append(
                Attach(
                    conn=self._cid(link.connection),
                    name=link.name,
                    role="sender" if link.is_receiver else "receiver",
                    source=link.remote_source.address,
                    target=link.remote_target.address,
                    properties=link.remote_properties,
                    snd_settle_mode=link.remote_snd_settle_mode,
                    rcv_settle_mode=link.remote_rcv_settle_mode,
                    max_message_size=link.remote_max_message_size,
                )
            )
            self.hub.lock.notify_all()
        link.source.copy(link.remote_source)
        # What the hub says about its end of every link, for the device to see mirrored.
        link.properties = dict(self.hub.link_properties)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        link.max_message_size = self.hub.max_message_size
        link.target.copy(link.remote_target)
        refusal = self.hub.attach_policy(address)
        if refusal is None and not address.startswith(self.hub.node_prefixes):
            refusal = ("amqp:not-found", f"no such node: {address}")
        if refusal is not None:
            # Refuse like a hub: null terminus on our side, then detach with an error.
            if link.is_receiver:
                link.target.type = Terminus.UNSPECIFIED
            else:
                link.source.type = Terminus.UNSPECIFIED
            link.open()
            link.condition = Condition(*refusal)
            link.close()
            return
        link.open()
        if link.is_receiver:
            link.flow(self._limit(address) or self.hub.credit)

    def on_link_flow(self, event: Any) -> None:
        link: Link = event.link
        if link.is_sender and link.drain_mode:
            # Nothing queued here: answer the drain by using up the credit.
            link.drained()
            with self.hub.lock:
                self.hub.drains += 1
                self.hub.lock.notify_all()

    def _limit(self, address: str) -> int:
        for prefix, limit in self.hub.credit_limits.items():
            if address.startswith(prefix):
                return limit
        return 0

    def on_link_remote_close(self, event: Any) -> None:
        link: Link = event.link
        address = normalise(
            link.remote_target.address if link.is_receiver else link.remote_source.address
        )
        cond = link.remote_condition
        with self.hub.lock:
            self.hub.detaches.append(
                Detach(
                    conn=self._cid(link.connection),
                    name=link.name,
                    address=address,
                    condition=cond.name if cond else None,
                    closed=True,
                )
            )
            self.hub.lock.notify_all()
        if not link.state & Endpoint.LOCAL_CLOSED:
            link.close()

    def on_delivery(self, event: Any) -> None:
        dlv: Delivery = event.delivery
        link: Link = dlv.link
        if link.is_receiver:
            self._incoming(dlv, link)
        else:
            self._outcome(dlv, link)

    def _incoming(self, dlv: Delivery, link: Link) -> None:
        if not dlv.readable or dlv.partial:
            return
        data = link.recv(dlv.pending) or b""
        link.advance()
        address = normalise(link.remote_target.address)
        rec = Received(
            conn=self._cid(link.connection),
            link_name=link.name,
            address=address,
            tag=raw_tag(dlv),
            data=bytes(data),
            remote_settled=dlv.settled,
            delivery=dlv,
        )
        if not self._limit(address) and link.credit < self.hub.credit // 2:
            link.flow(self.hub.credit - link.credit)
        if address == "$cbs":
            self._cbs(rec, link)
            decision: Any = "accept"
        else:
            decision = self.hub.d2c_policy(rec)
        with self.hub.lock:
            self.hub.received.append(rec)
            if decision == "hold":
                self.hub.held.append(rec)
            self.hub.lock.notify_all()
        if decision == "accept":
            dlv.update(Delivery.ACCEPTED)
            dlv.settle()
        elif isinstance(decision, tuple) and decision[0] == "reject":
            dlv.local.condition = Condition(decision[1], decision[2])
            dlv.update(Delivery.REJECTED)
            dlv.settle()

    def _cbs(self, rec: Received, link: Link) -> None:
        request = Message()
        request.decode(rec.data)
        reply_to = request.reply_to
        conn = link.connection
        candidates = []
        fallback = []
        snd = conn.link_head(Endpoint.LOCAL_ACTIVE)
        while snd:
            if snd.is_sender and normalise(snd.remote_source.address) == "$cbs":
                fallback.append(snd)
                if reply_to and snd.remote_target.address == reply_to:
                    candidates.append(snd)
            snd = snd.next(Endpoint.LOCAL_ACTIVE)
        reply_link = candidates[0] if candidates else (fallback[0] if len(fallback) == 1 else None)
        with self.hub.lock:
            self.hub.cbs_requests.append(
                CbsRequest(rec.conn, request, reply_link.name if reply_link else None)
            )
        if reply_link is None:
            return
        status = self.hub.cbs_status
        reply = Message(
            correlation_id=request.id,
            address=reply_to,
            properties={
                "status-code": int32(status),
                "status-description": "OK" if status == 200 else "Unauthorized",
            },
        )
        dlv = reply_link.delivery(b"cbs-%d" % next(self.hub._tags))
        reply_link.send(reply.encode())
        reply_link.advance()
        dlv.settle()

    def _outcome(self, dlv: Delivery, link: Link) -> None:
        if not dlv.updated:
            return
        cond = dlv.remote.condition
        with self.hub.lock:
            self.hub.outcomes.append(
                Outcome(
                    conn=self._cid(link.connection),
                    address=normalise(link.remote_source.address),
                    tag=raw_tag(dlv),
                    state=dlv.remote_state,
                    condition=cond.name if cond else None,
                    settled=dlv.settled,
                    failed=bool(dlv.remote.failed),
                    undeliverable=bool(dlv.remote.undeliverable),
                    annotations=dlv.remote.annotations,
                )
            )
            self.hub.lock.notify_all()
        dlv.settle()
