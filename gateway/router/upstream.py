"""The router's side of one upstream (hub) connection: its engine and its events.

Direction: above `linkpair` and `cbs`, beside `device` (neither imports the
other); what it needs of the router and of a binding is declared here
(`UpstreamRouter`, `UpstreamBinding`). The I/O side runs its engine (see
`ports.ConnectorIO`); it only sees the engine's events.

Routed links to the hub live in one upstream session per device session,
begun on first use and ended when the device session ends, so a device that
goes leaves nothing behind at the hub. The gateway's own CBS link pair lives
in a separate control session.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Protocol

from gateway.amqp import (
    Connection,
    ConnectionError,
    DispositionReceived,
    LinkError,
    LinkState,
    RemoteAttach,
    RemoteBegin,
    RemoteClose,
    RemoteDetach,
    RemoteEnd,
    RemoteFlow,
    Session,
    SessionState,
    TransferReceived,
)
from gateway.amqp.events import Event
from gateway.amqp.performatives import Error

from .cbs import GatewayCbs
from .linkpair import (
    FORCED,
    LinkPair,
    amqp_error,
    flush_relay_counts,
    refuse_attach,
    relay_disposition,
)
from .observe import RouterObserver

log = logging.getLogger("gateway.router.upstream")


class UpstreamRouter(Protocol):
    """What an upstream connection needs of the router (`core.Router`)."""

    @property
    def container_id(self) -> str: ...
    @property
    def observer(self) -> RouterObserver: ...
    def upstream_gone(self, upstream: UpstreamConn) -> None: ...


class UpstreamBinding(Protocol):
    """A device's place on this connection (`core.Binding`)."""

    def invalidate(self) -> None: ...

_LIVE_SESSION = (SessionState.BEGIN_SENT, SessionState.MAPPED)


def _own_event(ctx: object, ev: Event) -> None:
    """An event of a link or session the gateway runs itself on this connection
    (store-and-forward replay, `forwarder.py`): handed to its ``on_upstream_event``."""
    on_event = getattr(ctx, "on_upstream_event", None)
    if on_event is not None:
        on_event(ev)


class UpstreamConn:
    _serial = itertools.count(1)

    def __init__(self, router: UpstreamRouter, connector: str, slot: int,
                 engine: Connection) -> None:  # fmt: skip
        self.id = f"{connector}#{slot}.{next(self._serial)}"
        self.router = router
        self.connector = connector
        self.slot = slot
        self.engine = engine
        engine.context = self
        self.driver: Any = None
        self.pairs: set[LinkPair] = set()
        self.bindings: set[UpstreamBinding] = set()
        self.sessions: dict[Session, Session] = {}  # device session -> upstream session
        self._owners: dict[Session, object] = {}  # device session -> its device connection
        self._names = itertools.count(1)
        self._control: Session | None = None
        self.cbs: GatewayCbs | None = None
        self.lost = False
        self.closing = False  # we are closing it on purpose
        self.error: Error | None = None

    def __repr__(self) -> str:
        return f"<UpstreamConn {self.id}>"

    def set_driver(self, driver: Any) -> None:
        self.driver = driver

    def wake(self) -> None:
        if self.driver is not None:
            self.driver.wake()

    @property
    def usable(self) -> bool:
        return not self.lost and self.engine.is_open

    # ------------------------------------------------------------- sessions, names

    def unique_link_name(self, name: str) -> str:
        """Device link names collide across devices (SDKs use fixed names): suffix a
        per-connection serial, as Qpid Dispatch Router suffixes the container id."""
        return f"{name}@{next(self._names)}"

    def session_for(self, device: object, device_session: Session) -> Session:
        s = self.sessions.get(device_session)
        if s is None or s.state not in _LIVE_SESSION:
            s = self.engine.begin()
            s.context = device
            self.sessions[device_session] = s
            self._owners[device_session] = device
        return s

    def end_session_for(self, device_session: Session) -> None:
        s = self.sessions.pop(device_session, None)
        self._owners.pop(device_session, None)
        if s is not None and s.state in _LIVE_SESSION and not self.lost:
            s.end()
            self.wake()

    def end_sessions_of(self, device: object) -> None:
        for ds in [ds for ds, owner in self._owners.items() if owner is device]:
            self.end_session_for(ds)

    def control_session(self) -> Session:
        if self._control is None or self._control.state not in _LIVE_SESSION:
            self._control = self.engine.begin()
        return self._control

    def cbs_pair(self) -> GatewayCbs:
        if self.cbs is None or not self.cbs.usable:
            if self.cbs is not None:
                self.cbs.close()
            self.cbs = GatewayCbs(self)
        return self.cbs

    def drop_cbs(self, cbs: GatewayCbs) -> None:
        if self.cbs is cbs:
            self.cbs = None

    # ------------------------------------------------------------------ events

    def handle(self, events: list[Event]) -> None:
        for ev in events:
            t = type(ev)
            if t is TransferReceived:
                ctx = ev.link.context
                if type(ctx) is LinkPair:
                    ctx.on_up_transfer(ev)
                elif type(ctx) is GatewayCbs:
                    ctx.on_reply(ev)
                else:
                    _own_event(ctx, ev)
            elif t is DispositionReceived:
                for conn in relay_disposition(ev):
                    conn.context.wake()
                cbs = self.cbs  # CBS replies held for this outcome go now
                if cbs is not None and cbs.held and ev.deliveries[:1] \
                        and ev.deliveries[0].link is cbs.sender:
                    cbs.on_disposition()
                own = ev.deliveries[0].link.context if ev.deliveries else None
                if type(own) is not LinkPair and own is not None:
                    _own_event(own, ev)
            elif t is RemoteFlow:
                self._on_flow(ev)
            elif t is RemoteAttach:
                ctx = ev.link.context
                if type(ctx) is LinkPair:
                    ctx.on_up_attach(ev.attach)
                elif type(ctx) is GatewayCbs:
                    ctx.on_attach(ev.link)
                elif ctx is None:
                    # The hub does not attach to us; refuse anything it tries.
                    refuse_attach(ev.link, amqp_error("amqp:not-allowed", "no such node"))
                else:
                    _own_event(ctx, ev)
            elif t is RemoteDetach:
                ctx = ev.link.context
                if type(ctx) is LinkPair:
                    ctx.on_up_detach(ev.closed, ev.error)
                elif type(ctx) is GatewayCbs:
                    ctx.on_detach(ev.link, ev.error)
                elif ctx is not None:
                    _own_event(ctx, ev)
                elif ev.link.state is LinkState.DETACH_RCVD:
                    ev.link.detach(None, ev.closed)
            elif t is LinkError:
                # The engine detached this upstream link itself: tell the device side.
                ctx = ev.link.context
                if type(ctx) is LinkPair:
                    ctx.on_up_detach(ev.closed, ev.error)
                elif type(ctx) is GatewayCbs:
                    ctx.on_detach(ev.link, ev.error)
                else:
                    _own_event(ctx, ev)
            elif t is RemoteBegin:
                if ev.session.state is SessionState.BEGIN_RCVD:
                    ev.session.end(amqp_error("amqp:not-allowed", "sessions are begun by the gateway"))
            elif t is RemoteEnd:
                self._on_end(ev)
            elif t is RemoteClose:
                self.fail(ev.error)
                self.engine.close()
            elif t is ConnectionError:
                if ev.protocol:
                    self.router.observer.on_protocol_error("upstream", str(ev.error.condition))
                self.fail(None, f"{ev.error.condition}: {ev.error.description}")
        flush_relay_counts()  # one metrics update per pair and chunk
        self.wake()

    def _on_flow(self, ev: RemoteFlow) -> None:
        link = ev.link
        if link is not None:
            ctx = link.context
            if type(ctx) is LinkPair:
                ctx.on_up_flow(ev.flow)
            return
        for pair in list(self.pairs):
            if pair.up_link is not None and pair.up_link.session is ev.session:
                pair.on_queue_progress()

    def _on_end(self, ev: RemoteEnd) -> None:
        session = ev.session
        if session.context is not None:  # device sessions' context has no handler
            _own_event(session.context, ev)
        error = ev.error or amqp_error(FORCED, "the hub ended the session")
        for pair in [p for p in self.pairs if p.up_link is not None and p.up_link.session is session]:
            pair.on_up_detach(True, error)
        if self._control is session:
            self._control = None
            if self.cbs is not None:
                self.cbs.fail_all()
                self.cbs = None
        for ds in [ds for ds, s in self.sessions.items() if s is session]:
            del self.sessions[ds]
            self._owners.pop(ds, None)
        if session.state is SessionState.END_RCVD:
            session.end()

    # ---------------------------------------------------------------- failure

    def fail(self, hub_error: Error | None, detail: str | None = None) -> None:
        """The connection is gone (or going): every device link on it is detached
        with the hub's close error, else amqp:connection:forced."""
        if self.lost:
            return
        self.lost = True
        if hub_error is not None:
            error = hub_error
        else:
            why = detail or "connection closed"
            error = amqp_error(FORCED, f"upstream connection {self.id} lost: {why}")
        self.error = error
        if self.closing:
            log.debug("upstream %s closed", self.id)
        else:
            log.info("upstream %s: detaching %d device link(s): %s", self.id, len(self.pairs),
                     error.description or error.condition)  # fmt: skip
        for pair in list(self.pairs):
            pair.upstream_lost(error)
        self.pairs.clear()
        if self.cbs is not None:
            self.cbs.fail_all()
        for binding in list(self.bindings):
            binding.invalidate()
        self.bindings.clear()
        self.sessions.clear()
        self._owners.clear()
        self.router.upstream_gone(self)

    def shutdown(self) -> None:
        """Detach everything cleanly and close (the gateway is stopping)."""
        if self.lost:
            return
        self.closing = True
        for pair in list(self.pairs):
            if pair.up_link is not None and pair.up_link.state not in (
                LinkState.DETACH_SENT,
                LinkState.DETACHED,
            ):
                pair.up_link.detach(None, True)
        if self.cbs is not None:
            self.cbs.close()
        self.engine.close()
        self.wake()
