"""Store-and-forward for AMQP devices: who is served locally, and the replay.

Direction: above `gateway_tokens`, `device`, `upstream` and `local_link`; `core`
owns a `StoreAndForward` when the daemon hands the router a store. What it needs
of the router is declared here (`SfRouter`).

Eligible (all of): the gateway holds the identity's key (``credentials:``), the
entry says ``store_and_forward: true``, the device relies on the gateway for its
hub token (no SASL PLAIN SAS token, no ``$cbs`` link of its own), and its local
proof passes as for gateway-put tokens. Everyone else takes the transparent path
unchanged.

An eligible device's telemetry attach is answered locally (`local_link.LocalLink`)
when its identity has a backlog in the store (so per-device order holds), when
the connector already knows the hub is down (its pool is backing off: decided at
once, no dial wait), or when the router's lease on the connector fails as
unreachable. Its other attaches (C2D, twin, methods) while the hub is unreachable
are refused with ``amqp:internal-error`` "hub unreachable; only telemetry is
stored".

The `Forwarder` replays, per connector: for each identity with an AMQP backlog
(oldest first, store order), on a pooled upstream connection, it puts a token
the gateway issues for that identity, attaches a sender to the stored target
address and sends the stored messages with their message-format and bytes (the
original delivery tag unless it collides within the window), a window of
`WINDOW` unsettled at the connector's ``replay_limiter`` rate. ``accepted``:
deleted; ``rejected``: handed to ``store.reject`` (counted, logged, deleted, never
retried); anything else, or a lost link or connection: tried again later with
backoff. When an identity's backlog is empty its local links are detached with
``amqp:link:detach-forced`` (see `local_link`).

At least once: a crash between the hub's ``accepted`` and the delete sends the
window again, so duplicates are bounded by `WINDOW` per identity and restart.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import trio

from gateway.amqp import Delivery, Link, LinkState, LocalProtocolError, SessionState
from gateway.amqp.events import (
    DispositionReceived,
    LinkError,
    RemoteAttach,
    RemoteDetach,
    RemoteEnd,
)
from gateway.amqp.performatives import Accepted, Attach, Error, Rejected, Source, Target
from gateway.auth.credentials import CredentialError

from .cbs import PendingPut
from .device import DeviceConn
from .gateway_tokens import GatewayTokens
from .identity import IdentityPath, identity_of_address
from .linkpair import NOT_FOUND, RESOURCE_LIMIT, LinkPair, PairState, amqp_error, refuse_attach
from .local_link import LocalLink, decode_meta, telemetry_key
from .observe import RouterObserver
from .ports import Pool
from .upstream import UpstreamConn

log = logging.getLogger("gateway.router.store")

INTERNAL_ERROR = "amqp:internal-error"
HUB_UNREACHABLE = "hub unreachable; only telemetry is stored"
# Unsettled replayed messages per identity; also the duplicate bound after a crash.
WINDOW = 16
# Identities replayed at once on one connector (the limiter shares the rate).
PARALLEL = 8
# How long a put-token or the hub's attach answer may take during replay.
HUB_WAIT = 10.0
RETRY_INITIAL = 0.5
RETRY_MAX = 5.0
_OK_STATUS = (200, 202)


class SfRouter(Protocol):
    """What store-and-forward needs of the router (`core.Router`)."""

    @property
    def tokens(self) -> GatewayTokens | None: ...
    @property
    def observer(self) -> RouterObserver: ...
    @property
    def pools(self) -> dict[str, Pool[UpstreamConn]]: ...
    @property
    def io(self) -> Any: ...  # ports.ConnectorIO
    @property
    def cbs_proxied(self) -> dict[str, bool]: ...
    def start_soon(self, fn: Callable[..., Any], *args: Any) -> bool: ...
    def retire_upstream(self, upstream: UpstreamConn) -> None: ...


def key_identity(key: str) -> IdentityPath:
    dev, _, mod = key.partition("/")
    return ("devices", dev, "modules", mod) if mod else ("devices", dev)


class StoreAndForward:
    """The router's store-and-forward state: eligibility, local links, hub state."""

    def __init__(self, router: SfRouter, store: Any, *, clock: Callable[[], float] = time.time) -> None:
        from gateway.store import StoreFull, StoreUnavailable  # foundations; the store's errors

        self.router = router
        self.store = store
        self.full_errors: tuple[type[Exception], type[Exception]] = (StoreFull, StoreUnavailable)
        self.clock = clock
        self.links: dict[str, set[LocalLink]] = {}
        # Connector -> its pool's last reported state ("up", "connecting", "backoff", "idle").
        self.pool_states: dict[str, str] = {}
        self.down: set[str] = set()
        self.changed = trio.Event()  # a pool state changed or a message was stored
        self.forwarder = Forwarder(self)
        # Counted here (the store counts its own): for operators and tests.
        self.counts: dict[str, int] = {"local_attaches": 0, "local_at_once": 0, "refused_attaches": 0,
                                       "stored": 0, "refused_full": 0, "refused_unavailable": 0,
                                       "detached": 0}  # fmt: skip
        self._full_logged: set[str] = set()

    # ------------------------------------------------------------------ state

    def start_soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        return self.router.start_soon(fn, *args)

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def on_connector_state(self, connector: str, state: str) -> None:
        # Down from the first failure (backoff) until a connection is up again: the
        # reconnect attempts in between ("connecting") do not make devices wait.
        if state == "backoff":
            self.down.add(connector)
        elif state == "up":
            self.down.discard(connector)
        if self.pool_states.get(connector) != state:
            self.pool_states[connector] = state
            self.poke()

    def hub_down(self, connector: str) -> bool:
        """The connector already knows the hub cannot be reached: its last connection
        attempt failed or its connection was lost, and none is up since."""
        return connector in self.down

    # ------------------------------------------------------------ eligibility

    def eligible(self, device: DeviceConn, address: str) -> IdentityPath | None:
        """The identity `device` acts for on `address` if store-and-forward applies."""
        tokens = self.router.tokens
        if tokens is None or device.plain_token is not None or device.cbs.senders:
            return None
        identity = identity_of_address(address)
        if identity is None or len(identity) not in (2, 4):
            return None
        entry = tokens.entry_for(identity)
        if entry is None or not getattr(entry, "store_and_forward", False):
            return None
        if not tokens.local_auth(device, entry).ok:
            return None  # the transparent path refuses it, with the reason
        return identity

    def intercept(self, device: DeviceConn, link: Link, attach: Attach, address: str,
                  direction: str, connector: str) -> bool:  # fmt: skip
        """Serve or refuse the attach here (True), or leave it to the router (False)."""
        if self.eligible(device, address) is None:
            return False
        key = telemetry_key(address) if direction == "in" else None
        if key is not None:
            if self.store.backlog(key) > 0 or self.hub_down(connector):
                self.counts["local_at_once"] += 1  # no lease tried: no dial to wait for
                self._serve(device, link, attach, key, connector)
                return True
            return False
        if self.hub_down(connector):
            self._refuse(device, link, address)
            return True
        return False

    def fallback(self, pair: LinkPair, condition: str) -> bool:
        """The router could not bind `pair` to the hub (`condition`): serve a telemetry
        attach of an eligible device locally, refuse its others as unreachable (True);
        False: not ours, the router refuses as usual."""
        if condition in (RESOURCE_LIMIT, NOT_FOUND) or pair.state is not PairState.PENDING:
            return False
        device = pair.device
        if not isinstance(device, DeviceConn) or self.eligible(device, pair.address) is None:
            return False
        # The pair never reached the hub: take its device link over.
        device.pairs.discard(pair)
        pair.state = PairState.DONE
        key = telemetry_key(pair.address) if pair.direction == "in" else None
        if key is not None:
            self._serve(device, pair.dev_link, pair.attach, key, pair.connector)
        else:
            self._refuse(device, pair.dev_link, pair.address)
        return True

    def _serve(self, device: DeviceConn, link: Link, attach: Attach, key: str, connector: str) -> None:
        local = LocalLink(self, device, link, attach, key, connector)
        device.local_links.add(local)
        self.links.setdefault(key, set()).add(local)
        self.counts["local_attaches"] += 1
        log.info("device %s: telemetry link of %s served locally (store-and-forward; backlog %d)",
                 device.id, key, self.store.backlog(key))  # fmt: skip
        self.poke()

    def _refuse(self, device: DeviceConn, link: Link, address: str) -> None:
        self.counts["refused_attaches"] += 1
        self.router.observer.on_attach_refused(INTERNAL_ERROR)
        log.info("device %s: attach to %r refused: %s", device.id, address, HUB_UNREACHABLE)
        refuse_attach(link, amqp_error(INTERNAL_ERROR, HUB_UNREACHABLE))
        device.wake()

    # ------------------------------------------------------- local link events

    def stored(self, link: LocalLink) -> None:
        self.counts["stored"] += 1
        self._full_logged.discard(link.key)
        self.poke()

    def refused(self, link: LocalLink, kind: str, reason: str) -> None:
        self.counts[f"refused_{kind}"] += 1
        if kind == "unavailable":
            log.error("device %s: message of %s released: the store is unavailable: %s",
                      link.device.id, link.key, reason)  # fmt: skip
        elif link.key not in self._full_logged:  # once per episode: a flooder logs one line
            self._full_logged.add(link.key)
            log.warning("device %s: messages of %s released: %s", link.device.id, link.key, reason)

    def link_gone(self, link: LocalLink) -> None:
        links = self.links.get(link.key)
        if links is not None:
            links.discard(link)
            if not links:
                del self.links[link.key]
        device = link.device
        if isinstance(device, DeviceConn):
            device.local_links.discard(link)

    def drained(self, key: str) -> None:
        """`key`'s backlog is empty and the hub took the last of it: its local links go."""
        if self.store.backlog(key) > 0:
            return
        for link in list(self.links.get(key, ())):
            if link.detach_forced():
                self.counts["detached"] += 1

    def local_keys(self, connector: str) -> list[str]:
        return [k for k, links in self.links.items() if any(lk.connector == connector for lk in links)]


class _ForwardBinding:
    """The forwarder's place on one upstream connection (what `cbs.PendingPut` and
    `UpstreamConn.fail` need of a binding)."""

    def __init__(self, connector: str, upstream: UpstreamConn) -> None:
        self.connector = connector
        self.upstream = upstream
        self.device: Any = None  # no device connection: the gateway's own puts
        self.lost = trio.Event()
        self.put_any = False  # a token was put on the connection

    def authorise(self, audience: str) -> None:
        pass

    def put_finished(self) -> None:
        pass

    def invalidate(self) -> None:
        self.lost.set()



_NO_OUTCOME = object()


class _ReplayLink:
    """One sender link the forwarder attached for one identity's stored messages."""

    _names = itertools.count(1)

    def __init__(self, binding: _ForwardBinding, key: str, address: str) -> None:
        self.binding = binding
        self.key = key
        self.address = address
        self.attached = trio.Event()
        self.changed = trio.Event()
        self.error: Error | None = None
        self.refused = False
        self.outcomes: dict[Delivery, Any] = {}
        # A session of its own: a disposition range then covers this link's deliveries
        # only (the connection hands the event to the first delivery's link).
        session = self.session = binding.upstream.engine.begin()
        session.context = self
        self.link = session.attach(
            f"sf-{key}-{next(self._names)}", False, Source(address=f"sf-{key}"),
            Target(address=address), snd_settle_mode=0, rcv_settle_mode=0,
        )  # fmt: skip
        self.link.context = self
        binding.upstream.wake()

    @property
    def usable(self) -> bool:
        return self.error is None and not self.binding.lost.is_set() and self.link.is_open

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def send(self, tag: bytes, payload: bytes, message_format: int) -> Delivery:
        d = self.link.send_transfer(tag, payload, message_format=message_format)
        d.context = self
        self.outcomes[d] = None
        self.binding.upstream.wake()
        return d

    def on_upstream_event(self, ev: Any) -> None:
        t = type(ev)
        if t is DispositionReceived:
            for d in ev.deliveries:
                if d in self.outcomes and self.outcomes[d] is None and (ev.settled or ev.state is not None):
                    # Settled without an outcome: not known to be accepted, so sent again.
                    self.outcomes[d] = ev.state if ev.state is not None else _NO_OUTCOME
                    if not ev.settled:
                        d.settle()
            self._changed()
        elif t is RemoteAttach:
            if ev.attach.target is None:
                self.refused = True  # its detach with the hub's error follows
            self.attached.set()
            self._changed()
        elif t is RemoteEnd:
            if ev.session.state is SessionState.END_RCVD:
                ev.session.end()
            self.error = self.error or ev.error or amqp_error("amqp:session:detach-forced",
                                                              "the hub ended the session")  # fmt: skip
            self.attached.set()
            self._changed()
        elif t is RemoteDetach or t is LinkError:
            if t is RemoteDetach and self.link.state is LinkState.DETACH_RCVD:
                self.link.detach(None, True)
                self.binding.upstream.wake()
            self.error = ev.error or amqp_error("amqp:link:detach-forced", "the hub detached")
            self.attached.set()
            self._changed()

    def close(self) -> None:
        if self.binding.lost.is_set():
            return
        try:
            if self.link.state not in (LinkState.DETACH_SENT, LinkState.DETACHED):
                self.link.detach(None, True)
            if self.session.state in (SessionState.BEGIN_SENT, SessionState.MAPPED):
                self.session.end()
        except LocalProtocolError:
            pass
        self.binding.upstream.wake()


async def _wait(event: trio.Event, lost: trio.Event, timeout: float) -> None:
    """Until `event` or `lost` is set, or `timeout` passed."""
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as n:
            async def one(e: trio.Event) -> None:
                await e.wait()
                n.cancel_scope.cancel()

            n.start_soon(one, event)
            n.start_soon(one, lost)


class _Retry(Exception):
    """Stop this round for the identity; try again after a backoff."""


class Forwarder:
    """Replays stored AMQP messages when their connector's hub is reachable."""

    def __init__(self, sf: StoreAndForward) -> None:
        self.sf = sf
        self.rounds = 0  # replay rounds run (tests wait on progress, not time)
        self.settled = 0  # stored messages the hub accepted or rejected (progress)
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for connector in self.sf.router.pools:
                nursery.start_soon(self._connector_loop, connector)
            task_status.started()
            await trio.sleep_forever()

    def _work(self, connector: str) -> list[str]:
        waiting = self.sf.store.devices_waiting("amqp", connector)
        keys = list(dict.fromkeys([*waiting, *self.sf.local_keys(connector)]))
        now = trio.current_time()
        return [k for k in keys if self._retry_at.get(k, 0.0) <= now]

    def _next_retry(self, connector: str) -> float:
        keys = set(self.sf.store.devices_waiting("amqp", connector)) | set(self.sf.local_keys(connector))
        times = [self._retry_at[k] for k in keys if k in self._retry_at]
        return max(0.0, min(times) - trio.current_time()) if times else math.inf

    async def _connector_loop(self, connector: str) -> None:
        sf = self.sf
        pool = sf.router.pools[connector]
        delay = RETRY_INITIAL
        while True:
            changed = sf.changed
            keys = self._work(connector)
            if not keys:
                with trio.move_on_after(self._next_retry(connector)):
                    await changed.wait()
                continue
            try:  # asking is what keeps the pool retrying a failing hub
                lease = await pool.acquire(owner=self)
            except sf.router.io.unavailable as exc:
                log.debug("store-and-forward: connector %s unavailable for replay: %s", connector,
                          getattr(exc, "description", exc))  # fmt: skip
                with trio.move_on_after(delay):
                    await changed.wait()
                delay = min(RETRY_MAX, delay * 2)
                continue
            delay = RETRY_INITIAL
            settled_before = self.settled
            upstream = lease.conn
            binding = _ForwardBinding(connector, upstream)
            try:
                if not upstream.usable:
                    with trio.move_on_after(RETRY_INITIAL):
                        await lease.lost.wait()
                    continue
                upstream.bindings.add(binding)
                await self._round(binding, keys)
            finally:
                upstream.bindings.discard(binding)
                if sf.router.cbs_proxied.get(connector, False) or not binding.put_any:
                    lease.release()
                else:
                    # `$cbs` is link-routed on this connector: nothing would stop the next
                    # device on the connection from using the tokens the replay put.
                    lease.retire()
                    sf.router.retire_upstream(upstream)
            self.rounds += 1
            if self.settled == settled_before and self._work(connector):
                # Nothing went (local links still storing their last messages, or an
                # identity's other-protocol backlog holding its detach): wait for news.
                with trio.move_on_after(RETRY_MAX):
                    await changed.wait()

    async def _round(self, binding: _ForwardBinding, keys: list[str]) -> None:
        limiter = trio.CapacityLimiter(PARALLEL)

        async def one(key: str) -> None:
            async with limiter:
                if binding.lost.is_set():
                    return
                try:
                    await self._replay(binding, key)
                except _Retry as exc:
                    self._backoff(key, str(exc))
                except self.sf.full_errors[1] as exc:  # StoreUnavailable
                    # Out of service (corrupt): nothing can be replayed, so the device's
                    # local links go and its next attach reaches the hub, which is up.
                    self._backoff(key, str(exc))
                    self.sf.drained(key)
                except Exception as exc:  # a replay bug must not take the router down
                    log.exception("store-and-forward: replay of %s failed", key)
                    self._backoff(key, f"{type(exc).__name__}: {exc}")
                else:
                    self._failures.pop(key, None)
                    self._retry_at.pop(key, None)

        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(one, key)

    def _backoff(self, key: str, why: str) -> None:
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = min(RETRY_MAX, RETRY_INITIAL * 2**n)
        self._retry_at[key] = trio.current_time() + delay
        log.info("store-and-forward: replay of %s paused for %.1fs: %s", key, delay, why)

    async def _put_token(self, binding: _ForwardBinding, key: str) -> float:
        """Put a token the gateway issues for `key`; the time it must be renewed by."""
        sf = self.sf
        tokens = sf.router.tokens
        identity = key_identity(key)
        entry = tokens.entry_for(identity) if tokens is not None else None
        if tokens is None or entry is None:
            raise _Retry(f"the gateway holds no credentials for {key} any more")
        try:
            issued = tokens.store.issue_token(entry, tokens.hub_host(binding.connector), sf.clock())
        except CredentialError as exc:
            raise _Retry(f"no token for {key}: {exc}") from None
        done = trio.Event()
        result: list[tuple[int | None, str | None]] = []

        def on_done(status: int | None, description: str | None) -> None:
            result.append((status, description))
            done.set()

        binding.put_any = True
        try:
            binding.upstream.cbs_pair().put_token(
                issued.audience, issued.token,
                PendingPut(binding, issued.audience, None, None, False, None, on_done),  # type: ignore[arg-type]
            )  # fmt: skip
        except LocalProtocolError as exc:
            raise _Retry(f"CBS link unusable: {exc}") from None
        binding.upstream.wake()
        await _wait(done, binding.lost, HUB_WAIT)
        status, description = result[0] if result else (None, "no answer from the hub")
        if status not in _OK_STATUS:
            raise _Retry(f"the hub refused the gateway's token for {key} (status {status}: {description})")
        # Renew at half its life (monotonic deadline for this round).
        return trio.current_time() + max(1.0, (issued.expires_at - issued.issued_at) / 2)

    async def _replay(self, binding: _ForwardBinding, key: str) -> None:
        """Send `key`'s backlog, oldest first, keeping up to `WINDOW` unsettled; delete
        what the hub accepted in batches as it goes. Returns when the backlog is empty;
        raises `_Retry` when the hub did not take a message (it is sent again later,
        after those already in flight)."""
        sf = self.sf
        store = sf.store
        limiter = store.replay_limiter(binding.connector)
        # Messages stored from now on are the device's live traffic, held back only for
        # order: replay_rate bounds the backlog, not them (else a device sending at that
        # rate would never drain its backlog).
        live_from = store.now()
        renew_by = -math.inf
        link: _ReplayLink | None = None
        inflight: dict[Delivery, Any] = {}  # sent, no outcome yet (send order)
        accepted: list[int] = []  # accepted, not yet deleted
        skip: set[int] = set()  # seqs in flight or accepted and not yet deleted
        failed: str | None = None
        try:
            while failed is None:
                if binding.lost.is_set():
                    failed = "upstream connection lost"
                    break
                room = WINDOW - len(inflight)
                peeked = await store.peek(key, len(skip) + room, protocol="amqp") if room > 0 else []
                batch = [m for m in peeked if m.seq not in skip]
                if not batch and not inflight:
                    break
                if batch and link is not None and (link.address != batch[0].address or not link.usable):
                    if inflight:  # a new address (or link) once what is in flight settled
                        batch = []
                    else:
                        link.close()
                        link = None
                if batch and link is None:
                    if trio.current_time() >= renew_by:
                        renew_by = await self._put_token(binding, key)
                    try:
                        link = _ReplayLink(binding, key, batch[0].address)
                    except LocalProtocolError as exc:  # the connection is going
                        raise _Retry(f"upstream connection unusable: {exc}") from None
                    await _wait(link.attached, binding.lost, HUB_WAIT)
                    if link.refused or link.error is not None or not link.attached.is_set():
                        why = link.error.description if link.error is not None else "no answer"
                        raise _Retry(f"the hub refused the link to {batch[0].address!r}: {why}")
                elif batch and trio.current_time() >= renew_by:
                    renew_by = await self._put_token(binding, key)
                assert link is not None
                tags = {d.delivery_tag for d in inflight}
                for msg in batch:
                    if msg.address != link.address:
                        break
                    if msg.stored_at < live_from:
                        await limiter.acquire()
                    if not link.usable:
                        break
                    meta = decode_meta(msg.meta)
                    tag = meta.delivery_tag
                    if tag is None or tag in tags or len(tag) > 32:
                        tag = b"sf-%d" % msg.seq  # fresh: none stored, or a clash in the window
                    try:
                        d = link.send(tag, msg.payload, meta.message_format)
                    except LocalProtocolError as exc:  # the link or connection is going
                        failed = f"cannot send: {exc}"
                        break
                    tags.add(tag)
                    inflight[d] = msg
                    skip.add(msg.seq)
                # Outcomes: wait for the first one if nothing more can be sent.
                if inflight and (len(inflight) >= WINDOW or not batch or not link.usable):
                    with trio.move_on_after(HUB_WAIT * 6) as waited:
                        while link.usable and all(link.outcomes.get(d) is None for d in inflight):
                            await _wait(link.changed, binding.lost, HUB_WAIT * 6)
                    if waited.cancelled_caught:
                        failed = "no outcome from the hub"
                failed = await self._outcomes(link, key, inflight, accepted, skip) or failed
                if not link.usable and inflight:
                    failed = failed or (link.error.description if link.error is not None
                                        else "link lost")  # fmt: skip
                if len(accepted) >= WINDOW // 2 or (accepted and not inflight):
                    await self._delete(binding.connector, key, accepted, skip)
        finally:
            if accepted:
                with trio.CancelScope(shield=True):
                    await self._delete(binding.connector, key, accepted, skip)
            if link is not None:
                link.close()
        if failed is not None:
            if inflight:  # they may have reached the hub: sent again, they may arrive twice
                store.record_duplicate_suspect(binding.connector, key, len(inflight))
            raise _Retry(f"{len(inflight)} message(s) to send again: {failed}")
        sf.drained(key)

    async def _outcomes(self, link: _ReplayLink, key: str, inflight: dict[Delivery, Any],
                        accepted: list[int], skip: set[int]) -> str | None:  # fmt: skip
        """Collect the outcomes that arrived; a reason to stop if one was not a verdict."""
        stop: str | None = None
        for d in [d for d in inflight if link.outcomes.get(d) is not None]:
            msg = inflight.pop(d)
            state = link.outcomes.pop(d)
            if type(state) is Accepted:
                accepted.append(msg.seq)
            elif type(state) is Rejected:
                err = state.error
                why = f"{err.condition}: {err.description}" if err is not None else "rejected"
                log.warning("store-and-forward: the hub rejected stored message %d of %s: %s",
                            msg.seq, key, why)  # fmt: skip
                await self.sf.store.reject(msg, why)
                skip.discard(msg.seq)
                self.settled += 1
            else:
                skip.discard(msg.seq)  # released, modified, or settled without outcome
                stop = f"the hub answered {type(state).__name__.lower()}"
        return stop

    async def _delete(self, connector: str, key: str, accepted: list[int], skip: set[int]) -> None:
        seqs = list(accepted)
        accepted.clear()
        await self.sf.store.delete(seqs)
        skip.difference_update(seqs)
        self.sf.store.record_replayed(connector, key, len(seqs))
        self.settled += len(seqs)


__all__ = ["Forwarder", "HUB_UNREACHABLE", "INTERNAL_ERROR", "StoreAndForward", "WINDOW"]
