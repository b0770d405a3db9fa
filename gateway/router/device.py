"""The router's side of one device connection: its engine and its events.

Direction: above `linkpair` and `cbs`, beside `upstream` (neither imports the
other); what it needs of the router and of a binding is declared here
(`DeviceRouter`, `DeviceBinding`).

The gateway is the device's AMQP peer (server role, SASL MSSBCBS/ANONYMOUS/PLAIN or
none). A PLAIN login with a local password (not a SAS token) for an identity
the gateway holds credentials for is judged at SASL time (see
`gateway_tokens.py`). Sessions are answered locally; attaches go to the router core, which
routes them (or serves `$cbs` locally); everything on a routed link goes to
its `LinkPair`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from gateway.amqp import (
    Connection,
    ConnectionError,
    Delivery,
    DispositionReceived,
    Link,
    LinkError,
    LinkState,
    RemoteAttach,
    RemoteBegin,
    RemoteClose,
    RemoteDetach,
    RemoteEnd,
    RemoteFlow,
    RemoteOpen,
    SaslAuthenticated,
    SaslServer,
    Session,
    SessionState,
    TransferReceived,
)
from gateway.amqp.events import Event
from gateway.amqp.performatives import Attach
from gateway.auth.dps import registration_resource
from gateway.auth.local_auth import LocalAuthResult
from gateway.logsafe import shown_plain, source

from .cbs import CbsRequest, DeviceCbs
from .identity import PlainIdentity, parse_plain_username
from .linkpair import FORCED, LinkPair, amqp_error, flush_relay_counts, relay_disposition
from .local_link import LocalLink
from .observe import RouterObserver

log = logging.getLogger("gateway.router.device")


class DeviceRouter(Protocol):
    """What a device connection needs of the router (`core.Router`)."""

    @property
    def container_id(self) -> str: ...
    @property
    def observer(self) -> RouterObserver: ...
    def sasl_authenticator(self, device: DeviceConn) -> Callable[..., bool] | None: ...
    def device_attach(self, device: DeviceConn, link: Link, attach: Attach) -> None: ...
    def device_gone(self, device: DeviceConn) -> None: ...
    def forward_cbs_request(self, device: DeviceConn, connector: str, req: CbsRequest,
                            delivery: Delivery, settled: bool) -> None: ...  # fmt: skip


class _UpstreamSessions(Protocol):
    def end_session_for(self, device_session: Session) -> None: ...


class DeviceBinding(Protocol):
    """The device's place on one connector's upstream connection (`core.Binding`)."""

    @property
    def upstream(self) -> _UpstreamSessions | None: ...
    def release(self) -> None: ...


@dataclass(eq=False)
class RelayedLogin:
    """A device's login the provisioning service accepted: the connection it is on."""

    connector: Any
    registration: tuple[str, str]
    stream: Any = field(default=None, repr=False)  # the I/O's connection, until taken

    @property
    def address(self) -> str:
        return registration_resource(*self.registration)


@dataclass(slots=True)
class Verdict:
    """The SASL outcome code for a provisioning login (see `dps.py`)."""

    username: str
    code: int


@dataclass(slots=True)
class PlainCheck:
    """A SASL PLAIN local login checked before the engine saw it (see the listener's gate)."""

    username: str
    digest: bytes = field(repr=False)
    result: LocalAuthResult


def device_engine(listener: Any, container_id: str, *,
                  authenticate: Callable[..., bool] | None = None) -> Connection:  # fmt: skip
    """A server-role engine for a device connection on `listener` (config entry);
    ``authenticate`` judges SASL logins (None: every login is accepted)."""
    mechanisms = [str(m).upper() for m in (getattr(listener, "sasl", None) or [])]
    sasl = (
        SaslServer(mechanisms, required=False, authenticate=authenticate) if mechanisms else None
    )
    idle = float(getattr(listener, "idle_timeout", 0) or 0)
    return Connection(
        "server",
        container_id,
        sasl=sasl,
        max_frame_size=int(getattr(listener, "max_frame_size", 65536)),
        channel_max=int(getattr(listener, "channel_max", 255)),
        idle_timeout=idle or None,
    )


class DeviceConn:
    _serial = itertools.count(1)

    def __init__(self, router: DeviceRouter, listener: Any, peer: tuple[str, int]) -> None:
        self.id = f"d{next(self._serial)}"
        self.router = router
        self.listener = str(getattr(listener, "name", "amqp"))
        self.peer = peer
        # Local proofs, by identity ("dev1"), checked for the gateway-held credentials.
        self.local_auth: dict[str, LocalAuthResult] = {}
        self.plain_check: PlainCheck | None = None
        # A provisioning login relayed to its own upstream connection (see dps.py).
        self.relayed: RelayedLogin | None = None
        self.relay_verdict: Verdict | None = None
        self.engine = device_engine(
            listener, router.container_id, authenticate=router.sasl_authenticator(self)
        )
        self.engine.context = self
        self.engine.open()  # our open goes out as soon as the device's header arrives
        self.driver: Any = None
        self.pairs: set[LinkPair] = set()
        self.local_links: set[LocalLink] = set()  # store-and-forward telemetry links
        self.bindings: dict[str, DeviceBinding] = {}
        self.cbs = DeviceCbs(self)
        self.plain: PlainIdentity | None = None
        self.plain_token: str | None = None
        # Put-token requests the hub accepted, by (connector, audience): put again for
        # the device when its upstream connection is replaced (tokens die with it).
        self.tokens: dict[tuple[str, str], CbsRequest] = {}
        self.opened = trio.Event()
        self.closed = False

    def __repr__(self) -> str:
        return f"<DeviceConn {self.id} {self.peer[0]}:{self.peer[1]}>"

    def wake(self) -> None:
        if self.driver is not None:
            self.driver.wake()

    # ----------------------------------------------------------------- events

    def handle(self, events: list[Event]) -> None:
        for ev in events:
            t = type(ev)
            if t is TransferReceived:
                ctx = ev.link.context
                if type(ctx) is LinkPair:
                    ctx.on_dev_transfer(ev)
                elif type(ctx) is tuple:
                    self.cbs.on_request(ev.link, ev)
                elif type(ctx) is LocalLink:
                    ctx.on_transfer(ev)
            elif t is DispositionReceived:
                for conn in relay_disposition(ev):
                    conn.context.wake()
            elif t is RemoteFlow:
                self._on_flow(ev)
            elif t is RemoteAttach:
                self.router.device_attach(self, ev.link, ev.attach)
            elif t is RemoteDetach:
                self._on_detach(ev)
            elif t is LinkError:
                self._on_link_error(ev)
            elif t is RemoteBegin:
                if ev.session.state is SessionState.BEGIN_RCVD:
                    ev.session.answer_begin()
            elif t is RemoteEnd:
                self._on_end(ev)
            elif t is SaslAuthenticated:
                self._on_sasl(ev)
            elif t is RemoteOpen:
                self.opened.set()
            elif t is RemoteClose:
                self.lost("closed by the device")
                self.engine.close()
            elif t is ConnectionError:
                if ev.protocol:
                    self.router.observer.on_protocol_error("device", str(ev.error.condition))
                    log.warning("device %s (%s:%d): protocol error, connection closed: %s: %s",
                                self.id, self.peer[0], self.peer[1], ev.error.condition,
                                shown_plain(ev.error.description or "", 256),
                                extra=source(self.peer[0], str(ev.error.condition)))  # fmt: skip
                self.lost(f"{ev.error.condition}: {ev.error.description}")
        flush_relay_counts()  # one metrics update per pair and chunk
        self.wake()

    def remember_token(self, connector: str, audience: str, request: CbsRequest) -> None:
        self.tokens[(connector, audience)] = request

    def tokens_for(self, connector: str) -> list[tuple[str, CbsRequest]]:
        return [(aud, req) for (conn, aud), req in self.tokens.items() if conn == connector]

    def _on_sasl(self, ev: SaslAuthenticated) -> None:
        if ev.mechanism != "PLAIN" or not ev.identity:
            return
        self.plain = parse_plain_username(ev.identity)
        if self.plain is not None and ev.password and ev.password.startswith("SharedAccessSignature "):
            self.plain_token = ev.password

    def _on_flow(self, ev: RemoteFlow) -> None:
        link = ev.link
        if link is not None:
            ctx = link.context
            if type(ctx) is LinkPair:
                ctx.on_dev_flow(ev.flow)
            return
        # A session flow may have let queued deliveries out: owed drains may be due.
        for pair in list(self.pairs):
            if pair.dev_link.session is ev.session:
                pair.on_queue_progress()

    def _on_detach(self, ev: RemoteDetach) -> None:
        link = ev.link
        ctx = link.context
        if type(ctx) is LinkPair:
            ctx.on_dev_detach(ev.closed, ev.error)
        elif type(ctx) is tuple:
            self.cbs.detached(link, ev.closed)
        elif type(ctx) is LocalLink:
            ctx.on_detach(ev.closed)
        elif link.state is LinkState.DETACH_RCVD:
            link.detach(None, ev.closed)

    def _on_link_error(self, ev: LinkError) -> None:
        # The engine detached this device link itself (e.g. a message over its
        # max-message-size): the upstream twin goes with the same error.
        ctx = ev.link.context
        if type(ctx) is LinkPair:
            ctx.on_dev_detach(ev.closed, ev.error)
        elif type(ctx) is tuple:
            self.cbs.detached(ev.link, ev.closed)
        elif type(ctx) is LocalLink:
            ctx.on_detach(ev.closed)

    def _on_end(self, ev: RemoteEnd) -> None:
        session = ev.session
        for pair in [p for p in self.pairs if p.dev_link.session is session]:
            pair.device_lost()
        for local in [lk for lk in self.local_links if lk.link.session is session]:
            local.device_lost()
        for link in list(self.cbs.senders + self.cbs.receivers):
            if link.session is session:
                self.cbs.detached(link, True)
        for binding in self.bindings.values():
            if binding.upstream is not None:
                binding.upstream.end_session_for(session)
        if session.state is SessionState.END_RCVD:
            session.end()

    # -------------------------------------------------------------- teardown

    def lost(self, reason: str) -> None:
        """The device connection ended: its upstream links go, its leases return."""
        if self.closed:
            return
        self.closed = True
        log.debug("device %s (%s:%d) gone: %s", self.id, self.peer[0], self.peer[1], reason)
        for pair in list(self.pairs):
            pair.device_lost()
        self.pairs.clear()
        for local in list(self.local_links):
            local.device_lost()
        for binding in self.bindings.values():
            binding.release()
        self.bindings.clear()
        self.tokens.clear()
        self.local_auth.clear()
        self.cbs.senders.clear()
        self.cbs.receivers.clear()
        self.router.device_gone(self)

    def shutdown(self, description: str) -> None:
        """Detach every link cleanly, then close the connection."""
        if self.closed:
            return
        error = amqp_error(FORCED, description)
        for pair in list(self.pairs):
            pair.shutdown(error)
        self.cbs.close()
        self.engine.close(error)
        self.wake()
