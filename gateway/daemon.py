"""The gateway daemon: listeners, connector pools, the router, the admin endpoint.

``run(config, *, trace=())`` is what ``iot-gateway run`` calls once the
configuration validated and logging is set up. It builds the credential store
(exit 2 if a credential cannot be built), starts the AMQP connector pools
(on demand by default), the AMQP listeners (link routing), the MQTT listeners
(session relay) and the admin endpoint, logs one line per connector and
listener, and tells systemd it is ready once every listener is bound.
With a ``store_and_forward:`` section it opens the message store
(`gateway.store`) before the relays start, hands it to the router and the MQTT
forwarder, runs its ``max_age`` expiry, and closes it after they stopped; a
store that cannot be opened (corrupt, locked) is one error line, and the
gateway runs without it (`/api/store` and ``iotgw_store_up`` say so).

Signals:

- SIGTERM or SIGINT drains: the listeners turn new connections away,
  /readyz answers 503 "draining", new attaches are refused, and in-flight
  deliveries get up to ``gateway.drain_timeout`` to be settled; then every
  routed link is detached with ``amqp:connection:forced`` ("gateway shutting
  down"), every connection closed, and ``run`` returns 0. With nothing in
  flight that takes well under 5 s. A second SIGTERM cuts the drain short.
- SIGHUP reloads the configuration file (`gateway.ops.reload` says what a
  reload can change); a file that fails validation, or a credential that
  cannot be built, is rejected with a log line naming the errors and the
  running configuration stays. The credential store is rebuilt on every
  reload and handed to the router (`Router.set_credentials`) and the MQTT
  listeners (`LiveCredentials`).

Under systemd (``NOTIFY_SOCKET``) the daemon sends READY=1, RELOADING=1 and
READY=1 around a reload, STOPPING=1, STATUS= lines and, when WATCHDOG_USEC is
set, WATCHDOG=1 pings.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from gateway import mqtt_relay
from gateway.auth.clock import clock_problem
from gateway.auth.credentials import CredentialError, CredentialStore
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.net import dial
from gateway.net.ack_batching import AckBatching
from gateway.net.amqp_listener import serve_amqp_listener
from gateway.net.handshake import HandshakeBudget
from gateway.net.hooks import set_connect_failure_hook, set_dial_hook
from gateway.net.listeners import ListenerObserver, ListenerSettings, ListenerStats, serve_listener
from gateway.net.tls import ClientContextCache, TLSConnectError, client_context
from gateway.net.upstream_io import AmqpConnectorIO
from gateway.ops import sdnotify
from gateway.ops.connections import ListenerConnections
from gateway.ops.credentials_api import credentials_snapshot
from gateway.ops.health import Readiness
from gateway.ops.lifecycle import (
    LiveConfig,
    LiveCredentials,
    LiveListenerSettings,
    detach_all,
    in_flight,
    status_text,
)
from gateway.ops.logging import REPEAT_WINDOW, flush_suppressed
from gateway.ops.registry import Registry
from gateway.ops.reload import ReloadPlan, plan_reload
from gateway.ops.router_observer import OpsObserver
from gateway.ops.startup import StartupError, bind_error, tls_error
from gateway.ops.store_status import StoreCollector, StoreStatus
from gateway.ops.trace import FrameTracer
from gateway.router.core import Router
from gateway.router.routes import RouteTable
from gateway.store import StoreUnavailable

if TYPE_CHECKING:
    from gateway.store.sqlite import MessageStore

log = logging.getLogger("gateway.daemon")

EXIT_OK = 0
EXIT_CONFIG = 2

# After the drain: how long detaches and closes may take to reach the peers.
SHUTDOWN_GRACE = 2.0
# How often a drain looks at the deliveries still in flight.
DRAIN_POLL = 0.05
# Once the last delivery in flight has settled, how long its disposition has to
# reach the device on its own before the detaches follow. Sent back to back, a
# device stack that reads both at once may act on the detach first and report
# the link lost, though the message was settled.
SETTLED_GRACE = 0.1
# How often systemd gets a fresh STATUS= line.
STATUS_INTERVAL = 30.0
# The error description devices get when their links are detached on shutdown.
SHUTDOWN_DESCRIPTION = "gateway shutting down"
# How often the wall clock is checked for being set (a Pi without RTC, before NTP).
CLOCK_POLL = 1.0


def run(config: GatewayConfig, *, trace: Iterable[str] = ()) -> int:
    """Run until SIGINT or SIGTERM; returns the process exit code."""
    return trio.run(serve, config, tuple(trace))


async def serve(config: GatewayConfig, trace: tuple[str, ...] = (), *,
                task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> int:  # fmt: skip
    """Run the gateway until told to stop; `task_status.started()` gets the `Daemon`
    (its ``router``, ``listener_addresses``, ``admin_addresses``, ``reload()``,
    ``request_stop()``) once every listener is bound."""
    # Install the handlers first, so a signal right after the startup lines is not lost.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        try:
            credentials = _credential_store(config)
        except CredentialError as exc:
            where = f"{config.source_path}: " if config.source_path is not None else ""
            log.error("%scredentials: %s", where, exc)
            return EXIT_CONFIG
        daemon = Daemon(config, trace, credentials)
        try:
            return await daemon.run(signals, task_status=task_status)
        except StartupError as exc:
            log.error("%s", exc)
            return exc.status


def _credential_store(config: GatewayConfig) -> CredentialStore:
    """The credential store, its warnings logged; CredentialError if it cannot be built."""
    store = CredentialStore.from_config(config.credentials)
    for line in store.warnings():
        log.warning("%s", line)
    return store


class Daemon:
    """One running gateway: what it serves, and its reload and drain."""

    def __init__(self, config: GatewayConfig, trace: Iterable[str] = (),
                 credentials: CredentialStore | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        trace = tuple(trace)
        self.clock = clock  # wall-clock Unix seconds: token expiries, "is the clock set?"
        self.config = config  # in force: the start-up file plus reloaded live parts
        self.live_config = LiveConfig(config)
        # The store in force (None: built from the configuration); reloads replace it.
        self.credentials = credentials if credentials is not None else _credential_store(config)
        self.live_credentials = LiveCredentials(self.credentials)
        # --trace and --log-level on the command line win over the file, reloads too.
        self.trace_override = trace if trace != tuple(config.log.trace) else None
        self.level_override = logging.getLogger().getEffectiveLevel() != _level(config.log.level)
        self.metrics = _metrics(config)
        self.registry = Registry()
        self.observer = OpsObserver(self.metrics, self.registry)
        self.listener_observer = ListenerConnections(self.metrics, self.registry)
        self.tracer = FrameTracer(protocols=trace)
        self.router = Router(config, connector_io=AmqpConnectorIO(), observer=self.observer,
                             tracer=self.tracer, credentials=self.credentials,
                             clock=clock)  # fmt: skip
        self.readiness = Readiness.from_config(self.registry, config, clock=clock)
        # MQTT store-and-forward, once the store is open (run()).
        self.mqtt_store_forward: mqtt_relay.StoreForward | None = None
        self.mqtt_forwarder: mqtt_relay.MqttForwarder | None = None
        self.listener_settings: dict[str, LiveListenerSettings] = {}
        # Bytes held by device connections before authentication, all listeners together.
        self.handshake = HandshakeBudget()
        self.listener_addresses: dict[str, list[tuple[str, int]]] = {}
        self.admin_addresses: list[tuple[str, int]] = []
        self.admin_sockets: list[trio.SocketListener] = []  # bound by bind(), then served
        self.admin_token = config.admin.token  # what /api/* requires; a reload may rotate it
        self.stopping = False
        self._stop = trio.Event()
        self._hurry = trio.Event()
        self._reload_lock = trio.Lock()
        self.registry.set_routes(_route_rows(self.router.routes, config.mqtt_routes))
        for connector in config.connectors:
            self.registry.register_connector(connector.name, protocol=connector.protocol,
                                             target=connector.target,
                                             on_demand=getattr(connector, "on_demand", True),
                                             endpoints=[str(e) for e in dial.connector_endpoints(connector)])  # fmt: skip
        self.registry.set_credentials(
            credentials_snapshot(lambda: self.credentials, lambda: self.router.tokens)
        )
        # Store and forward: opened by run() when configured, before any relay starts,
        # and closed after they all stopped. None: off, or it could not be opened
        # (store_status.error says why); the relays then take the transparent path.
        self.store: MessageStore | None = None
        self.store_status = StoreStatus.from_config(config.store_and_forward, config.connectors)
        self.registry.set_store(self.store_status.snapshot)
        if self.metrics is not None and self.store_status.configured:
            self.metrics.registry.register(
                StoreCollector(self.store_status,
                               device_labels=bool(config.gateway.metrics_device_labels))
            )  # fmt: skip

    # ------------------------------------------------------------------ running

    async def run(self, signals: Any = None, *,
                  task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> int:  # fmt: skip
        await self.bind()
        if self.metrics is not None:
            set_connect_failure_hook(self.metrics.on_tls_handshake_failure)
        set_dial_hook(self.registry.connector_dialled)
        if self.tracer.amqp_enabled or self.tracer.mqtt_enabled:
            log.info("frame trace on for %s", ",".join(_traced(self.tracer)))
        await self.open_store()
        try:
            return await self._run(signals, task_status=task_status)
        finally:
            await self.close_store()

    async def _run(self, signals: Any = None, *,
                   task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> int:  # fmt: skip
        config = self.config
        async with trio.open_nursery() as nursery:
            if self.store is not None:
                nursery.start_soon(self.store.run)  # max_age expiry
                self.router.set_store(self.store)  # AMQP store-and-forward
                await self._start_mqtt_forwarder(nursery, self.store)
            await nursery.start(self.router.run)
            for connector in config.connectors:
                log.info("connector %s: %s to %s (%s)%s", connector.name, connector.protocol,
                         connector.target,
                         f"tls {connector.tls_profile}" if connector.tls_profile else "plaintext",
                         _pool_text(connector) + _transport_text(connector))  # fmt: skip
            for listener in config.listeners:
                bound = await nursery.start(self._serve_listener, listener)
                self.listener_addresses[listener.name] = bound
                self.registry.register_listener(listener.name, protocol=listener.protocol)
                self.registry.set_listener_bound(listener.name, bound)
                log.info("listener %s: %s on %s (%s)", listener.name, listener.protocol,
                         ", ".join(f"{h}:{p}" for h, p in bound),
                         f"tls {listener.tls_profile}" if listener.tls_profile
                         else "plaintext")  # fmt: skip
            if config.admin.enabled:
                await self._start_admin(nursery)
            log.info("gateway %s started", config.gateway.id)
            # What start-up built (configuration, metrics, imports) lives as long as
            # the process: out of the collector's sight, full collections only walk
            # what connections allocate (they were a few per cent of a busy relay).
            gc.freeze()
            _release_free_memory()
            sdnotify.ready(f"running: {status_text(self.registry)}")
            nursery.start_soon(self._clock_loop)
            nursery.start_soon(sdnotify.watchdog_loop)
            nursery.start_soon(_report_suppressed_loop)
            if os.environ.get("NOTIFY_SOCKET"):
                nursery.start_soon(self._status_loop)
            if signals is not None:
                nursery.start_soon(self._signal_loop, signals)
            task_status.started(self)
            await self._stop.wait()
            await self._drain()
            nursery.cancel_scope.cancel()
        log.info("gateway %s stopped", config.gateway.id)
        flush_suppressed(final=True)
        return EXIT_OK

    async def bind(self) -> None:
        """Everything that can fail at start, before anything is served or logged as
        started: load each TLS profile's certificates and keys, bind every listener and
        the admin endpoint. `StartupError` (what failed, where, why) if one fails; the
        sockets already bound are closed again."""
        bound: list[trio.SocketListener] = []
        try:
            for listener in self.config.listeners:
                settings = self._listener_settings(listener)
                settings.sockets = await _bind(f"listener {listener.name!r}", listener.bind)
                bound.extend(settings.sockets)
                self.listener_settings[listener.name] = settings
            for connector in self.config.connectors:
                profile = self.config.tls_profile_for(connector)
                if profile is not None:
                    _load_tls(f"connector {connector.name!r} tls_profile {connector.tls_profile!r}",
                              profile, client_context)  # fmt: skip
            if self.config.admin.enabled:
                self.admin_sockets = await _bind("admin endpoint", self.config.admin.listen)
                bound.extend(self.admin_sockets)
        except StartupError:
            for sock in bound:
                await trio.aclose_forcefully(sock)
            self.listener_settings.clear()
            self.admin_sockets = []
            raise

    async def open_store(self) -> None:
        """Open the message store when ``store_and_forward:`` is configured. A store that
        cannot be opened (corrupt, locked by another gateway, no disk) is one error line
        and ``iotgw_store_up 0``; the gateway runs without it and relays live traffic."""
        section = self.config.store_and_forward
        if section is None or self.store is not None:
            return
        try:
            from gateway.store.sqlite import MessageStore  # sqlite3 only when configured

            self.store = await MessageStore.open(section, clock=self.clock)
        except StoreUnavailable as exc:
            self.store_status.error = exc
            log.error("%s; running without store and forward (live traffic is relayed; "
                      "see docs/store-and-forward.md)", exc.reason)  # fmt: skip
            return
        self.store_status.store = self.store

    async def close_store(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            with trio.CancelScope(shield=True):
                await store.aclose()

    def _listener_settings(self, listener: Any) -> LiveListenerSettings:
        """The listener's live settings; its TLS profile's certificate and key loaded."""
        what = f"listener {listener.name!r} tls_profile {listener.tls_profile!r}"
        try:
            return LiveListenerSettings.from_config(listener, self.config)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            profile = self.config.tls_profile_for(listener)
            raise tls_error(what, _tls_files(profile), exc) from None

    def request_stop(self) -> None:
        """Begin the drain (what SIGTERM does); asked again, cut the drain short."""
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()

    async def _signal_loop(self, signals: Any) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if self._stop.is_set():
                    log.info("received SIGHUP while stopping: not reloading")
                    continue
                log.info("received SIGHUP, reloading %s", self.config.source_path)
                await self.reload()
            elif self._stop.is_set():
                log.info("received %s again: detaching now", name)
                self.request_stop()
            else:
                log.info("received %s, stopping", name)
                self.request_stop()

    async def _clock_loop(self) -> None:
        """One log line when the wall clock is (or becomes) obviously unset, one when it
        is set: meanwhile no SAS token is issued and /readyz says why, and both end by
        themselves once NTP has set the clock."""
        unset = False
        while True:
            problem = clock_problem(self.clock())
            if problem is not None and not unset:
                log.warning("%s; not issuing SAS tokens and not ready until it is set", problem)
            elif problem is None and unset:
                log.info("the system clock is set (%s): issuing SAS tokens, ready",
                         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock())))  # fmt: skip
            unset = problem is not None
            await trio.sleep(CLOCK_POLL)

    async def _status_loop(self) -> None:
        while True:
            await trio.sleep(STATUS_INTERVAL)
            if not self.stopping:
                sdnotify.status(f"running: {status_text(self.registry)}")

    # -------------------------------------------------------------------- drain

    async def _drain(self) -> None:
        """Stop taking work, let what is in flight settle, then detach and close."""
        self.stopping = True
        timeout = float(self.config.gateway.drain_timeout)
        self.readiness.draining = True
        if self.metrics is not None:
            self.metrics.set_draining(True)
        for settings in self.listener_settings.values():
            settings.draining = True
        # New attaches are refused and new AMQP connections closed from here on.
        self.router.stopping = True
        pending = in_flight(self.router)
        sdnotify.stopping(f"draining: {pending} deliveries in flight")
        log.info("draining: new connections and attaches refused; %d deliveries in flight, "
                 "waiting up to %gs for them to settle", pending, timeout)  # fmt: skip
        with trio.move_on_after(timeout):
            while not self._hurry.is_set() and in_flight(self.router):
                with trio.move_on_after(DRAIN_POLL):
                    await self._hurry.wait()
        left = in_flight(self.router)
        if left:
            log.warning("drain ended with %d deliveries unsettled; they stay unsettled for "
                        "their senders, which resend them", left)  # fmt: skip
        else:
            log.info("drain complete: no deliveries in flight")
            if pending and not self._hurry.is_set():
                with trio.move_on_after(SETTLED_GRACE):
                    await self._hurry.wait()
        sdnotify.status("stopping: detaching links")
        detach_all(self.router, SHUTDOWN_DESCRIPTION)
        with trio.move_on_after(SHUTDOWN_GRACE):
            while self.router.devices or self.router.upstreams:
                await trio.sleep(DRAIN_POLL)

    # ------------------------------------------------------------------- reload

    async def reload(self) -> bool:
        """Re-read the configuration file and apply what can change live (SIGHUP)."""
        async with self._reload_lock:
            sdnotify.reloading("reloading configuration")
            try:
                return await self._reload()
            finally:
                sdnotify.ready(f"running: {status_text(self.registry)}")

    async def _reload(self) -> bool:
        path = self.config.source_path
        if path is None:
            log.warning("configuration reload: the configuration was not read from a file")
            self._count_reload(False)
            return False
        try:
            new = await trio.to_thread.run_sync(load_config, path)
        except ConfigError as exc:
            log.error("configuration reload rejected, the running configuration stays: %s",
                      "; ".join(exc.errors))  # fmt: skip
            self._count_reload(False)
            return False
        plan = plan_reload(self.config, new)
        store = None
        if new.credentials is not None or self.config.credentials is not None:
            # Key files and variables are read again: a rotated key applies too.
            try:
                store = await trio.to_thread.run_sync(_credential_store, new)
            except CredentialError as exc:
                log.error("configuration reload rejected, the running configuration stays: "
                          "credentials: %s", exc)  # fmt: skip
                self._count_reload(False)
                return False
        try:
            self._apply(plan, store)
        except Exception as exc:  # a reload must never take the running gateway down
            log.error("configuration reload rejected, the running configuration stays: %s: %s",
                      type(exc).__name__, exc)  # fmt: skip
            self._count_reload(False)
            return False
        if new.admin.token_file == self.config.admin.token_file:
            self.admin_token = new.admin.token  # the file is read again: a rotated token applies
        for line in plan.needs_restart:
            log.warning("configuration reload: %s: needs restart, ignored", line)
        for line in plan.warnings:
            log.warning("configuration reload: %s", line)
        if plan.applied:
            log.info("configuration reloaded from %s: %s", path, "; ".join(plan.applied))
        else:
            log.info("configuration reloaded from %s: nothing to change", path)
        self._count_reload(True)
        return True

    def _apply(self, plan: ReloadPlan, store: CredentialStore | None = None) -> None:
        """Switch to `plan.config` (and `store`, the rebuilt credential store).
        Everything that can fail is built before anything changes."""
        new = plan.config
        old = self.config
        routes = (RouteTable.from_config(new.link_routes)
                  if new.link_routes is not old.link_routes else None)  # fmt: skip
        if (new.log.level, new.log.format) != (old.log.level, old.log.format):
            from gateway.ops.logging import setup_logging

            level = new.log.level
            if self.level_override:
                level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
                if new.log.level != old.log.level:
                    log.info("configuration reload: log level %s from the command line kept",
                             level)  # fmt: skip
            setup_logging(level, new.log.format)
        if tuple(new.log.trace) != tuple(old.log.trace):
            if self.trace_override is None:
                self.tracer.configure(new.log.trace)
            else:
                log.info("configuration reload: trace %s from the command line kept",
                         ",".join(self.trace_override) or "off")  # fmt: skip
        if routes is not None:
            self.router.routes = routes
        if routes is not None or new.mqtt_routes is not old.mqtt_routes:
            self.registry.set_routes(_route_rows(self.router.routes, new.mqtt_routes))
        for listener in new.listeners:
            settings = self.listener_settings.get(listener.name)
            if settings is not None:
                settings.update_limits(listener)
        if store is not None:
            self.credentials = store
            self.live_credentials.current = store
            self.router.set_credentials(store)
        self.live_config.current = new
        self.config = new

    def _count_reload(self, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.on_reload(ok)

    # ---------------------------------------------------------------- listeners

    async def _serve_listener(self, listener: Any, *,
                              task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
        # Live limits: a reload changes them in place, a drain stops admissions.
        settings = self.listener_settings.get(listener.name)
        if settings is None:
            settings = self._listener_settings(listener)
            self.listener_settings[listener.name] = settings
        if listener.protocol == "amqp":
            await serve_amqp_listener(listener, self.config, self.router,
                                      observer=self.listener_observer, task_status=task_status,
                                      settings=settings,  # type: ignore[arg-type]
                                      handshake=self.handshake)  # fmt: skip
            return
        observer = (self.metrics.mqtt_observer(listener.name, registry=self.registry)
                    if self.metrics is not None else None)  # fmt: skip
        # Routes are read from the configuration in force for every new connection.
        await serve_mqtt_listener(
            listener, self.live_config, task_status=task_status, observer=observer,
            listener_observer=self.listener_observer, tracer=self.tracer,
            credentials=self.live_credentials, settings=settings,  # type: ignore[arg-type]
            clock=self.clock, handshake=self.handshake,
            store_forward=self.mqtt_store_forward,
        )  # fmt: skip

    async def _start_mqtt_forwarder(self, nursery: trio.Nursery, store: MessageStore) -> None:
        """MQTT store-and-forward: local sessions for the listeners, and the forwarder."""
        self.mqtt_store_forward = mqtt_relay.StoreForward(store)
        self.mqtt_forwarder = mqtt_relay.MqttForwarder(
            self.mqtt_store_forward, self.live_config, self.live_credentials, MqttUpstreams(),
            clock=self.clock,
        )
        await nursery.start(self.mqtt_forwarder.run)

    async def _start_admin(self, nursery: trio.Nursery) -> None:
        from gateway.ops.admin import serve_admin

        sockets, self.admin_sockets = self.admin_sockets, []
        self.admin_addresses = await nursery.start(
            partial(serve_admin, sockets=sockets, api_token=lambda: self.admin_token),
            self.config.admin.listen, self.registry, self.metrics, self.readiness,
        )  # fmt: skip


async def _report_suppressed_loop() -> None:
    """Counts of suppressed repeated warnings are logged at most a window late."""
    while True:
        await trio.sleep(REPEAT_WINDOW)
        flush_suppressed()


# ---------------------------------------------------------------- MQTT listeners


class MqttUpstreams:
    """Opens the MQTT relay's upstream connections (`gateway.mqtt_relay.OpenUpstream`)
    with `gateway.net.dial`; one TLS context per profile, made once."""

    def __init__(self) -> None:
        self.contexts = ClientContextCache()

    async def __call__(self, connector: Any, profile: Any) -> mqtt_relay.Opened:
        try:
            stream, report = await dial.dial_connector(connector, profile, contexts=self.contexts)
        except TLSConnectError as exc:
            raise mqtt_relay.UpstreamUnavailable(exc.reason, exc.detail) from None
        return mqtt_relay.Opened(stream, str(report.endpoint))


async def serve_mqtt_listener(
    listener_cfg: Any,
    config: Any,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    observer: mqtt_relay.RelayObserver | None = None,
    listener_observer: ListenerObserver | None = None,
    stats: ListenerStats | None = None,
    tracer: mqtt_relay.PacketTracer | None = None,
    credentials: CredentialStore | None = None,
    clock: Callable[[], float] = time.time,
    renewal_mode: mqtt_relay.RenewalMode = mqtt_relay.RenewalMode.AUTO,
    settings: ListenerSettings | None = None,
    handshake: HandshakeBudget | None = None,
    store_forward: mqtt_relay.StoreForward | None = None,
) -> None:
    """Serve one `protocol: mqtt` listener until cancelled: the listener
    (`gateway.net.listeners`) hands each device connection to the MQTT relay.

    `task_status.started()` receives the bound (host, port) addresses.
    `observer` gets every connection's packets and close reason,
    `listener_observer` the admissions (`gateway.ops.metrics.Metrics` fits),
    `stats` live listener counters, `tracer` the packet trace.
    `credentials`: the store built from the config's `credentials:` section
    (`CredentialStore.from_config`); None or an empty store: devices bring their
    own credentials. `clock`: wall-clock Unix seconds for SAS token expiries
    (sleeping until a renewal uses trio's clock). `settings`: the daemon passes
    its own live `ListenerSettings` so a reload can change limits and a drain
    can stop admissions; by default they are built from `listener_cfg`.
    `handshake`: the budget of bytes held before authentication, shared by the
    daemon's listeners (by default this listener's own).
    `store_forward`: the message store and local sessions (store-and-forward
    configured), see `gateway.mqtt_relay.local_session`.
    """
    settings = settings or ListenerSettings.from_config(listener_cfg, config)
    handler = mqtt_relay.connection_handler(
        listener_cfg,
        config,
        open_upstream=MqttUpstreams(),
        ack_batching=AckBatching,
        observer=observer,
        tracer=tracer,
        credentials=credentials,
        clock=clock,
        renewal_mode=renewal_mode,
        handshake=handshake if handshake is not None else HandshakeBudget(),
        store_forward=store_forward,
    )
    await serve_listener(
        settings, handler, observer=listener_observer, stats=stats, task_status=task_status
    )


async def _bind(what: str, address: Any) -> list[trio.SocketListener]:
    """Listening sockets for ``address`` (a HostPort); StartupError naming ``what``."""
    host = str(address.host).strip("[]")
    try:
        return await trio.open_tcp_listeners(
            address.port, host=None if host in ("", "*") else host
        )
    except OSError as exc:
        raise bind_error(what, str(address), address.port, exc) from None


def _tls_files(profile: Any) -> str:
    names = [f"{key} {value}" for key in ("cert_file", "key_file", "ca_file")
             if (value := getattr(profile, key, None)) is not None]  # fmt: skip
    return " and ".join(names) or "the system trust store"


def _load_tls(what: str, profile: Any, build: Callable[[Any], Any]) -> None:
    """Build a TLS context from ``profile`` once, to fail at start rather than at the
    first connection; StartupError naming ``what`` and the files."""
    try:
        build(profile)
    except (OSError, ValueError) as exc:
        raise tls_error(what, _tls_files(profile), exc) from None


def _route_rows(routes: RouteTable, mqtt_routes: Iterable[Any]) -> list[dict[str, Any]]:
    """The route table for /api/routes: link routes (AMQP), then MQTT routes."""
    rows = [{"kind": "link", **row} for row in routes.as_list()]
    for route in mqtt_routes:
        row: dict[str, Any] = {"kind": "mqtt", "connector": route.connector}
        if route.username is not None:
            row["username"] = route.username
        else:
            row["hub"] = route.hub
        if route.allowed_topics is not None:
            row["allowed_topics"] = [str(t) for t in route.allowed_topics]
        rows.append(row)
    return rows


def _release_free_memory() -> None:
    """Give the C heap's free pages left by start-up (imports, the configuration's
    validation) back to the system: about 1.5 MB of the idle daemon's RSS. glibc
    only; elsewhere nothing happens."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _metrics(config: GatewayConfig) -> Any:
    try:
        from gateway.ops.metrics import Metrics

        return Metrics(device_labels=bool(config.gateway.metrics_device_labels),
                       gateway_id=config.gateway.id)  # fmt: skip
    except Exception:  # the gateway relays traffic without metrics too
        log.exception("metrics unavailable")
        return None


def _level(name: str) -> int:
    value = logging.getLevelName(name.upper())
    return value if isinstance(value, int) else logging.INFO


def _traced(tracer: FrameTracer) -> list[str]:
    return [p for p, on in (("amqp", tracer.amqp_enabled), ("mqtt", tracer.mqtt_enabled)) if on]


def _transport_text(connector: Any) -> str:
    """", over WebSockets", ", via proxy http://host:port" (no credentials), or nothing."""
    text = ", over WebSockets" if getattr(connector, "transport", "tcp") == "websockets" else ""
    proxy = getattr(connector, "proxy", None)
    if proxy == "env":
        text += ", proxy from HTTPS_PROXY/NO_PROXY"
    elif proxy is not None and proxy != "none":
        from gateway.net.http_proxy import redact_proxy_url

        text += f", via proxy {redact_proxy_url(str(proxy.url))}"
    return text


def _pool_text(connector: Any) -> str:
    pool = getattr(connector, "pool", None)
    if pool is None:
        return ""
    if getattr(connector, "sasl", None) == "relay":
        return ", a connection per provisioning device, its own SASL login relayed"
    mode = "on demand" if getattr(connector, "on_demand", True) else "always on"
    return (f", pool {pool.max_connections} x {pool.max_devices_per_connection} devices, "
            f"{mode}")  # fmt: skip
