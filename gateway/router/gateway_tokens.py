"""Tokens the gateway puts for devices whose keys it holds (``credentials:``).

Direction: above `device` and `upstream` (it uses both); what it needs of the
router and of a binding is declared here (`TokensRouter`, `Binding`).

When a device connection attaches ``devices/{id}/...`` for an identity it has
no token for on its upstream connection, and the credential store has an
entry for that identity, the gateway checks the device's local proof (source
address, the local password it gave as SASL PLAIN ``{id}@sas.{hub}``, or
``trust: network``), issues a SAS token for the connector's hub host and puts
it over its own CBS link pair on that upstream connection; only then is the
attach forwarded. A `Grant` records the token; the renewal loop puts a fresh
one at ``renew_at`` of its lifetime for as long as the device connection has
links for that identity, retrying with backoff when the hub does not accept
it. A token that expires anyway is dropped (the hub detaches the identity's
links and the router relays that); the next attach gets a fresh one.

Keys, tokens and passwords never reach a log line or an error description:
only identities, addresses and the store's safe ``reason`` strings do.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from gateway.amqp import LocalProtocolError
from gateway.amqp.performatives import Error
from gateway.auth.credentials import CredentialError, CredentialStore, DeviceCredential
from gateway.auth.local_auth import LocalAuthResult
from gateway.auth.tokens import IssuedToken, looks_like_sas_token
from gateway.logsafe import shown_plain, source

from .cbs import PendingPut
from .device import DeviceConn, PlainCheck
from .identity import IdentityPath, audience_path, covers, identity_of_address, parse_plain_username
from .linkpair import FORCED, UNAUTHORIZED, PairState, amqp_error
from .observe import RouterObserver
from .upstream import UpstreamConn

log = logging.getLogger("gateway.router.tokens")

# How long a put-token of the gateway's may wait for the hub's answer.
PUT_WAIT = 10.0
# Local password checks (scrypt, ~40 ms and 16 MiB each) running at once.
LOCAL_AUTH_THREADS = 2

_OK_STATUS = (200, 202)


def who(identity: IdentityPath) -> str:
    """``dev1`` or ``dev1/modules/m1``, for log lines and error descriptions."""
    return "/".join(identity[1:])


def _digest(password: str) -> bytes:
    return hashlib.sha256(password.encode("utf-8", "surrogatepass")).digest()


class TokensRouter(Protocol):
    """What the gateway's tokens need of the router (`core.Router`)."""

    @property
    def config(self) -> Any: ...  # gateway.config.GatewayConfig
    @property
    def observer(self) -> RouterObserver: ...


class Binding(Protocol):
    """A device's place on one upstream connection (`core.Binding`)."""

    @property
    def device(self) -> DeviceConn: ...
    @property
    def connector(self) -> str: ...
    @property
    def upstream(self) -> UpstreamConn | None: ...
    @property
    def valid(self) -> bool: ...
    @property
    def grants(self) -> dict[IdentityPath, Grant]: ...
    @property
    def injections(self) -> dict[IdentityPath, Injection]: ...
    def authorise(self, audience: str) -> None: ...
    def deauthorise(self, path: IdentityPath) -> None: ...
    def put_started(self) -> None: ...
    def put_finished(self) -> None: ...


@dataclass(eq=False)
class Grant:
    """A token the gateway put for one identity on one device connection's binding."""

    binding: Binding
    identity: IdentityPath
    entry: DeviceCredential = field(repr=False)
    audience: str
    expires_at: float
    dropped: bool = False


@dataclass(eq=False)
class Injection:
    """A first token being put for an identity; attaches for it wait on ``done``."""

    done: trio.Event = field(default_factory=trio.Event)
    error: Error | None = None


class GatewayTokens:
    """Issues, puts and renews the tokens the gateway holds for devices."""

    def __init__(self, router: TokensRouter, store: CredentialStore, *,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.router = router
        self.store = store
        self.clock = clock  # Unix seconds: a SAS token's expiry is wall-clock time
        self.schedule = store.renewal_schedule()
        self.renewal_failures = 0
        self._limiter = trio.CapacityLimiter(LOCAL_AUTH_THREADS)
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None

    def set_store(self, store: CredentialStore) -> None:
        """Use a reloaded store for new tokens; tokens already held keep their schedule."""
        self.store = store

    # ------------------------------------------------------------------ lookup

    def entry_for(self, identity: IdentityPath) -> DeviceCredential | None:
        """The store's entry for a ``devices/{id}[/modules/{mid}]`` identity, if the
        gateway can put a token for it (X.509 identities need their certificate on
        a connection of their own, which a pooled connection cannot carry)."""
        if len(identity) == 2:
            entry = self.store.lookup(identity[1])
        elif len(identity) == 4:
            entry = self.store.lookup(identity[1], identity[3])
        else:
            return None
        if entry is None or not entry.uses_token:
            return None
        return entry

    # -------------------------------------------------------- local authentication

    def sasl_authenticator(self, device: DeviceConn) -> Callable[..., bool]:
        """The device engine's SASL ``authenticate`` callback."""

        def authenticate(mechanism: str, identity: str | None, password: str | None,
                         hostname: str | None) -> bool:  # fmt: skip
            if mechanism != "PLAIN" or identity is None:
                return True
            return self._plain_login(device, identity, password or "")

        return authenticate

    def sasl_precheck(self, device: DeviceConn) -> Callable[[str, str], Awaitable[None]]:
        """For the listener's gate: check a PLAIN local login in a worker thread before
        the engine judges the sasl-init (scrypt must not stall the event loop)."""

        async def precheck(username: str, password: str) -> None:
            entry = self._plain_entry(username, password)
            if entry is None:
                return
            result = await trio.to_thread.run_sync(
                self.store.authenticate_local, entry, device.peer[0], password,
                limiter=self._limiter,
            )  # fmt: skip
            device.plain_check = PlainCheck(username, _digest(password), result)

        return precheck

    def _plain_entry(self, username: str, password: str) -> DeviceCredential | None:
        """The entry a PLAIN login with a local password is for; None when the login
        is not the gateway's business (a SAS token of the device's own, another user
        name form, an identity the gateway holds nothing for)."""
        plain = parse_plain_username(username)
        if plain is None or looks_like_sas_token(password):
            return None
        return self.entry_for(plain.path)

    def _plain_login(self, device: DeviceConn, username: str, password: str) -> bool:
        entry = self._plain_entry(username, password)
        if entry is None:
            return True
        check = device.plain_check
        if check is not None and check.username == username and check.digest == _digest(password):
            result = check.result
        else:
            # Not pre-checked (no gate in front of this engine): check here.
            result = self.store.authenticate_local(entry, device.peer[0], password)
        device.plain_check = None
        if not result.ok:
            log.warning("device %s (%s:%d): SASL PLAIN login as %s refused: %s", device.id,
                        device.peer[0], device.peer[1], shown_plain(entry.identity), result.reason,
                        extra=source(device.peer[0]))  # fmt: skip
            return False
        device.local_auth[entry.identity] = result
        log.info("device %s: SASL PLAIN login: %s", device.id, result.reason)
        return True

    def local_auth(self, device: DeviceConn, entry: DeviceCredential) -> LocalAuthResult:
        """The device's local proof for `entry`: its PLAIN login if that was for this
        identity, else its address (no password was given for this identity)."""
        cached = device.local_auth.get(entry.identity)
        if cached is not None:
            return cached
        result = self.store.authenticate_local(entry, device.peer[0], None)
        device.local_auth[entry.identity] = result
        return result

    # --------------------------------------------------------------- first token

    def injection(self, b: Binding, identity: IdentityPath, entry: DeviceCredential) -> Injection:
        """The injection under way for `identity` on `b`, or a new one."""
        inj = b.injections.get(identity)
        if inj is None:
            inj = Injection()
            b.injections[identity] = inj
            b.put_started()  # attaches of the device wait for it like for its own puts
            assert self._nursery is not None
            self._nursery.start_soon(self._inject, b, identity, entry, inj)
        return inj

    async def _inject(self, b: Binding, identity: IdentityPath, entry: DeviceCredential,
                      inj: Injection) -> None:  # fmt: skip
        device = b.device
        try:
            inj.error = await self._first_token(b, identity, entry)
        finally:
            if b.injections.get(identity) is inj:
                del b.injections[identity]
            b.put_finished()
            inj.done.set()
            device.wake()

    async def _first_token(self, b: Binding, identity: IdentityPath,
                           entry: DeviceCredential) -> Error | None:  # fmt: skip
        device = b.device
        result = self.local_auth(device, entry)
        if not result.ok:
            hint = ""
            if entry.local.password_hash is not None and device.plain is None:
                hint = f" (connect with SASL PLAIN {shown_plain(entry.identity)}@sas.<hub> and its local password)"
            log.warning("device %s (%s:%d): attach for %s refused: local authentication failed: "
                        "%s%s", device.id, device.peer[0], device.peer[1], shown_plain(who(identity)),
                        result.reason, hint, extra=source(device.peer[0]))  # fmt: skip
            return amqp_error(UNAUTHORIZED, f"local authentication failed: {result.reason}")
        try:
            issued = self.store.issue_token(entry, self.hub_host(b.connector), self.clock())
        except CredentialError as exc:
            log.warning("device %s: no token for %s: %s", device.id, who(identity), exc)
            return amqp_error(UNAUTHORIZED, f"the gateway cannot issue a token for {who(identity)}")
        status, description = await self._put(b, issued)
        if not b.valid:
            return amqp_error(FORCED, "upstream connection lost")
        if status not in _OK_STATUS:
            log.warning("device %s: the hub refused the gateway's token for %s (status %s: %s)",
                        device.id, who(identity), status, description)  # fmt: skip
            if status is None:
                return amqp_error(FORCED, f"no answer from the hub to the token for {who(identity)}")
            return amqp_error(
                UNAUTHORIZED,
                f"the hub refused the gateway's token for {who(identity)} "
                f"(status {status}: {description})",
            )
        old = b.grants.get(identity)
        if old is not None:
            self._drop(old)
        grant = Grant(b, identity, entry, issued.audience, issued.expires_at)
        b.grants[identity] = grant
        self.schedule.add(grant, issued.issued_at, issued.expires_at)
        log.info("device %s: gateway token for %s put on upstream %s, expires in %.0fs",
                 device.id, who(identity), b.upstream.id if b.upstream else "?",
                 issued.expires_at - self.clock())  # fmt: skip
        self.poke()
        return None

    def hub_host(self, connector: str) -> str:
        c = self.router.config.connector(connector)
        return str(getattr(c, "hostname", None) or c.host)

    async def _put(self, b: Binding, issued: IssuedToken) -> tuple[int | None, str | None]:
        """Put `issued` over the gateway's CBS pair of `b`'s upstream connection; the
        hub's status and description (None: no answer, or the connection went)."""
        up = b.upstream
        if up is None or not b.valid:
            return None, "upstream connection lost"
        done = trio.Event()
        outcome: list[tuple[int | None, str | None]] = []

        def on_done(status: int | None, description: str | None) -> None:
            outcome.append((status, description))
            done.set()

        b.put_started()
        try:
            up.cbs_pair().put_token(
                issued.audience,
                issued.token,
                PendingPut(b, issued.audience, None, None, False, None, on_done),
            )
        except LocalProtocolError as exc:
            b.put_finished()
            return None, f"CBS link unusable: {exc}"
        up.wake()
        with trio.move_on_after(PUT_WAIT):
            await done.wait()
        return outcome[0] if outcome else (None, "no answer from the hub")

    # ----------------------------------------------------------------- renewal

    def poke(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew held tokens when due; runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                self._wake = trio.Event()
                now = self.clock()
                for grant in self.schedule.due(now):
                    if self._wanted(grant):
                        nursery.start_soon(self._renew, grant)
                    else:
                        self._drop(grant)
                for grant in self.schedule.expired(now):
                    if not self.schedule.in_progress(grant):
                        b = grant.binding
                        log.warning("device %s: the token for %s expired before it could be "
                                    "renewed", b.device.id, who(grant.identity))  # fmt: skip
                        self._drop(grant)
                self._report_expiry(now)
                deadline = self._next_deadline()
                delay = math.inf if deadline is None else max(0.0, deadline - now)
                with trio.move_on_after(delay):
                    await self._wake.wait()

    def _next_deadline(self) -> float | None:
        times = [
            min(self.schedule.renew_time(g) or math.inf, self.schedule.expires_at(g) or math.inf)
            for g in self.schedule
            if not self.schedule.in_progress(g)
        ]
        return min(times, default=None)

    def _wanted(self, grant: Grant) -> bool:
        """Renew while the device connection has links (or attaches) for the identity."""
        b = grant.binding
        if grant.dropped or b.device.closed or not b.valid:
            return False
        for pair in b.device.pairs:
            if pair.connector != b.connector or pair.state is PairState.DONE:
                continue
            identity = identity_of_address(pair.address)
            if identity is not None and covers(grant.identity, identity):
                return True
        return False

    async def _renew(self, grant: Grant) -> None:
        b = grant.binding
        try:
            issued = self.store.issue_token(grant.entry, self.hub_host(b.connector), self.clock())
        except CredentialError as exc:
            status, description = None, str(exc)
        else:
            status, description = await self._put(b, issued)
        if grant.dropped:
            return
        if status in _OK_STATUS:
            grant.expires_at = issued.expires_at
            self.schedule.add(grant, issued.issued_at, issued.expires_at)
            log.debug("device %s: token for %s renewed, expires in %.0fs", b.device.id,
                      who(grant.identity), issued.expires_at - self.clock())  # fmt: skip
        else:
            self.renewal_failures += 1
            retry = self.schedule.failed(grant, self.clock())
            wait = (retry - self.clock()) if retry is not None else 0.0
            log.warning("device %s: renewing the token for %s failed (status %s: %s); "
                        "retrying in %.1fs", b.device.id, who(grant.identity), status,
                        description, wait)  # fmt: skip
            self.router.observer.on_token_renewal_failure(who(grant.identity))
        self.poke()

    def _drop(self, grant: Grant) -> None:
        """Stop renewing `grant`; its identity needs a new token on that binding."""
        if grant.dropped:
            return
        grant.dropped = True
        self.schedule.remove(grant)
        b = grant.binding
        if b.grants.get(grant.identity) is grant:
            del b.grants[grant.identity]
            b.deauthorise(audience_path(grant.audience))
        self.poke()

    def drop_binding(self, b: Binding) -> None:
        """The binding's upstream connection or device is gone: so are its tokens."""
        for grant in list(b.grants.values()):
            self._drop(grant)

    def _report_expiry(self, now: float) -> None:
        soonest = self.schedule.soonest_expiry()
        self.router.observer.on_token_expiry(None if soonest is None else soonest - now)

    def soonest_expiry_in(self) -> float | None:
        """Seconds until the soonest held token expires (None: none held)."""
        soonest = self.schedule.soonest_expiry()
        return None if soonest is None else soonest - self.clock()

    def describe(self) -> list[dict[str, Any]]:
        """Held tokens for operators: device connection, identity, expiry (never the token)."""
        now = self.clock()
        return [
            {
                "connection": g.binding.device.id,
                "identity": who(g.identity),
                "upstream": g.binding.upstream.id if g.binding.upstream else None,
                "expires_in": round(g.expires_at - now, 1),
                "failures": self.schedule.failures(g),
            }
            for g in self.schedule
        ]
