"""The link-routing core: routes attaches, binds devices to upstream connections.

Direction: the top of the router; it imports every other piece and owns the
wiring. Its I/O comes in through `ports.ConnectorIO` (the pools and the
upstream connections' drivers), its reporting goes out through
`observe.RouterObserver`; it imports neither `gateway.net` nor `gateway.ops`.

A device connection gets one `Binding` per connector it uses: a lease on one
upstream connection from that connector's pool, taken at its first routed
attach or CBS request and kept until the device (or the upstream connection)
goes. Where the connector proxies `$cbs` (``cbs: proxy``, or ``auto`` on a
shared upstream connection) `$cbs` is served locally (see `cbs.py`) and
`devices/{id}` attaches are admitted only for identities the binding
authorised (design item 8); with ``cbs: route`` (``auto`` with
``max_devices_per_connection: 1``) everything, `$cbs` included, is
link-routed verbatim.

With a credential store, an attach for an identity the device has no token
for, and the store holds a key for, first gets a token put by the gateway
(see `gateway_tokens.py`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from gateway.amqp import Connection, Delivery, Link
from gateway.amqp.performatives import Attach
from gateway.auth.dps import registration_of
from gateway.logsafe import shown, shown_plain, source

from .cbs import PUT_TOKEN, CbsRequest, PendingPut, is_cbs_address
from .device import DeviceConn
from .dps import RegistrationRelay, is_relay
from .forwarder import StoreAndForward
from .gateway_tokens import GatewayTokens, Grant, Injection
from .identity import IdentityPath, audience_path, covers, identity_of_address, token_audience
from .linkpair import (
    FORCED,
    NOT_FOUND,
    UNAUTHORIZED,
    LinkPair,
    PairState,
    amqp_error,
    refuse_attach,
    timed_handler,
)
from .observe import NullObserver, RouterObserver, observes_relay_latency
from .ports import ConnectorIO, EventHandler, Lease, Pool, Unavailable, UpstreamEnd
from .routes import RouteTable, attach_direction_and_address
from .upstream import UpstreamConn

log = logging.getLogger("gateway.router")

# How long an attach may wait for put-tokens of the same device still in flight.
PUT_WAIT = 10.0
# How long an attach may wait in all (its device's puts, then a token put by the gateway).
ADMIT_WAIT = PUT_WAIT + 5.0
# How long a closing upstream connection may wait for the hub's close.
CLOSE_WAIT = 5.0


class Binding:
    """A device connection's place on one upstream connection of one connector."""

    def __init__(self, router: Router, device: DeviceConn, connector: str,
                 pool: Pool[UpstreamConn]) -> None:  # fmt: skip
        self.router = router
        self.device = device
        self.connector = connector
        self.pool = pool
        self.shared = pool.max_devices_per_connection > 1
        self.proxy_cbs = router.cbs_proxied.get(connector, self.shared)
        self.lease: Lease[UpstreamConn] | None = None
        self.upstream: UpstreamConn | None = None
        self.error: Unavailable | None = None
        self.ready = trio.Event()
        self.authorised: list[IdentityPath] = []
        self.puts_in_flight = 0
        self._puts_changed = trio.Event()
        self._invalid = False
        # Tokens the gateway put (or is putting) for the device on this binding.
        self.grants: dict[IdentityPath, Grant] = {}
        self.injections: dict[IdentityPath, Injection] = {}

    @property
    def valid(self) -> bool:
        return (
            self.ready.is_set()
            and self.error is None
            and not self._invalid
            and self.upstream is not None
            and self.upstream.usable
        )

    def authorise(self, audience: str) -> None:
        path = audience_path(audience)
        if path not in self.authorised:
            self.authorised.append(path)

    def deauthorise(self, path: IdentityPath) -> None:
        if path in self.authorised:
            self.authorised.remove(path)

    def is_authorised(self, identity: IdentityPath) -> bool:
        return any(covers(a, identity) for a in self.authorised)

    def put_started(self) -> None:
        self.puts_in_flight += 1

    def put_finished(self) -> None:
        self.puts_in_flight = max(0, self.puts_in_flight - 1)
        self._puts_changed.set()
        self._puts_changed = trio.Event()

    async def wait_puts(self) -> None:
        await self._puts_changed.wait()

    def invalidate(self) -> None:
        """The upstream connection is gone; the next attach takes a new binding."""
        self._invalid = True
        if self.router.tokens is not None:
            self.router.tokens.drop_binding(self)
        self.authorised.clear()
        self._puts_changed.set()
        if self.lease is not None:
            self.lease.release()
        if self.device.bindings.get(self.connector) is self:
            del self.device.bindings[self.connector]

    def release(self) -> None:
        """The device is gone. A dedicated upstream connection goes with it: a token
        its device put there must not serve whoever gets the connection next."""
        self._invalid = True
        if self.router.tokens is not None:
            self.router.tokens.drop_binding(self)
        up = self.upstream
        if up is not None:
            up.bindings.discard(self)
            up.end_sessions_of(self.device)
        if self.lease is None:
            return
        if self.shared or up is None or up.lost:
            self.lease.release()
        else:
            self.lease.retire()
            self.router.retire_upstream(up)


class Router:
    """Routes device attaches over pooled upstream connections.

    ``connector_io`` reaches the connectors (see `ports.ConnectorIO`; the
    daemon hands in `gateway.net.upstream_io.AmqpConnectorIO`). ``credentials``
    (a `CredentialStore`, or None: no gateway-held tokens) lets the gateway put
    tokens for devices it holds keys for; ``clock`` is the wall clock those
    tokens' expiry is reckoned in.
    """

    def __init__(self, config: Any, *, connector_io: ConnectorIO,
                 observer: RouterObserver | None = None,
                 rng: Callable[[], float] = random.random, tracer: Any = None,
                 credentials: Any = None, clock: Callable[[], float] = time.time,
                 store: Any = None) -> None:  # fmt: skip
        self.config = config
        self.tracer = tracer  # frame trace (gateway.ops.trace.FrameTracer), or None
        self.container_id = str(config.gateway.id)
        self.routes = RouteTable.from_config(config.link_routes)
        self.observer: RouterObserver = observer if observer is not None else NullObserver()
        # Handlers read the clock for the relay latency only for an observer of it.
        self._latency = observes_relay_latency(self.observer)
        self.io = connector_io
        self.devices: set[DeviceConn] = set()
        self.upstreams: set[UpstreamConn] = set()
        self.pools: dict[str, Pool[UpstreamConn]] = {}
        # Connector name -> $cbs served by the gateway (True) or link-routed (False).
        self.cbs_proxied: dict[str, bool] = {}
        # Store-and-forward (a `gateway.store.MessageStore`, or None: off), see forwarder.py.
        self.sf: StoreAndForward | None = None
        pool_observer = _PoolWatch(self.observer, self)
        for connector in config.connectors:
            if getattr(connector, "protocol", "amqp") != "amqp" or is_relay(connector):
                continue
            self.cbs_proxied[connector.name] = _cbs_proxied(connector)
            self.pools[connector.name] = connector_io.pool(
                connector, self._connect_fn(connector), rng=rng, observer=pool_observer,
                close=self.retire_upstream,
            )
        # Connectors with `sasl: relay`: a connection per device, its login relayed.
        self.relay = RegistrationRelay(self)
        self._nursery: trio.Nursery | None = None
        self.stopping = False
        self._clock = clock
        self.tokens: GatewayTokens | None = None
        if credentials is not None:
            self.tokens = GatewayTokens(self, credentials, clock=clock)
        if store is not None:
            self.set_store(store)

    def set_store(self, store: Any) -> None:
        """Turn store-and-forward on with `store` (before `run`)."""
        self.sf = StoreAndForward(self, store, clock=self._clock)

    def set_credentials(self, credentials: Any) -> None:
        """Use a (reloaded) credential store for tokens issued from now on."""
        if self.tokens is not None:
            self.tokens.set_store(credentials)
            return
        self.tokens = GatewayTokens(self, credentials, clock=self._clock)
        if self._nursery is not None:
            self._nursery.start_soon(self.tokens.run)

    def sasl_authenticator(self, device: DeviceConn) -> Callable[..., bool | int]:
        """The SASL ``authenticate`` callback for a device engine. A provisioning login
        (``{idScope}/registrations/{regId}``) gets the relayed outcome (see dps.py);
        other logins are accepted unless the gateway holds credentials to check."""
        held = self.tokens.sasl_authenticator(device) if self.tokens is not None else None

        def authenticate(mechanism: str, identity: str | None, password: str | None,
                         hostname: str | None) -> bool | int:  # fmt: skip
            if mechanism == "PLAIN" and registration_of(identity) is not None:
                assert identity is not None
                return self.relay.verdict(device, identity)
            return held(mechanism, identity, password, hostname) if held is not None else True

        return authenticate

    def sasl_precheck(self, device: DeviceConn) -> Callable[[str, str, bytes], Awaitable[None]] | None:
        """What the listener runs on a device's SASL PLAIN login (the sasl-init frame
        held back) before the engine judges it (None: nothing to check)."""
        held = None
        if self.tokens is not None and len(self.tokens.store):
            held = self.tokens.sasl_precheck(device)
        if held is None and not self.relay.connectors:
            return None

        async def precheck(username: str, password: str, frame: bytes) -> None:
            if registration_of(username) is not None:
                if self.relay.connectors:
                    await self.relay.login(device, username, password, frame)
                return
            if held is not None:
                await held(username, password)

        return precheck

    # -------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[Router] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for pool in self.pools.values():
                await nursery.start(pool.run)
            if self.tokens is not None:
                await nursery.start(self.tokens.run)
            if self.sf is not None:
                await nursery.start(self.sf.forwarder.run)
            task_status.started(self)
            await trio.sleep_forever()

    def shutdown(self) -> None:
        """Detach every link, close every connection (drivers then finish)."""
        self.stopping = True
        for pool in self.pools.values():
            pool.close()
        for device in list(self.devices):
            device.shutdown("the gateway is shutting down")
        for upstream in list(self.upstreams):
            upstream.shutdown()

    def new_device(self, listener: Any, peer: tuple[str, int]) -> DeviceConn:
        device = DeviceConn(self, listener, peer)
        self.devices.add(device)
        self.observer.on_device_open(device)
        return device

    def device_handler(self, device: DeviceConn) -> EventHandler:
        """What the device's engine driver hands its events to: the device's
        handler, timed for the observer's relay latency if it observes it."""
        if self._latency:
            return timed_handler(device.handle, self.observer.on_relay_latency)
        return device.handle

    def device_gone(self, device: DeviceConn) -> None:
        self.relay.device_gone(device, self._nursery)
        self.devices.discard(device)
        self.observer.on_device_closed(device)

    def upstream_gone(self, upstream: UpstreamConn) -> None:
        if upstream in self.upstreams:
            self.upstreams.discard(upstream)
            self.observer.on_upstream_closed(upstream)

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Run `fn(*args)` in the router's nursery (False: the router is not running)."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True

    def retire_upstream(self, upstream: UpstreamConn) -> None:
        """Close an upstream connection cleanly; abort it if the hub does not answer."""
        upstream.shutdown()
        if self._nursery is not None:
            self._nursery.start_soon(self._abort_later, upstream)

    @staticmethod
    async def _abort_later(upstream: UpstreamConn) -> None:
        await trio.sleep(CLOSE_WAIT)
        if upstream.driver is not None and not upstream.engine.closed:
            upstream.driver.abort()

    def _connect_fn(self, connector: Any) -> Callable[[int, Callable[[Any], None]], Any]:
        async def connect(slot: int, on_up: Callable[[Any], None]) -> None:
            profile = self.config.tls_profile_for(connector)
            made: list[UpstreamConn] = []

            def start(engine: Connection, remote: str) -> UpstreamEnd:
                upstream = UpstreamConn(self, connector.name, slot, engine)
                made.append(upstream)

                def opened(driver: Any) -> None:
                    self.upstreams.add(upstream)
                    self.observer.on_upstream_open(upstream, remote)
                    log.info("connector %s: upstream %s open to %s", connector.name,
                             upstream.id, remote)  # fmt: skip
                    on_up(upstream)

                handler: EventHandler = upstream.handle
                if self._latency:  # hub -> device relay latency, as for devices
                    handler = timed_handler(handler, self.observer.on_relay_latency)
                return UpstreamEnd(upstream.id, handler, opened, upstream.set_driver)

            try:
                await self.io.connect(connector, profile, self.container_id, start,
                                      tracer=self.tracer)  # fmt: skip
            finally:
                if made:  # the connection got as far as its engine
                    driver = made[0].driver
                    why = driver.transport_error if driver is not None else None
                    made[0].fail(None, why or "connection ended")

        return connect

    # --------------------------------------------------------------- binding

    def binding_for(self, device: DeviceConn, connector: str) -> Binding:
        b = device.bindings.get(connector)
        if b is not None and (not b.ready.is_set() or b.valid):
            return b
        relay = connector in self.relay.connectors
        pool: Any = _DEDICATED if relay else self.pools[connector]
        b = Binding(self, device, connector, pool)
        device.bindings[connector] = b
        assert self._nursery is not None
        self._nursery.start_soon(self._bind_relay if relay else self._bind, b)
        return b

    async def _bind_relay(self, b: Binding) -> None:
        """Bind a provisioning device to the connection its login was relayed on."""
        device = b.device
        taken = self.relay.take_stream(device)
        if taken is None:
            b.error = self.io.unavailable("the relayed login's connection is gone", NOT_FOUND)  # type: ignore[assignment]
            b.ready.set()
            return
        connector, stream = taken
        profile = self.config.tls_profile_for(connector)
        settled = trio.Event()
        made: list[UpstreamConn] = []

        def start(engine: Connection, remote: str) -> UpstreamEnd:
            upstream = UpstreamConn(self, connector.name, 0, engine)
            made.append(upstream)

            def opened(driver: Any) -> None:
                self.upstreams.add(upstream)
                self.observer.on_upstream_open(upstream, connector.target)
                log.info("connector %s: upstream %s open for device %s", connector.name,
                         upstream.id, device.id)  # fmt: skip
                b.lease = _DedicatedLease()
                b.upstream = upstream
                upstream.bindings.add(b)
                settled.set()

            return UpstreamEnd(upstream.id, upstream.handle, opened, upstream.set_driver)

        async def run() -> None:
            try:
                await self.io.connect_relayed(connector, profile, self.container_id, stream,
                                              start, tracer=self.tracer)  # fmt: skip
            except self.io.unavailable as exc:  # it ended before the service's open
                b.error = self.io.unavailable(f"connector {connector.name}: {exc}")  # type: ignore[assignment]
            finally:
                if made:
                    driver = made[0].driver
                    why = driver.transport_error if driver is not None else None
                    made[0].fail(None, why or "connection ended")
                settled.set()
                # The device's login was for this connection only: it goes too.
                device.shutdown(f"the connection to {connector.name} ended")

        assert self._nursery is not None
        self._nursery.start_soon(run)
        with trio.move_on_after(self.io.open_budget(connector)):
            await settled.wait()
        if b.upstream is None and b.error is None:
            b.error = self.io.unavailable(f"connector {connector.name} did not open in time")  # type: ignore[assignment]
        b.ready.set()

    async def _bind(self, b: Binding) -> None:
        device = b.device
        try:
            lease = await self._acquire(b.pool, device)
        except self.io.unavailable as exc:
            log.warning("device %s: connector %s unavailable: %s", device.id, b.connector,
                        exc.description)  # fmt: skip
            b.error = exc  # type: ignore[assignment]
            b.ready.set()
            return
        if device.closed:
            lease.release()
            b.error = self.io.unavailable("device gone")  # type: ignore[assignment]
            b.ready.set()
            return
        b.lease = lease
        b.upstream = lease.conn
        lease.conn.bindings.add(b)
        if device.plain is not None and device.plain_token is not None:
            await self._put_plain_token(b)
        if b.proxy_cbs and device.tokens_for(b.connector):
            await self._replay_tokens(b)
        b.ready.set()

    @staticmethod
    async def _acquire(pool: Pool[UpstreamConn], device: DeviceConn) -> Lease[UpstreamConn]:
        """A lease on a usable connection. Right after an upstream connection is lost
        its pool slot may not have noticed yet: wait for that, then lease again."""
        for _ in range(3):
            lease = await pool.acquire(owner=device)
            if lease.conn.usable:
                return lease
            with trio.move_on_after(CLOSE_WAIT):
                await lease.lost.wait()
            lease.release()
        return lease

    async def _replay_tokens(self, b: Binding) -> None:
        """The device's tokens died with its previous upstream connection, but its
        own connection to us did not: put them again, as it put them, so the
        device's links can come back without it redoing CBS."""
        assert b.upstream is not None
        device = b.device
        done = trio.Event()
        waiting = 0

        def on_done(status: int | None, description: str | None) -> None:
            nonlocal waiting
            waiting -= 1
            if waiting == 0:
                done.set()

        cbs = b.upstream.cbs_pair()
        for audience, request in device.tokens_for(b.connector):
            waiting += 1
            b.put_started()
            cbs.forward(request, PendingPut(b, audience, None, None, False, None, on_done,
                                            request), False)  # fmt: skip
        with trio.move_on_after(PUT_WAIT):
            await done.wait()
        log.info("device %s: %d token(s) put again on upstream %s", device.id,
                 len(device.tokens_for(b.connector)), b.upstream.id)  # fmt: skip

    async def _put_plain_token(self, b: Binding) -> None:
        """A SASL PLAIN device gave us its SAS token: put it over CBS for it."""
        device = b.device
        token = device.plain_token
        assert token is not None and b.upstream is not None
        audience = token_audience(token)
        if audience is None:
            return
        done = trio.Event()
        outcome: list[Any] = []

        def on_done(status: int | None, description: str | None) -> None:
            outcome.append((status, description))
            done.set()

        b.put_started()
        b.upstream.cbs_pair().put_token(
            audience, token, PendingPut(b, audience, None, None, False, None, on_done)
        )
        with trio.move_on_after(PUT_WAIT):
            await done.wait()
        status = outcome[0][0] if outcome else None
        if status not in (200, 202):
            log.warning("device %s: the hub refused its SASL PLAIN token (status %s)", device.id,
                        status)  # fmt: skip

    # ----------------------------------------------------------------- attach

    def device_attach(self, device: DeviceConn, link: Link, attach: Attach) -> None:
        if self.stopping:
            refuse_attach(link, amqp_error(FORCED, "the gateway is shutting down"))
            return
        direction, address = attach_direction_and_address(bool(attach.role), attach.source,
                                                          attach.target)  # fmt: skip
        match = self.routes.match(None if address is None else str(address), direction)
        if match is None:
            self.observer.on_attach_refused(NOT_FOUND)
            log.info("device %s: attach %s refused: no route for %s address %s", device.id,
                     shown(attach.name), direction, shown(address),
                     extra=source(device.peer[0]))  # fmt: skip
            refuse_attach(link, amqp_error(NOT_FOUND, f"no route for address {shown(address)}"))
            return
        connector = match.route.connector
        if connector in self.relay.connectors:
            why = self.relay.admits(device, connector, str(match.address))
            if why is not None:
                self.observer.on_attach_refused(NOT_FOUND)
                log.info("device %s: attach %s to %s refused: %s", device.id,
                         shown(attach.name), shown(address), why,
                         extra=source(device.peer[0]))  # fmt: skip
                refuse_attach(link, amqp_error(NOT_FOUND, why))
                return
        pool = self.pools.get(connector)
        if pool is None and connector not in self.relay.connectors:
            self.observer.on_attach_refused(NOT_FOUND)
            refuse_attach(link, amqp_error(NOT_FOUND, f"connector {connector!r} is not available"))
            return
        if self.cbs_proxied.get(connector, False) and is_cbs_address(match.address):
            device.cbs.attach(link, attach, connector)
            return
        if self.sf is not None and self.sf.intercept(device, link, attach, str(match.address),
                                                     direction, connector):  # fmt: skip
            return
        pair = LinkPair(device, link, attach, match, direction, connector)
        device.pairs.add(pair)
        b = self.binding_for(device, connector)
        if b.ready.is_set() and self._admit(pair, b) is True:
            return
        assert self._nursery is not None
        self._nursery.start_soon(self._admit_later, pair, b)

    def _admit(self, pair: LinkPair, b: Binding, *,
               wait_for_puts: bool = True) -> bool | tuple[IdentityPath, Any]:  # fmt: skip
        """Try to tunnel `pair` over `b`. True: done (tunnelled or refused). False: it
        must wait for put-tokens of the same device still in flight (SDKs put, then
        attach). ``(identity, entry)``: the gateway must put a token for the identity
        first (it holds the device's key)."""
        if pair.state is not PairState.PENDING:
            return True
        if self.sf is not None and (b.error is not None or not b.valid) and self.sf.fallback(
            pair, b.error.condition if b.error is not None else FORCED
        ):
            return True
        if b.error is not None:
            self.observer.on_attach_refused(b.error.condition)
            pair.refuse(b.error.condition, b.error.description)
            return True
        if not b.valid:
            pair.refuse(FORCED, "upstream connection lost")
            return True
        identity = identity_of_address(pair.address)
        if identity is not None and not b.is_authorised(identity):
            if b.puts_in_flight and wait_for_puts:
                return False
            entry = self._held_entry(pair, b, identity)
            if entry is not None:
                return identity, entry
            if b.proxy_cbs:
                self._refuse_unauthorised(pair, identity)
                return True
        assert b.upstream is not None
        pair.open_upstream(b.upstream)
        if pair.state is PairState.ATTACHING:
            self.observer.on_link_opened(pair)
        return True

    def _held_entry(self, pair: LinkPair, b: Binding, identity: IdentityPath) -> Any:
        """The credential the gateway would put a token with for `identity`, or None
        (the device's own credentials apply). Where `$cbs` is link-routed the gateway
        cannot see the device's own tokens: a device with CBS links of its own
        manages its tokens itself."""
        if self.tokens is None:
            return None
        if not b.proxy_cbs and any(
            is_cbs_address(p.address) and p.connector == b.connector and p.state is not PairState.DONE
            for p in pair.device.pairs
        ):
            return None
        return self.tokens.entry_for(identity)

    def _refuse_unauthorised(self, pair: LinkPair, identity: IdentityPath) -> None:
        self.observer.on_attach_refused(UNAUTHORIZED)
        who = "/".join(identity)
        log.info("device %s: attach to %s refused: no token for %s on this connection",
                 pair.device.id, shown(pair.address), shown_plain(who),
                 extra=source(pair.device.peer[0]))  # fmt: skip
        pair.refuse(UNAUTHORIZED, f"no valid token for {shown_plain(who)} was put on this connection")

    async def _admit_later(self, pair: LinkPair, b: Binding) -> None:
        await b.ready.wait()
        with trio.move_on_after(ADMIT_WAIT):
            while True:
                step = self._admit(pair, b)
                if step is True:
                    break
                if step is False:
                    await b.wait_puts()
                    continue
                identity, entry = step
                assert self.tokens is not None
                injection = self.tokens.injection(b, identity, entry)
                await injection.done.wait()
                if injection.error is not None and pair.state is PairState.PENDING:
                    self.observer.on_attach_refused(str(injection.error.condition))
                    pair.refuse(str(injection.error.condition), injection.error.description or "")
                    break
        if pair.state is PairState.PENDING:
            if self._admit(pair, b, wait_for_puts=False) is not True:
                pair.refuse(FORCED, "timed out waiting for a token to be put")
        pair.device.wake()

    # -------------------------------------------------------------------- CBS

    def forward_cbs_request(self, device: DeviceConn, connector: str, req: CbsRequest,
                            delivery: Delivery, settled: bool) -> None:  # fmt: skip
        b = self.binding_for(device, connector)
        if b.ready.is_set():
            self._forward_cbs(b, req, delivery, settled)
            return
        assert self._nursery is not None
        self._nursery.start_soon(self._forward_cbs_later, b, req, delivery, settled)

    async def _forward_cbs_later(self, b: Binding, req: CbsRequest, delivery: Delivery,
                                 settled: bool) -> None:  # fmt: skip
        await b.ready.wait()
        self._forward_cbs(b, req, delivery, settled)

    def _forward_cbs(self, b: Binding, req: CbsRequest, delivery: Delivery, settled: bool) -> None:
        device = b.device
        if device.closed:
            return
        if b.error is not None or not b.valid:
            cond = b.error.condition if b.error is not None else FORCED
            desc = b.error.description if b.error is not None else "upstream connection lost"
            device.cbs.fail_request(None if settled else delivery, cond, desc, request=req)
            return
        assert b.upstream is not None
        audience = req.audience if req.operation == PUT_TOKEN else None
        pending = PendingPut(
            b,
            audience,
            req.properties.message_id,
            req.properties.reply_to,
            True,
            None if settled else delivery,
            request=req if audience is not None else None,
        )
        b.put_started()
        b.upstream.cbs_pair().forward(req, pending, settled)
        device.wake()


class _PoolWatch:
    """The pools' observer: the router's observer, and with store-and-forward on,
    the pool state it decides "hub unreachable" by."""

    def __init__(self, observer: RouterObserver, router: Router) -> None:
        self._observer = observer
        self._router = router

    def on_connector_state(self, connector: str, state: str, detail: str) -> None:
        if self._router.sf is not None:
            self._router.sf.on_connector_state(connector, state)
        self._observer.on_connector_state(connector, state, detail)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._observer, name)


class _Dedicated:
    """Stands in for a pool where a relayed login's connection serves one device."""

    max_devices_per_connection = 1


_DEDICATED = _Dedicated()


class _DedicatedLease:
    """A relayed login's connection belongs to its device: nothing to give back
    (`Binding.release` retires the connection itself)."""

    def release(self) -> None:
        pass

    def retire(self) -> None:
        pass


def _cbs_proxied(connector: Any) -> bool:
    """Does the gateway serve `$cbs` for this connector (config ``cbs``)?"""
    proxied = getattr(connector, "cbs_proxied", None)
    if proxied is not None:
        return bool(proxied)
    return int(connector.pool.max_devices_per_connection) > 1


__all__ = ["Binding", "NullObserver", "Router", "RouterObserver", "UNAUTHORIZED"]
