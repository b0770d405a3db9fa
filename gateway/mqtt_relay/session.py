"""The MQTT path: each device connection relayed over its own TLS connection.

Per device connection:

1. Read CONNECT within the listener's `handshake_timeout` (else close).
2. Pick the route: the hub host is the CONNECT user name up to the first `/`
   (`{hub-host}/{device-id}/?api-version=...`); an exact `hub` match (case
   insensitive) wins over `hub: "*"`.
3. Open a TLS connection to the route's connector within its `connect_timeout`.
4. Forward the CONNECT bytes unchanged, then every packet in both directions
   as the original bytes, each one validated on the way. Every complete
   packet of one read goes on in one write: PUBLISH, its acknowledgements and
   pings are checked from their fixed and variable headers
   (`gateway.mqtt.triage`), anything else, and a PUBLISH to a topic not yet
   seen on the connection, is parsed in full first.

Answers the gateway gives itself (the only packets it ever writes):

- no route for the hub host: CONNACK 5 "not authorized" (MQTT 5: 0x87). The
  gateway refuses to relay for that hub, a configuration decision like an
  authorisation one; it is kept distinct from an unreachable hub so device
  logs tell the two apart.
- the connector cannot be reached (TCP, TLS or timeout): CONNACK 3 "server
  unavailable" (MQTT 5: 0x88), which devices retry.
- a Will topic outside the route's `allowed_topics`: CONNACK 5 (MQTT 5: 0x87).
- an unsupported protocol level: CONNACK 1 (3.1.1 section 3.1.2.2).

Everything else comes from the hub, refusals included. Once the session is
relayed, nothing is answered on the hub's behalf: a protocol error, an
oversize packet, a refused topic or keep-alive expiry closes the device
connection (IoT Hub semantics: no error replies) and the upstream one with it,
without a DISCONNECT, so the hub publishes the device's Will as it would for
any abrupt loss.

Keep-alive: a device silent for 1.5 x its keep-alive (MQTT 5: the server's
Server Keep Alive if the CONNACK carries one) is closed. Backpressure: each
direction reads its next bytes only after the previous packet was written to
the other side (one write in flight per direction), so a slow hub slows the
device and buffers stay bounded by one packet plus one read.

Credentials held by the gateway (`credentials:` in the config): for a device
with an entry, the CONNECT goes upstream with a gateway-issued SAS token as
password (or over a TLS connection with the device's client certificate), after
the device proved itself locally; the token is renewed before expiry by moving
the session to a new upstream connection, unseen by the device. The rules are
in `gateway.mqtt_relay.credentials` and `gateway.mqtt_relay.renewal`; this module
only calls them. A refused local authentication is answered with CONNACK 4
(password) or 5 (address), the gateway's own answers besides the ones above.

The CONNECT password is never logged; nor are payloads.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from itertools import islice
from typing import TYPE_CHECKING, Any, Protocol

import trio

from gateway.auth.dps import registration_of
from gateway.mqtt import encode
from gateway.mqtt.constants import MQTT_5, V5_CONNACK_EQUIVALENT, ConnackCode, PacketType
from gateway.mqtt.errors import MQTTProtocolError, PacketTooLarge, UnsupportedProtocolVersion
from gateway.mqtt.packets import Connack, Connect, Packet, Puback, Publish, Subscribe
from gateway.mqtt.reader import Buffer, PacketReader, Span, parse_span
from gateway.mqtt.session import RelayState
from gateway.mqtt.topics import TopicPolicy
from gateway.mqtt.tracking import SessionTracker
from gateway.mqtt.triage import CLIENT, SERVER, Triage
from gateway.net.ack_batching import AckBatching
from gateway.net.dial import dial_connector
from gateway.net.listeners import ListenerObserver, ListenerSettings, ListenerStats, serve_listener
from gateway.net.tls import ClientContextCache, TLSConnectError

from . import credentials as mqtt_credentials
from . import renewal as mqtt_renewal
from .credentials import MqttCredentials
from .renewal import RenewalMode, SessionLost, TokenRenewal, UpstreamLink

if TYPE_CHECKING:
    from gateway.auth.credentials import CredentialStore

__all__ = [
    "CloseReason",
    "PacketTracer",
    "RelayObserver",
    "hub_host_from_username",
    "relay_mqtt_connection",
    "select_mqtt_route",
    "select_route",
    "serve_mqtt_listener",
]

log = logging.getLogger("gateway.mqtt.relay")

# Directions, as the metrics name them: "in" = device -> hub, "out" = hub -> device.
IN = "in"
OUT = "out"

# Device side (plain TCP): one read takes whatever the device has pipelined.
RECEIVE_SIZE = 262144
# Hub side: a read of the TLS stream (gateway.net.tls_stream) returns every record
# already received, up to this many bytes, so a hub's PUBACKs (one record each)
# go to the device in one write.
TLS_RECEIVE_SIZE = 262144
# Packets from the hub are bounded too, but generously: the hub, not the
# gateway, decides what a device may receive.
UPSTREAM_MAX_PACKET_SIZE = 2 * 1024 * 1024
# Writing the gateway's own CONNACK or closing a stream never waits longer than this.
CLOSE_TIMEOUT = 2.0


class CloseReason:
    """Why a relayed connection ended; a fixed vocabulary fit for metric labels."""

    CONNECT_TIMEOUT = "connect_timeout"  # no CONNECT within handshake_timeout
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    NO_ROUTE = "no_route"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"  # connect/TLS to the connector failed
    UPSTREAM_REFUSED = "upstream_refused"  # the hub's CONNACK refused the device
    TOPIC_REFUSED = "topic_refused"  # allowed_topics policy
    KEEPALIVE_TIMEOUT = "keepalive_timeout"
    PACKET_TOO_LARGE = "packet_too_large"  # from the device
    DEVICE_PROTOCOL_ERROR = "device_protocol_error"
    UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error"
    DEVICE_DISCONNECT = "device_disconnect"  # the device sent DISCONNECT
    DEVICE_CLOSED = "device_closed"  # closed without DISCONNECT
    DEVICE_ERROR = "device_error"  # reset / broken device connection
    UPSTREAM_CLOSED = "upstream_closed"
    UPSTREAM_ERROR = "upstream_error"
    SHUTDOWN = "shutdown"  # the gateway stopped
    INTERNAL_ERROR = "internal_error"  # a bug in the gateway (logged with a traceback)
    # Credentials held by the gateway:
    LOCAL_AUTH_FAILED = mqtt_credentials.LOCAL_AUTH_FAILED  # missing/wrong local password
    LOCAL_ADDRESS_REFUSED = mqtt_credentials.LOCAL_ADDRESS_REFUSED  # not in allowed_addresses
    CREDENTIAL_ERROR = mqtt_credentials.CREDENTIAL_ERROR  # the entry's key is unusable
    TOKEN_EXPIRED = mqtt_renewal.TOKEN_EXPIRED  # renewals failed until the token expired
    TOKEN_RENEWAL_FAILED = mqtt_renewal.RENEWAL_FAILED  # renewal lost the session


class RelayObserver(Protocol):
    """Counting hooks; `gateway.ops.metrics.MqttRelayMetrics` implements them.

    An observer may also define, and they are called when present:
    `on_upstream_connect_failure(connector, reason)` (reason as in
    `TLSConnectError.reason`), `on_upstream_open(connector)` and
    `on_upstream_close(connector)` (each upstream connection, renewals' included),
    `on_token_renewal_failure(identity)` (each failed
    renewal attempt and an expiry), `on_token_expiry(identity, seconds)` (a
    gateway-issued token's remaining life when issued; None once the session ended).
    """

    def on_packet(self, direction: str, packet_type: str, nbytes: int) -> None: ...
    def on_close(self, reason: str) -> None: ...


class BatchObserver(RelayObserver, Protocol):
    """An observer that counts many packets of one type at once. The relay calls
    `on_packets` when the observer has it, instead of `on_packet` per packet, and
    `on_batch` (the counts and the batch's relay latency) when it has that."""

    def on_packets(self, direction: str, packet_type: str, count: int, nbytes: int) -> None: ...
    def on_batch(
        self, direction: str, packet_type: str, count: int, nbytes: int, seconds: float
    ) -> None: ...


# Packet type names by the first byte's high nibble (0 and, before MQTT 5, 15 are refused
# by the reader before anything is counted).
_TYPE_NAMES = ("RESERVED", *(PacketType(t).name for t in range(1, 16)))


class _NullObserver:
    def on_packet(self, direction: str, packet_type: str, nbytes: int) -> None:
        pass

    def on_close(self, reason: str) -> None:
        pass


OpenUpstream = Callable[[Any, Any], Awaitable[trio.abc.Stream]]


class PacketTracer(Protocol):
    """`gateway.ops.trace.FrameTracer` (only what the relay uses)."""

    mqtt_enabled: bool

    def mqtt(self, conn_id: Any, direction: str, packet: Any) -> None: ...


_connection_ids = itertools.count(1)

_default_contexts = ClientContextCache()


def hub_host_from_username(username: str | None) -> str:
    """`{hub-host}/{device-id}/?api-version=...` -> `{hub-host}` ("" without a user name)."""
    return (username or "").split("/", 1)[0]


def select_route(routes: Iterable[Any], hub_host: str) -> Any | None:
    """The exact hub match (case-insensitive), else the `*` route, else None."""
    routes = list(routes)
    wanted = hub_host.lower()
    for route in routes:
        if route.hub != "*" and route.hub.lower() == wanted:
            return route
    for route in routes:
        if route.hub == "*":
            return route
    return None


def select_mqtt_route(routes: Iterable[Any], username: str | None) -> Any | None:
    """The route for a CONNECT user name.

    `username` routes first, in configuration order (glob over the whole user
    name); then the hub routes by the user name's host (`select_route`). A
    provisioning user name (`{idScope}/registrations/{regId}/...`) never falls
    through to a hub route: its first segment is a scope, not a hub.
    """
    routes = list(routes)
    text = username or ""
    for route in routes:
        pattern = getattr(route, "username", None)
        if pattern is not None and fnmatch.fnmatchcase(text, pattern):
            return route
    if registration_of(username) is not None:
        return None
    hub_routes = [r for r in routes if getattr(r, "username", None) is None]
    return select_route(hub_routes, hub_host_from_username(username))


def _find_connector(config: Any, name: str) -> Any:
    for connector in config.connectors:
        if connector.name == name:
            return connector
    raise LookupError(f"no connector named {name!r}")


class _Stop(Exception):
    """Ends a relayed connection with a reason (and a detail for the log)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Connection:
    """One device connection and, once routed, its upstream connection(s).

    Normally one upstream connection (`link`); while a gateway-issued token is
    renewed, two: see `gateway.mqtt_relay.renewal`. Each has its own pump task.
    """

    def __init__(
        self,
        device: trio.abc.Stream,
        peer: tuple[str, int],
        listener_cfg: Any,
        config: Any,
        observer: RelayObserver,
        open_upstream: OpenUpstream | None,
        contexts: ClientContextCache,
        tracer: PacketTracer | None,
        credentials: MqttCredentials | None = None,
        renewal_mode: RenewalMode = RenewalMode.AUTO,
    ) -> None:
        self.device = device
        self.peer = peer
        self.listener_cfg = listener_cfg
        self.config = config
        self.obs = observer
        self.open_upstream = open_upstream
        self.contexts = contexts
        self.credentials = credentials
        self.renewal_mode = renewal_mode
        self.link: UpstreamLink | None = None  # the current upstream connection
        self.links: list[UpstreamLink] = []  # every open one (two during a renewal)
        self.device_reader = PacketReader(listener_cfg.max_packet_size)
        self.state = RelayState()
        self.policy: TopicPolicy | None = None
        self.topic_aliases: dict[int, str] = {}
        self.last_heard = trio.current_time()
        self.conn_id = f"mqtt-{next(_connection_ids)}"
        self.tracer = tracer
        self.label = f"{self.conn_id} {peer[0]}:{peer[1]}"
        self.stop: _Stop | None = None
        # Keep-alive: whether the relay waits for the device's bytes (only that wait
        # counts towards the deadline), and the watch's sleep, whose deadline moves if
        # the keep-alive changes.
        self._device_reading = False
        self._keep_alive_wait: trio.CancelScope | None = None
        # Set only when the gateway renews a token under this session:
        self.renewal: TokenRenewal | None = None
        self.tracker: SessionTracker | None = None
        self.switch_lock = trio.Lock()  # held by a renewal while it moves the session
        self._device_send_lock: trio.Lock | None = None  # two pumps may write to the device
        self._acked: trio.Event | None = None  # a PUBACK freed room in the tracker
        self._connector: Any = None
        self._dialled: str | None = None  # the connector endpoint reached (failover)
        self._profile: Any = None
        self._nursery: trio.Nursery | None = None
        self._counting = not isinstance(observer, _NullObserver)
        self._on_packets: Callable[[str, str, int, int], None] | None = getattr(
            observer, "on_packets", None
        )
        # Relay latency: when the bytes of the batch being relayed were read.
        self._on_latency: Callable[[float], None] | None = getattr(
            observer, "on_relay_latency", None
        )
        # Counts and latency of a batch of one packet type in one call, if the observer can.
        self._on_batch: Callable[[str, str, int, int, float], None] | None = getattr(
            observer, "on_batch", None
        )
        self._device_read_at = 0.0
        self._upstream_read_at = 0.0
        # QoS 1 and 2 PUBLISHes relayed to the hub and not yet answered (PUBACK or
        # PUBREC), counted only when the connector batches the hub's answers.
        self._ack_batching: AckBatching | None = None
        self._in_flight = 0

    @property
    def upstream(self) -> trio.abc.Stream | None:
        return self.link.stream if self.link is not None else None

    # -- the whole life of the connection ---------------------------------------------------

    async def run(self) -> str:
        try:
            connect = await self._read_connect()
            await self._open_upstream(connect)
            await self._relay()
        except _Stop as stop:
            self.stop = self.stop or stop
        except BaseException as exc:
            if _only_cancellation(exc):
                self.stop = self.stop or _Stop(CloseReason.SHUTDOWN, "gateway shutting down")
            else:
                # A bug: close and count it here; the listener logs the traceback.
                self.stop = _Stop(CloseReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            await self._close_all()
            stop = self.stop or _Stop(CloseReason.SHUTDOWN, "gateway shutting down")
            if self.state.client_disconnected and stop.reason in _AFTER_DISCONNECT:
                # The hub may close before the relay notices its own end of the DISCONNECT.
                stop = _Stop(CloseReason.DEVICE_DISCONNECT, "device disconnected")
            elif self.state.connack_code and stop.reason in _AFTER_DISCONNECT:
                # The device may hang up on the hub's refusal before the relay notices it.
                stop = _Stop(
                    CloseReason.UPSTREAM_REFUSED,
                    f"hub refused CONNECT with code {self.state.connack_code}",
                )
            self.obs.on_close(stop.reason)
            level = logging.INFO if stop.reason in _ROUTINE else logging.WARNING
            log.log(level, "mqtt %s closed: %s (%s)", self.label, stop.reason, stop.detail)
        return stop.reason

    # -- step 1: CONNECT ----------------------------------------------------------------

    async def _read_connect(self) -> Connect:
        timeout = float(self.listener_cfg.handshake_timeout)
        with trio.move_on_after(timeout):
            packet = await self._next_device_packet()
            try:
                self.state.client_packet(packet)
            except MQTTProtocolError as exc:
                raise _Stop(CloseReason.DEVICE_PROTOCOL_ERROR, exc.reason) from None
            assert isinstance(packet, Connect)
            return packet
        raise _Stop(CloseReason.CONNECT_TIMEOUT, f"no CONNECT within {timeout:g}s")

    # -- step 2 and 3: route and upstream ---------------------------------------------------

    async def _open_upstream(self, connect: Connect) -> None:
        hub = hub_host_from_username(connect.username)
        self.label = f"{self.label} client {connect.client_id!r}"
        identified = getattr(self.obs, "on_device_identified", None)
        if identified is not None:
            identified(self.peer, connect.client_id)
        route = select_mqtt_route(self.config.mqtt_routes, connect.username)
        registration = registration_of(connect.username)
        if route is None:
            await self._refuse(connect, ConnackCode.NOT_AUTHORIZED)
            if registration is not None:
                scope, reg_id = registration
                raise _Stop(
                    CloseReason.NO_ROUTE,
                    f"no mqtt route for registration {reg_id!r} of ID scope {scope!r}",
                )
            raise _Stop(CloseReason.NO_ROUTE, f"no mqtt route for hub {hub!r}")
        if route.allowed_topics is not None:
            self.policy = TopicPolicy(route.allowed_topics)
            if connect.will is not None and not self.policy.allows_publish(connect.will.topic):
                await self._refuse(connect, ConnackCode.NOT_AUTHORIZED)
                raise _Stop(
                    CloseReason.TOPIC_REFUSED,
                    f"Will topic {connect.will.topic!r} not in allowed_topics of {route.match}",
                )
        connector = _find_connector(self.config, route.connector)
        profile = self.config.tls_profiles[connector.tls_profile] if connector.tls_profile else None
        connect_raw = connect.raw
        decision = None
        if self.credentials is not None:
            decision = await self.credentials.decide(connect, self.peer[0], hub, profile)
            if decision.refuse is not None:
                await self._refuse(connect, decision.refuse)
                raise _Stop(decision.close_reason, decision.detail)
            connect_raw = decision.connect_raw
            profile = decision.profile or profile
        self._connector, self._profile = connector, profile
        wait = float(getattr(connector, "ack_batching", 0.0))
        if wait > 0.0:
            self._ack_batching = AckBatching(wait)
        stream = await self._open_stream(connect)
        self.link = self._new_link(stream, 0)
        log.info(
            "mqtt %s: hub %r -> connector %s (%s), protocol level %d, keep-alive %ds%s",
            self.label,
            hub,
            connector.name,
            self._dialled or f"{connector.host}:{connector.port}",
            connect.protocol_level,
            connect.keep_alive,
            _credential_note(decision),
        )
        await self._send_upstream(connect, connect_raw)
        self.last_heard = trio.current_time()
        if decision is not None and decision.token is not None and decision.entry is not None:
            assert self.credentials is not None
            self.tracker = SessionTracker(connect.protocol_level)
            self._device_send_lock = trio.Lock()
            self.renewal = TokenRenewal(
                self,
                self.credentials,
                decision.entry,
                connect,
                hub,
                decision.token,
                connack_timeout=float(connector.connect_timeout),
                mode=self.renewal_mode,
            )

    async def _open_stream(self, connect: Connect | None) -> trio.abc.Stream:
        """A new connection to the route's connector; refuses the device if `connect` is
        given (the first connection), else raises TLSConnectError (a renewal)."""
        connector, profile = self._connector, self._profile
        try:
            if self.open_upstream is not None:
                return await self.open_upstream(connector, profile)
            return await self._connect(connector, profile)
        except TLSConnectError as exc:
            self._hook("on_upstream_connect_failure", connector.name, exc.reason)
            if connect is None:
                raise
            await self._refuse(connect, ConnackCode.SERVER_UNAVAILABLE)
            raise _Stop(
                CloseReason.UPSTREAM_UNAVAILABLE,
                f"connector {connector.name} ({exc.reason}): {exc.detail}",
            ) from None

    async def _connect(self, connector: Any, profile: Any) -> trio.abc.Stream:
        stream, report = await dial_connector(connector, profile, contexts=self.contexts)
        self._dialled = str(report.endpoint)
        return stream

    def _new_link(self, stream: trio.abc.Stream, generation: int) -> UpstreamLink:
        reader = PacketReader(
            max(UPSTREAM_MAX_PACKET_SIZE, self.listener_cfg.max_packet_size),
            protocol_level=self.state.protocol_level,
        )
        link = UpstreamLink(stream, reader, generation)
        self.links.append(link)
        self._hook("on_upstream_open", self._connector.name)
        return link

    async def _close_link_stream(self, link: UpstreamLink) -> None:
        await _close_stream(link.stream)
        if link in self.links:
            self.links.remove(link)
            self._hook("on_upstream_close", self._connector.name)

    def _hook(self, name: str, *args: Any) -> None:
        """Call an optional observer hook (see RelayObserver)."""
        hook = getattr(self.obs, name, None)
        if hook is not None:
            hook(*args)

    async def _refuse(self, connect: Connect, code: ConnackCode) -> None:
        """Answer the device with the gateway's own CONNACK refusal (best effort)."""
        level = connect.protocol_level
        return_code = V5_CONNACK_EQUIVALENT[code] if level == MQTT_5 else int(code)
        await self._send_own(encode.connack(return_code, protocol_level=level))

    async def _send_own(self, data: bytes) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self.device.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # -- step 4: the relay ---------------------------------------------------------------

    async def _relay(self) -> None:
        assert self.link is not None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._run_guarded, self._pump_device)
            nursery.start_soon(self._run_guarded, self._watch_keep_alive)
            self.start_pump(self.link)
            if self.renewal is not None:
                nursery.start_soon(self._run_guarded, self.renewal.run)

    async def _run_guarded(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run one task of the relay; a _Stop from it ends the whole connection."""
        assert self._nursery is not None
        try:
            await fn(*args)
            return
        except _Stop as stop:
            self.stop = self.stop or stop
        except SessionLost as lost:
            self.stop = self.stop or _Stop(lost.reason, lost.detail)
        self._nursery.cancel_scope.cancel()

    async def _watch_keep_alive(self) -> None:
        """Close the connection once the device has been silent past its keep-alive.

        One sleeping task rather than a deadline on every device read, which would
        cost a cancel scope per read. Only time spent waiting for the device counts,
        as with a deadline on the read itself: while the relay waits to write to the
        hub the watch sleeps on, and the count restarts once the write is done.
        """
        waiting = True  # the device pump starts with a read
        while True:
            now = trio.current_time()
            if waiting:
                deadline = self.state.keep_alive_deadline(self.last_heard)
                if now >= deadline:
                    raise _Stop(
                        CloseReason.KEEPALIVE_TIMEOUT,
                        f"no packet from the device for {self.state.keep_alive_timeout:g}s "
                        f"(keep-alive {self.state.keep_alive}s)",
                    )
            else:
                # Writing what the device sent: last_heard moves on once that is done.
                deadline = self.state.keep_alive_deadline(now)
            with trio.CancelScope(deadline=deadline) as scope:
                self._keep_alive_wait = scope
                await trio.sleep_forever()
            waiting = self._device_reading

    def _keep_alive_changed(self) -> None:
        """An MQTT 5 CONNACK may set the keep-alive (Server Keep Alive)."""
        if self._keep_alive_wait is not None:
            self._keep_alive_wait.deadline = self.state.keep_alive_deadline(self.last_heard)

    async def _pump_device(self) -> None:
        if self.tracker is None:
            await self._pump_device_batched()
        else:
            await self._pump_device_tracked()

    async def _pump_device_batched(self) -> None:
        """Device -> hub: every complete packet of a read, checked, in one write."""
        reader = self.device_reader
        triage = Triage(CLIENT, self.state.protocol_level)
        while True:
            try:
                buf, spans = reader.next_spans()
            except PacketTooLarge as exc:
                raise _Stop(CloseReason.PACKET_TOO_LARGE, exc.reason) from None
            except MQTTProtocolError as exc:
                raise _Stop(CloseReason.DEVICE_PROTOCOL_ERROR, exc.reason) from None
            if not spans:
                await self._read_device()
                continue
            count, views, stop = self._check_device_batch(buf, spans, triage)
            if count:
                assert self.link is not None
                data = _joined(buf, spans, count)
                if self._ack_batching is not None:
                    # Counted before the write, which may yield to the pump that
                    # relays their answers.
                    self._in_flight += _answerable_publishes(spans, count)
                try:
                    await self.link.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise _Stop(CloseReason.UPSTREAM_ERROR, _describe(exc)) from None
                self._observe(IN, "<-", spans, count, views, self._device_read_at)
                self.last_heard = trio.current_time()
            if stop is not None:
                raise stop
            if spans[-1][3] == len(buf):
                await self._read_device()  # the read is used up: no need to frame again

    def _check_device_batch(
        self, buf: Buffer, spans: list[Span], triage: Triage
    ) -> tuple[int, list[Packet] | None, _Stop | None]:
        """How many of `spans` may be forwarded, their views if the trace wants them,
        and why the connection ends after them (None: it goes on)."""
        total = len(spans)
        views: list[Packet] | None = None
        if self.tracer is None or not self.tracer.mqtt_enabled:
            index = triage.fast_prefix(buf, spans)
            if index == total:
                return total, None, None
        else:
            views = []
            index = 0
        level = self.state.protocol_level
        while index < total:
            try:
                packet = parse_span(buf, spans[index], level)
                self.state.client_packet(packet)
            except MQTTProtocolError as exc:
                return index, views, _Stop(CloseReason.DEVICE_PROTOCOL_ERROR, exc.reason)
            if self.policy is not None:
                try:
                    self._check_policy(packet)
                except _Stop as stop:
                    return index, views, stop
            if isinstance(packet, Publish):
                triage.learn_topic(packet)
            if views is not None:
                views.append(packet)
            index += 1
            if self.state.client_disconnected:
                # The device is done (3.1.1 section 3.14.4): close both, the hub drops the Will.
                return index, views, _Stop(CloseReason.DEVICE_DISCONNECT, "device disconnected")
            if views is None:
                index = triage.fast_prefix(buf, spans, index)
        return total, views, None

    def _observe(
        self,
        direction: str,
        arrow: str,
        spans: list[Span],
        count: int,
        views: list[Packet] | None,
        read_at: float,
    ) -> None:
        """Count (and trace) `count` forwarded packets, read at `read_at`."""
        # A batch is nearly always of one type (PUBLISHes one way, their PUBACKs the
        # other): counted in one call, its bytes the batch's extent (spans lie back
        # to back).
        kind = _single_kind(spans, count)
        on_batch = self._on_batch
        if on_batch is not None and kind is not None:
            on_batch(
                direction,
                _TYPE_NAMES[kind],
                count,
                spans[count - 1][3] - spans[0][1],
                time.perf_counter() - read_at,
            )
        else:
            if self._on_latency is not None:
                self._on_latency(time.perf_counter() - read_at)
            if self._counting:
                on_packets = self._on_packets
                if on_packets is None:
                    on_packet = self.obs.on_packet
                    for first, start, _, end in islice(spans, count):
                        on_packet(direction, _TYPE_NAMES[first >> 4], end - start)
                elif kind is None:
                    _count_mixed(on_packets, direction, spans, count)
                else:
                    on_packets(
                        direction, _TYPE_NAMES[kind], count, spans[count - 1][3] - spans[0][1]
                    )
        if views and self.tracer is not None and self.tracer.mqtt_enabled:
            for packet in views:
                self.tracer.mqtt(self.conn_id, arrow, packet)

    async def _pump_device_tracked(self) -> None:
        """Device -> hub, packet by packet, for a session whose token the gateway renews."""
        while True:
            packet = await self._next_device_packet()
            try:
                self.state.client_packet(packet)
            except MQTTProtocolError as exc:
                raise _Stop(CloseReason.DEVICE_PROTOCOL_ERROR, exc.reason) from None
            if self.policy is not None:
                self._check_policy(packet)
            if self.tracker is None:
                await self._send_upstream(packet)
            else:
                await self._send_upstream_tracked(packet, self.tracker)
            self.last_heard = trio.current_time()
            if self.state.client_disconnected:
                # The device is done (3.1.1 section 3.14.4): close both, the hub drops the Will.
                raise _Stop(CloseReason.DEVICE_DISCONNECT, "device disconnected")

    async def _send_upstream_tracked(self, packet: Packet, tracker: SessionTracker) -> None:
        """Send under the renewal's lock, so a packet goes to exactly one upstream
        connection and the tracker knows which."""
        if isinstance(packet, Publish) and packet.qos == 1:
            while tracker.full:
                # Bounded retransmission store: wait for the hub's PUBACKs.
                self._acked = trio.Event()
                await self._acked.wait()
        async with self.switch_lock:
            raw = tracker.client_packet(packet)
            if raw is not None:
                await self._send_upstream(packet, raw)

    def start_pump(self, link: UpstreamLink) -> None:
        """Relay what `link` receives from the hub, in a task of the relay's nursery."""
        assert self._nursery is not None
        self._nursery.start_soon(self._run_guarded, self._pump_upstream, link)

    async def _pump_upstream(self, link: UpstreamLink) -> None:
        try:
            await self._pump_link(link)
        except _Stop as stop:
            if stop.reason == CloseReason.DEVICE_ERROR or self._is_current(link):
                raise
            # A retired connection (or a renewal's new one that failed) ending is expected.
            log.debug("mqtt %s: hub connection %d ended: %s", self.label, link.generation, stop)
        finally:
            link.ended.set()
            link.connack_received.set()  # a renewal waiting for this CONNACK gives up

    def _is_current(self, link: UpstreamLink) -> bool:
        return link is self.link and not link.retired

    async def _pump_link(self, link: UpstreamLink) -> None:
        if self.tracker is None:
            await self._pump_link_batched(link)
        else:
            await self._pump_link_tracked(link)

    async def _pump_link_batched(self, link: UpstreamLink) -> None:
        """Hub -> device: every complete packet of a read, checked, in one write."""
        reader = link.reader
        stream = link.stream
        triage = Triage(SERVER, self.state.protocol_level)
        while True:
            try:
                buf, spans = reader.next_spans()
            except MQTTProtocolError as exc:
                raise _Stop(CloseReason.UPSTREAM_PROTOCOL_ERROR, exc.reason) from None
            if not spans:
                await self._read_upstream(stream, reader)
                continue
            count, views, stop = self._check_server_batch(buf, spans, triage)
            if count:
                data = _joined(buf, spans, count)
                try:
                    await self.device.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise _Stop(CloseReason.DEVICE_ERROR, _describe(exc)) from None
                self._observe(OUT, "->", spans, count, views, self._upstream_read_at)
                batching = self._ack_batching
                if batching is not None:
                    answers = _publish_answers(spans, count)
                    self._in_flight = max(0, self._in_flight - answers)
                    batching.answered(self._upstream_read_at, answers)
            if stop is not None:
                raise stop
            if spans[-1][3] == len(buf):
                await self._read_upstream(stream, reader)  # the read is used up

    def _check_server_batch(
        self, buf: Buffer, spans: list[Span], triage: Triage
    ) -> tuple[int, list[Packet] | None, _Stop | None]:
        """As `_check_device_batch`, for packets from the hub."""
        state = self.state
        total = len(spans)
        index = 0
        views: list[Packet] | None = None
        if self.tracer is not None and self.tracer.mqtt_enabled:
            views = []
        elif state.connack_code is not None:
            index = triage.fast_prefix(buf, spans)
            if index == total:
                return total, None, None
        level = state.protocol_level
        while index < total:
            try:
                packet = parse_span(buf, spans[index], level)
                state.server_packet(packet)
            except MQTTProtocolError as exc:
                return index, views, _Stop(CloseReason.UPSTREAM_PROTOCOL_ERROR, exc.reason)
            if isinstance(packet, Publish):
                triage.learn_topic(packet)
            if views is not None:
                views.append(packet)
            index += 1
            if isinstance(packet, Connack):
                self._keep_alive_changed()
                if packet.return_code:
                    # The hub refused the device; the session is over once the device has
                    # the answer.
                    return (
                        index,
                        views,
                        _Stop(
                            CloseReason.UPSTREAM_REFUSED,
                            f"hub refused CONNECT with code {packet.return_code}",
                        ),
                    )
            if views is None and state.connack_code is not None:
                index = triage.fast_prefix(buf, spans, index)
        return total, views, None

    async def _read_upstream(self, stream: trio.abc.Stream, reader: PacketReader) -> None:
        """Feed `reader` the hub's next bytes (every TLS record already received);
        raises _Stop when the hub's side has ended (bytes received before the end
        were returned by earlier reads and are relayed first)."""
        batching = self._ack_batching
        if batching is not None:
            wait = batching.wait_before_read(time.perf_counter(), self._in_flight)
            if wait:
                await trio.sleep(wait)  # let the hub's answers gather: one wake-up for several
        try:
            data = await stream.receive_some(TLS_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._upstream_broken(exc, reader) from None
        if not data:
            raise _Stop(CloseReason.UPSTREAM_CLOSED, self._upstream_eof_detail(reader))
        self._upstream_read_at = time.perf_counter()
        reader.feed(data)

    def _upstream_broken(self, exc: BaseException, reader: PacketReader) -> _Stop:
        if _is_ragged_eof(exc):
            # Closed without a TLS close_notify: still just a close; MQTT's own framing
            # shows whether a packet was cut short.
            return _Stop(CloseReason.UPSTREAM_CLOSED, self._upstream_eof_detail(reader))
        return _Stop(CloseReason.UPSTREAM_ERROR, _describe(exc))

    async def _pump_link_tracked(self, link: UpstreamLink) -> None:
        """Hub -> device, packet by packet, for a session whose token the gateway renews."""
        reader = link.reader
        tracker = self.tracker
        while True:
            try:
                packet = reader.next_packet()
                if packet is not None:
                    if link.awaiting_connack:
                        self._connack_for_renewal(link, packet)
                        continue
                    if link.retired and packet.type is PacketType.DISCONNECT:
                        continue  # MQTT 5 "session taken over" belongs to the old connection
                    self.state.server_packet(packet)
            except MQTTProtocolError as exc:
                raise _Stop(CloseReason.UPSTREAM_PROTOCOL_ERROR, exc.reason) from None
            if isinstance(packet, Connack):
                self._keep_alive_changed()
            if packet is None:
                try:
                    data = await link.receive_some(TLS_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise self._upstream_broken(exc, reader) from None
                if data is None:
                    return  # a renewal retired this connection and stopped reading it
                if not data:
                    raise _Stop(CloseReason.UPSTREAM_CLOSED, self._upstream_eof_detail(reader))
                reader.feed(data)
                continue
            assert tracker is not None
            if not tracker.server_packet(packet, link.generation):
                continue
            if isinstance(packet, Puback) and self._acked is not None:
                self._acked.set()
            async with self._device_send_lock:  # type: ignore[union-attr]
                await self._send_device(packet)
            if isinstance(packet, Connack) and packet.return_code:
                # The hub refused the device; the session is over once the device has the answer.
                raise _Stop(
                    CloseReason.UPSTREAM_REFUSED,
                    f"hub refused CONNECT with code {packet.return_code}",
                )

    def _connack_for_renewal(self, link: UpstreamLink, packet: Packet) -> None:
        """The first packet on a renewal's new connection: its CONNACK, not for the device."""
        if not isinstance(packet, Connack):
            raise MQTTProtocolError(f"server's first packet is {packet.type.name}, not CONNACK")
        link.awaiting_connack = False
        link.connack_code = packet.return_code
        link.connack_received.set()
        if packet.return_code:
            raise _Stop(
                CloseReason.UPSTREAM_REFUSED, f"renewal CONNECT refused ({packet.return_code})"
            )

    def _upstream_eof_detail(self, reader: PacketReader) -> str:
        partial = f" mid-packet ({reader.buffered} bytes buffered)" if reader.buffered else ""
        return f"hub closed the connection{partial}"

    # -- what a token renewal uses (mqtt_renewal.RelayHost) ----------------------------------

    async def open_link(self, generation: int) -> UpstreamLink:
        return self._new_link(await self._open_stream(None), generation)

    async def send_on(self, link: UpstreamLink, data: bytes) -> bool:
        """Send the gateway's own bytes on `link`; False if the connection is broken."""
        try:
            await link.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def switch_to(self, link: UpstreamLink) -> None:
        self.link = link

    async def close_link(self, link: UpstreamLink) -> None:
        link.stop_reading()
        with trio.move_on_after(CLOSE_TIMEOUT):
            await link.ended.wait()
        await self._close_link_stream(link)

    # -- device side ------------------------------------------------------------------------

    async def _next_device_packet(self) -> Packet:
        """The device's next packet; raises _Stop on EOF, errors and keep-alive expiry."""
        reader = self.device_reader
        while True:
            try:
                packet = reader.next_packet()
            except PacketTooLarge as exc:
                raise _Stop(CloseReason.PACKET_TOO_LARGE, exc.reason) from None
            except UnsupportedProtocolVersion as exc:
                await self._send_own(encode.connack(ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION))
                raise _Stop(CloseReason.UNSUPPORTED_PROTOCOL, exc.reason) from None
            except MQTTProtocolError as exc:
                raise _Stop(CloseReason.DEVICE_PROTOCOL_ERROR, exc.reason) from None
            if packet is not None:
                return packet
            await self._read_device()

    async def _read_device(self) -> None:
        """Feed the device reader its next bytes; raises _Stop on EOF and errors
        (keep-alive expiry: `_watch_keep_alive`)."""
        self._device_reading = True
        try:
            data = await self.device.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not _is_ragged_eof(exc):
                raise _Stop(CloseReason.DEVICE_ERROR, _describe(exc)) from None
            data = b""
        finally:
            self._device_reading = False
        reader = self.device_reader
        if not data:
            partial = f" mid-packet ({reader.buffered} bytes buffered)" if reader.buffered else ""
            raise _Stop(CloseReason.DEVICE_CLOSED, f"device closed without DISCONNECT{partial}")
        self._device_read_at = time.perf_counter()
        reader.feed(data)

    def _check_policy(self, packet: Packet) -> None:
        assert self.policy is not None
        if isinstance(packet, Publish):
            topic = packet.topic
            alias = packet.topic_alias if self.state.protocol_level == MQTT_5 else None
            if alias is not None:
                if topic:
                    self.topic_aliases[alias] = topic
                else:
                    topic = self.topic_aliases.get(alias, "")
                    if not topic:
                        raise _Stop(
                            CloseReason.DEVICE_PROTOCOL_ERROR, f"unknown topic alias {alias}"
                        )
            if not self.policy.allows_publish(topic):
                raise _Stop(
                    CloseReason.TOPIC_REFUSED,
                    f"PUBLISH to {topic!r} refused: not in the route's allowed_topics",
                )
        elif isinstance(packet, Subscribe):
            for topic_filter in packet.topic_filters:
                if not self.policy.allows_subscribe(topic_filter):
                    raise _Stop(
                        CloseReason.TOPIC_REFUSED,
                        f"SUBSCRIBE to {topic_filter!r} refused: not in the route's allowed_topics",
                    )

    async def _send_upstream(self, packet: Packet, raw: bytes | None = None) -> None:
        """Relay `packet` to the current upstream connection (as `raw` if the gateway
        rewrote it: a CONNECT with credentials filled in, an MQTT 5 PUBLISH whose topic
        alias the connection does not know)."""
        assert self.link is not None
        try:
            await self.link.stream.send_all(packet.raw if raw is None else raw)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Stop(CloseReason.UPSTREAM_ERROR, _describe(exc)) from None
        self.obs.on_packet(IN, packet.type.name, packet.size)
        if self.tracer is not None and self.tracer.mqtt_enabled:
            self.tracer.mqtt(self.conn_id, "<-", packet)

    async def _send_device(self, packet: Packet) -> None:
        try:
            await self.device.send_all(packet.raw)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Stop(CloseReason.DEVICE_ERROR, _describe(exc)) from None
        self.obs.on_packet(OUT, packet.type.name, packet.size)
        if self.tracer is not None and self.tracer.mqtt_enabled:
            self.tracer.mqtt(self.conn_id, "->", packet)

    async def _close_all(self) -> None:
        with trio.CancelScope(shield=True):
            await _close_stream(self.device)
            for link in list(self.links):
                await self._close_link_stream(link)


async def _close_stream(stream: trio.abc.Stream) -> None:
    with trio.CancelScope(shield=True):
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        if scope.cancelled_caught:
            await trio.aclose_forcefully(stream)


def _credential_note(decision: mqtt_credentials.ConnectDecision | None) -> str:
    """What the log line about a new session says of gateway-held credentials."""
    if decision is None or decision.entry is None:
        return ""
    entry = decision.entry
    if decision.token is not None:
        return f", token issued by the gateway ({entry.source}, {decision.token.lifetime:.0f}s)"
    return f", client certificate held by the gateway ({entry.source})"


# Ends that, once the device has sent DISCONNECT, are just the connection winding down.
_AFTER_DISCONNECT = {
    CloseReason.UPSTREAM_CLOSED,
    CloseReason.UPSTREAM_ERROR,
    CloseReason.DEVICE_CLOSED,
    CloseReason.DEVICE_ERROR,
}

# Closes that are part of normal life, logged at INFO; the rest at WARNING.
_ROUTINE = {
    CloseReason.DEVICE_DISCONNECT,
    CloseReason.DEVICE_CLOSED,
    CloseReason.UPSTREAM_CLOSED,
    CloseReason.SHUTDOWN,
}


def _joined(buf: Buffer, spans: list[Span], count: int) -> Buffer:
    """The bytes of the first `count` spans, which lie back to back in `buf`."""
    start = spans[0][1]
    end = spans[count - 1][3]
    if start == 0 and end == len(buf) and isinstance(buf, bytes):
        return buf  # the whole read, as it came
    return buf[start:end]


def _single_kind(spans: list[Span], count: int) -> int | None:
    """The packet type of the first `count` spans if they share one, else None."""
    kind = spans[0][0] >> 4
    for span in islice(spans, 1, count):
        if span[0] >> 4 != kind:
            return None
    return kind


def _answerable_publishes(spans: list[Span], count: int) -> int:
    """How many of the first `count` spans are PUBLISHes of QoS 1 or 2."""
    n = 0
    for span in islice(spans, count):
        first = span[0]
        if first >> 4 == 3 and first & 0x06:
            n += 1
    return n


def _publish_answers(spans: list[Span], count: int) -> int:
    """How many of the first `count` spans are PUBACKs or PUBRECs."""
    n = 0
    for span in islice(spans, count):
        if 4 <= span[0] >> 4 <= 5:
            n += 1
    return n


def _count_mixed(
    on_packets: Callable[[str, str, int, int], None], direction: str, spans: list[Span], count: int
) -> None:
    """`on_packets` once per packet type among the first `count` spans."""
    counts = [0] * 16
    sizes = [0] * 16
    for first, start, _, end in islice(spans, count):
        kind = first >> 4
        counts[kind] += 1
        sizes[kind] += end - start
    for kind, n in enumerate(counts):
        if n:
            on_packets(direction, _TYPE_NAMES[kind], n, sizes[kind])


def _only_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancellation(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def _is_ragged_eof(exc: BaseException) -> bool:
    """A TLS peer that closed its socket without close_notify."""
    return isinstance(exc.__cause__, ssl.SSLEOFError)


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {cause or exc}" if cause or str(exc) else type(exc).__name__


async def relay_mqtt_connection(
    device_stream: trio.abc.Stream,
    peer: tuple[str, int],
    listener_cfg: Any,
    config: Any,
    observer: RelayObserver | None = None,
    *,
    open_upstream: OpenUpstream | None = None,
    tls_contexts: ClientContextCache | None = None,
    tracer: PacketTracer | None = None,
    credentials: MqttCredentials | None = None,
    renewal_mode: RenewalMode = RenewalMode.AUTO,
) -> str:
    """Relay one device connection until either side ends it; returns the CloseReason.

    Closes both streams before returning. `open_upstream(connector, profile)`
    replaces the TLS connect (tests use it to put a memory stream there).
    `tracer` logs every relayed packet on the device connection's id ("<-" from
    the device, "->" to it) when its `mqtt_enabled` is set. `credentials`: the
    listener's `MqttCredentials` (None: devices bring their own credentials);
    `renewal_mode` how a token renewal replaces the upstream connection (see
    `gateway.mqtt_relay.renewal`).
    """
    connection = _Connection(
        device_stream,
        peer,
        listener_cfg,
        config,
        observer or _NullObserver(),
        open_upstream,
        tls_contexts or _default_contexts,
        tracer,
        credentials,
        renewal_mode,
    )
    return await connection.run()


async def serve_mqtt_listener(
    listener_cfg: Any,
    config: Any,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    observer: RelayObserver | None = None,
    listener_observer: ListenerObserver | None = None,
    stats: ListenerStats | None = None,
    tracer: PacketTracer | None = None,
    credentials: CredentialStore | None = None,
    clock: Callable[[], float] = time.time,
    renewal_mode: RenewalMode = RenewalMode.AUTO,
    settings: ListenerSettings | None = None,
) -> None:
    """Serve one `protocol: mqtt` listener until cancelled.

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
    """
    settings = settings or ListenerSettings.from_config(listener_cfg, config)
    contexts = ClientContextCache()
    held = MqttCredentials(credentials, clock=clock) if credentials else None

    async def handler(stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        await relay_mqtt_connection(
            stream,
            peer,
            listener_cfg,
            config,
            observer,
            tls_contexts=contexts,
            tracer=tracer,
            credentials=held,
            renewal_mode=renewal_mode,
        )

    await serve_listener(
        settings, handler, observer=listener_observer, stats=stats, task_status=task_status
    )
