"""One relayed MQTT session: a device connection and its upstream connection(s).

Per device connection:

1. Read CONNECT within the listener's `handshake_timeout` (else close). It is
   read in small pieces held in the daemon's handshake budget
   (`HandshakeBudget`), never more than the CONNECT still needs; a CONNECT
   larger than the listener's `max_connect_size`, or with a field over the
   limits of `gateway.mqtt.limits`, is refused before it is read whole.
2. Pick the route (`routes`): by the CONNECT user name (`username` routes),
   else by the hub host, the user name up to the first `/`.
3. Open a connection to the route's connector (the opener the daemon handed
   in: TCP and TLS within the connector's `connect_timeout`).
4. Forward the CONNECT bytes unchanged, then every packet in both directions
   as the original bytes, each one validated on the way (`pump`).

Answers the gateway gives itself (the only packets it ever writes):

- no route for the hub host: CONNACK 5 "not authorized" (MQTT 5: 0x87). The
  gateway refuses to relay for that hub, a configuration decision like an
  authorisation one; it is kept distinct from an unreachable hub so device
  logs tell the two apart.
- the connector cannot be reached (TCP, TLS or timeout): CONNACK 3 "server
  unavailable" (MQTT 5: 0x88), which devices retry.
- a Will topic outside the route's `allowed_topics`: CONNACK 5 (MQTT 5: 0x87).
- an unsupported protocol level: CONNACK 1 (3.1.1 section 3.1.2.2).
- a CONNECT over the pre-authentication limits (`gateway.mqtt.limits`): a
  client id too long, or a CONNECT over `max_connect_size`, CONNACK 2
  "identifier rejected" (MQTT 5: 0x85, or 0x95 "packet too large" for the
  whole CONNECT); a user name or password too long, CONNACK 4 (MQTT 5: 0x86).
  When the oversized CONNECT's protocol level is not yet known, the connection
  is closed without one.

Everything else comes from the hub, refusals included. Once the session is
relayed, nothing is answered on the hub's behalf: a protocol error, an
oversize packet, a refused topic or keep-alive expiry closes the device
connection (IoT Hub semantics: no error replies) and the upstream one with it,
without a DISCONNECT, so the hub publishes the device's Will as it would for
any abrupt loss.

Keep-alive: a device silent for 1.5 x its keep-alive (MQTT 5: the server's
Server Keep Alive if the CONNACK carries one) is closed.

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

import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from gateway.auth.dps import registration_of
from gateway.logsafe import shown, source
from gateway.mqtt import encode
from gateway.mqtt.constants import MQTT_5, V5_CONNACK_EQUIVALENT, ConnackCode
from gateway.mqtt.errors import (
    ConnectTooLarge,
    MQTTProtocolError,
    PacketTooLarge,
    UnsupportedProtocolVersion,
)
from gateway.mqtt.limits import DEFAULT_MAX_CONNECT_SIZE, check_connect, connect_level
from gateway.mqtt.packets import Connack, Connect, Packet
from gateway.mqtt.reader import PacketReader
from gateway.mqtt.session import RelayState
from gateway.mqtt.topics import TopicPolicy
from gateway.mqtt.tracking import SessionTracker

from .closing import (
    AFTER_DISCONNECT,
    ROUTINE,
    CloseReason,
    Stop,
    describe,
    is_ragged_eof,
    only_cancellation,
)
from .credentials import ConnectDecision, MqttCredentials
from .in_flight import AckBatchingFactory, InFlight
from .local_session import LocalSession, StoreForward, eligible
from .observer import IN, PacketReport, PacketTracer, RelayObserver, call_hook
from .pump import DeviceToHub, HubToDevice, Tracking
from .renewal import RenewalMode, SessionLost, TokenRenewal
from .routes import find_connector, hub_host_from_username, select_mqtt_route
from .upstream import HandshakeBudget, OpenUpstream, UpstreamLink, UpstreamUnavailable

__all__ = ["Session"]

log = logging.getLogger("gateway.mqtt.relay")

# Device side (plain TCP): one read takes whatever the device has pipelined.
RECEIVE_SIZE = 262144
# Packets from the hub are bounded too, but generously: the hub, not the
# gateway, decides what a device may receive.
UPSTREAM_MAX_PACKET_SIZE = 2 * 1024 * 1024
# Reads while waiting for CONNECT: at most this much, and no more than it still needs.
HANDSHAKE_READ = 4096
# Writing the gateway's own CONNACK or closing a stream never waits longer than this.
CLOSE_TIMEOUT = 2.0

_connection_ids = itertools.count(1)


class Session:
    """One device connection and, once routed, its upstream connection(s).

    Normally one upstream connection (`link`); while a gateway-issued token is
    renewed, two: see `gateway.mqtt_relay.renewal`. The device's bytes go up in
    one pump task (`DeviceToHub`), each upstream connection's come down in its own
    (`HubToDevice`).
    """

    def __init__(
        self,
        device: trio.abc.Stream,
        peer: tuple[str, int],
        listener_cfg: Any,
        config: Any,
        observer: RelayObserver,
        open_upstream: OpenUpstream,
        tracer: PacketTracer | None,
        credentials: MqttCredentials | None = None,
        renewal_mode: RenewalMode = RenewalMode.AUTO,
        ack_batching: AckBatchingFactory | None = None,
        handshake: HandshakeBudget | None = None,
        store_forward: StoreForward | None = None,
    ) -> None:
        self.device = device
        self.handshake = handshake
        self.peer = peer
        self.listener_cfg = listener_cfg
        self.config = config
        self.obs = observer
        self.open_upstream = open_upstream
        self.credentials = credentials
        self.renewal_mode = renewal_mode
        self.ack_batching = ack_batching
        self.store_forward = store_forward
        self.link: UpstreamLink | None = None  # the current upstream connection
        self.links: list[UpstreamLink] = []  # every open one (two during a renewal)
        self.device_reader = PacketReader(
            listener_cfg.max_packet_size,
            max_connect_size=getattr(listener_cfg, "max_connect_size", DEFAULT_MAX_CONNECT_SIZE),
        )
        self.state = RelayState()
        self.policy: TopicPolicy | None = None
        self.topic_aliases: dict[int, str] = {}
        self.last_heard = trio.current_time()
        self.conn_id = f"mqtt-{next(_connection_ids)}"
        self.report = PacketReport(observer, tracer, self.conn_id)
        self.label = f"{self.conn_id} {peer[0]}:{peer[1]}"
        self.stop: Stop | None = None
        # Keep-alive: whether the relay waits for the device's bytes (only that wait
        # counts towards the deadline), and the watch's sleep, whose deadline moves if
        # the keep-alive changes.
        self.device_reading = False
        self.device_read_at = 0.0  # when the device's bytes being relayed were read
        self._keep_alive_wait: trio.CancelScope | None = None
        # Decided once the session is routed (see `pump`):
        self.in_flight: InFlight | None = None
        self.tracking: Tracking | None = None
        # Set only when the gateway renews a token under this session (renewal.RelayHost):
        self.renewal: TokenRenewal | None = None
        self.tracker: SessionTracker | None = None
        self.switch_lock: trio.Lock | None = None
        self._connector: Any = None
        self._dialled: str | None = None  # the connector endpoint reached (failover)
        self._profile: Any = None
        self._nursery: trio.Nursery | None = None
        self.client_id = ""

    # -- the whole life of the connection ---------------------------------------------------

    async def run(self) -> str:
        try:
            connect = await self._read_connect()
            local = await self._open_upstream(connect)
            if local is not None:
                await local.run()  # ends with a Stop
            else:
                await self._relay()
        except Stop as stop:
            self.stop = self.stop or stop
        except BaseException as exc:
            if only_cancellation(exc):
                self.stop = self.stop or Stop(CloseReason.SHUTDOWN, "gateway shutting down")
            else:
                # A bug: close and count it here; the listener logs the traceback.
                self.stop = Stop(CloseReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            await self._close_all()
            stop = self.stop or Stop(CloseReason.SHUTDOWN, "gateway shutting down")
            if self.state.client_disconnected and stop.reason in AFTER_DISCONNECT:
                # The hub may close before the relay notices its own end of the DISCONNECT.
                stop = Stop(CloseReason.DEVICE_DISCONNECT, "device disconnected")
            elif self.state.connack_code and stop.reason in AFTER_DISCONNECT:
                # The device may hang up on the hub's refusal before the relay notices it.
                stop = Stop(
                    CloseReason.UPSTREAM_REFUSED,
                    f"hub refused CONNECT with code {self.state.connack_code}",
                )
            self.obs.on_close(stop.reason)
            level = logging.INFO if stop.reason in ROUTINE else logging.WARNING
            log.log(level, "mqtt %s closed: %s (%s)", self.label, stop.reason, stop.detail,
                    extra=source(self.peer[0], stop.reason))  # fmt: skip
            # A Stop's traceback holds this frame, whose locals hold the Stop (and its
            # context the frames of the error it replaced): a cycle that kept each
            # ended session, its CONNECT and buffers included, until a full collection.
            stop.__traceback__ = stop.__context__ = stop.__cause__ = None
            if self.stop is not None:
                self.stop.__traceback__ = self.stop.__context__ = self.stop.__cause__ = None
        return stop.reason

    # -- step 1: CONNECT ----------------------------------------------------------------

    async def _read_connect(self) -> Connect:
        timeout = float(self.listener_cfg.handshake_timeout)
        hold = self.handshake.hold() if self.handshake is not None else None
        try:
            with trio.move_on_after(timeout):
                packet = await self._next_device_packet(hold)
                try:
                    self.state.client_packet(packet)
                except MQTTProtocolError as exc:
                    raise Stop(CloseReason.DEVICE_PROTOCOL_ERROR, exc.reason) from None
                assert isinstance(packet, Connect)
                refusal = check_connect(packet)
                if refusal is not None:
                    await self._refuse(packet, refusal[0])
                    raise Stop(CloseReason.CONNECT_TOO_LARGE, refusal[1])
                return packet
        finally:
            if hold is not None:
                hold.release()
        raise Stop(CloseReason.CONNECT_TIMEOUT, f"no CONNECT within {timeout:g}s")

    async def _next_device_packet(self, hold: Any = None) -> Packet:
        """The device's CONNECT; raises Stop on EOF and errors. Reads only what the
        packet still needs, in the handshake budget's `hold` (if any)."""
        reader = self.device_reader
        while True:
            try:
                packet = reader.next_packet()
            except ConnectTooLarge as exc:
                await self._refuse_oversized()
                raise Stop(CloseReason.CONNECT_TOO_LARGE, exc.reason) from None
            except PacketTooLarge as exc:
                raise Stop(CloseReason.PACKET_TOO_LARGE, exc.reason) from None
            except UnsupportedProtocolVersion as exc:
                await self._send_own(encode.connack(ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION))
                raise Stop(CloseReason.UNSUPPORTED_PROTOCOL, exc.reason) from None
            except MQTTProtocolError as exc:
                raise Stop(CloseReason.DEVICE_PROTOCOL_ERROR, exc.reason) from None
            if packet is not None:
                return packet
            size = min(reader.needed or HANDSHAKE_READ, HANDSHAKE_READ)
            if hold is not None:
                await hold.grow_to(reader.buffered + size)
            await self.read_device(size)

    async def next_device_packet(self) -> Packet:
        """The device's next packet after its CONNECT (a local session's reads);
        raises Stop on EOF and errors."""
        reader = self.device_reader
        while True:
            try:
                packet = reader.next_packet()
            except PacketTooLarge as exc:
                raise Stop(CloseReason.PACKET_TOO_LARGE, exc.reason) from None
            except MQTTProtocolError as exc:
                raise Stop(CloseReason.DEVICE_PROTOCOL_ERROR, exc.reason) from None
            if packet is not None:
                return packet
            await self.read_device()

    async def _refuse_oversized(self) -> None:
        """Answer a CONNECT over the size limit if its protocol level is known."""
        reader = self.device_reader
        level = connect_level(reader.head(16))
        if level is None:
            return  # too little of it to answer in the device's version: close
        if level == MQTT_5:
            await self._send_own(encode.connack(0x95, protocol_level=level))
        else:
            await self._send_own(encode.connack(ConnackCode.IDENTIFIER_REJECTED))

    async def read_device(self, size: int = RECEIVE_SIZE) -> bool:
        """Feed the device reader its next bytes (at most `size`); raises Stop on EOF
        and errors (keep-alive expiry: `_watch_keep_alive`). Always True: the device
        is read until the session ends."""
        self.device_reading = True
        try:
            data = await self.device.receive_some(size)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not is_ragged_eof(exc):
                raise Stop(CloseReason.DEVICE_ERROR, describe(exc)) from None
            data = b""
        finally:
            self.device_reading = False
        reader = self.device_reader
        if not data:
            partial = f" mid-packet ({reader.buffered} bytes buffered)" if reader.buffered else ""
            raise Stop(CloseReason.DEVICE_CLOSED, f"device closed without DISCONNECT{partial}")
        self.device_read_at = time.perf_counter()
        reader.feed(data)
        return True

    # -- step 2 and 3: route and upstream ---------------------------------------------------

    async def _open_upstream(self, connect: Connect) -> LocalSession | None:
        """Route the device and open its upstream connection; or, for a store-and-forward
        device whose hub is unreachable or whose older messages still wait, return
        the local session that answers it instead (`local_session`)."""
        hub = hub_host_from_username(connect.username)
        self.label = f"{self.label} client {shown(connect.client_id)}"
        call_hook(self.obs, "on_device_identified", self.peer, connect.client_id)
        self.client_id = connect.client_id
        device_record = getattr(self.obs, "device_record", None)
        if device_record is not None:
            self.report.dev = device_record(self.peer)
        route = select_mqtt_route(self.config.mqtt_routes, connect.username)
        registration = registration_of(connect.username)
        if route is None:
            await self._refuse(connect, ConnackCode.NOT_AUTHORIZED)
            if registration is not None:
                scope, reg_id = registration
                raise Stop(
                    CloseReason.NO_ROUTE,
                    f"no mqtt route for registration {shown(reg_id)} of ID scope {shown(scope)}",
                )
            raise Stop(CloseReason.NO_ROUTE, f"no mqtt route for hub {shown(hub)}")
        if route.allowed_topics is not None:
            self.policy = TopicPolicy(route.allowed_topics)
            if connect.will is not None and not self.policy.allows_publish(connect.will.topic):
                await self._refuse(connect, ConnackCode.NOT_AUTHORIZED)
                raise Stop(
                    CloseReason.TOPIC_REFUSED,
                    f"Will topic {shown(connect.will.topic)} not in allowed_topics of {route.match}",
                )
        connector = find_connector(self.config, route.connector)
        profile = self.config.tls_profiles[connector.tls_profile] if connector.tls_profile else None
        connect_raw = connect.raw
        decision = None
        if self.credentials is not None:
            decision = await self.credentials.decide(connect, self.peer[0], hub, profile)
            if decision.refuse is not None:
                await self._refuse(connect, decision.refuse)
                raise Stop(decision.close_reason, decision.detail)
            connect_raw = decision.connect_raw
            profile = decision.profile or profile
        self._connector, self._profile = connector, profile
        forward = self.store_forward
        if not (
            forward is not None
            and decision is not None
            and eligible(connect, decision.entry, decision.token)
        ):
            forward = None
        elif forward.store.backlog(connect.client_id) > 0:
            # Older messages first: the hub gets this device's messages in order.
            return self._local(connect, "older messages of the device are still stored")
        renewed = decision is not None and decision.token is not None and decision.entry is not None
        if renewed:
            self.tracking = Tracking(SessionTracker(connect.protocol_level))
            self.tracker = self.tracking.tracker
            self.switch_lock = self.tracking.switch_lock
        else:
            # The hub's answers are held under load only on the untracked path.
            wait = float(getattr(connector, "ack_batching", 0.0))
            if wait > 0.0 and self.ack_batching is not None:
                self.in_flight = InFlight(self.ack_batching(wait))
        try:
            stream = await self._open_stream(connect, refuse=forward is None)
        except UpstreamUnavailable as exc:
            return self._local(connect, f"hub unreachable ({exc.reason}: {exc.detail})")
        self.link = self._new_link(stream, 0)
        log.info(
            "mqtt %s: %s -> connector %s (%s), protocol level %d, keep-alive %ds%s",
            self.label,
            f"registration {shown(registration[1])} of ID scope {shown(registration[0])}"
            if registration is not None
            else f"hub {shown(hub)}",
            connector.name,
            self._dialled or f"{connector.host}:{connector.port}",
            connect.protocol_level,
            connect.keep_alive,
            _credential_note(decision),
        )
        await self.send_upstream(connect, connect_raw)
        if forward is not None:
            unavailable = await self._hub_unavailable(self.link)
            if unavailable is not None:
                await self._close_link_stream(self.link)
                self.link = None
                return self._local(connect, unavailable)
        self.last_heard = trio.current_time()
        if renewed:
            assert self.credentials is not None and decision is not None
            assert decision.entry is not None and decision.token is not None
            self.renewal = TokenRenewal(
                self,  # type: ignore[arg-type]  # tracker and switch_lock are set
                self.credentials,
                decision.entry,
                connect,
                hub,
                decision.token,
                connack_timeout=float(connector.connect_timeout),
                mode=self.renewal_mode,
            )
        return None

    def _local(self, connect: Connect, why: str) -> LocalSession:
        assert self.store_forward is not None
        return LocalSession(self, self.store_forward, connect, self._connector.name, why)

    async def _hub_unavailable(self, link: UpstreamLink) -> str | None:
        """For a store-and-forward device: wait for the hub's CONNACK, left in `link`'s
        reader for the relay; why the hub counts as unreachable (CONNACK 3, closed or
        silent), or None (any other answer, a refusal included, is relayed as ever)."""
        timeout = float(self._connector.connect_timeout)
        peek = PacketReader(UPSTREAM_MAX_PACKET_SIZE, protocol_level=self.state.protocol_level)
        with trio.move_on_after(timeout):
            while True:
                try:
                    data = await link.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    return f"hub connection failed before CONNACK ({describe(exc)})"
                if not data:
                    return "hub closed the connection before CONNACK"
                link.reader.feed(data)
                try:
                    peek.feed(data)
                    packet = peek.next_packet()
                except MQTTProtocolError:
                    return None  # the relay reports it as it always has
                if packet is None:
                    continue
                if isinstance(packet, Connack) and packet.return_code == int(
                    ConnackCode.SERVER_UNAVAILABLE
                ):
                    return "hub answered CONNACK 3 (server unavailable)"
                return None
        return f"no CONNACK from the hub within {timeout:g}s"

    async def _open_stream(
        self, connect: Connect | None, *, refuse: bool = True
    ) -> trio.abc.Stream:
        """A new connection to the route's connector; refuses the device if `connect` is
        given (the first connection) and `refuse`, else raises UpstreamUnavailable."""
        connector, profile = self._connector, self._profile
        try:
            opened = await self.open_upstream(connector, profile)
        except UpstreamUnavailable as exc:
            call_hook(self.obs, "on_upstream_connect_failure", connector.name, exc.reason)
            if connect is None or not refuse:
                raise
            await self._refuse(connect, ConnackCode.SERVER_UNAVAILABLE)
            raise Stop(
                CloseReason.UPSTREAM_UNAVAILABLE,
                f"connector {connector.name} ({exc.reason}): {exc.detail}",
            ) from None
        self._dialled = opened.endpoint
        return opened.stream

    def _new_link(self, stream: trio.abc.Stream, generation: int) -> UpstreamLink:
        reader = PacketReader(
            max(UPSTREAM_MAX_PACKET_SIZE, self.listener_cfg.max_packet_size),
            protocol_level=self.state.protocol_level,
        )
        link = UpstreamLink(stream, reader, generation)
        self.links.append(link)
        call_hook(self.obs, "on_upstream_open", self._connector.name)
        upstream_record = getattr(self.obs, "upstream_record", None)
        if upstream_record is not None:
            link.record = upstream_record(self.peer, f"{self.conn_id}.{generation}",
                                          self._connector.name, self._dialled, self.client_id)  # fmt: skip
        if self.link is None:
            self.report.up = link.record  # the first: current from the start
        return link

    async def _close_link_stream(self, link: UpstreamLink) -> None:
        await _close_stream(link.stream)
        if link in self.links:
            self.links.remove(link)
            call_hook(self.obs, "on_upstream_close", self._connector.name)
            if link.record is not None:
                call_hook(self.obs, "upstream_record_closed", link.record)

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

    async def send_upstream(self, packet: Packet, raw: bytes | None = None) -> None:
        """Relay `packet` to the current upstream connection (as `raw` if the gateway
        rewrote it: a CONNECT with credentials filled in, an MQTT 5 PUBLISH whose topic
        alias the connection does not know)."""
        assert self.link is not None
        try:
            await self.link.stream.send_all(packet.raw if raw is None else raw)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise Stop(CloseReason.UPSTREAM_ERROR, describe(exc)) from None
        self.report.packet(IN, "<-", packet)

    # -- step 4: the relay ---------------------------------------------------------------

    async def _relay(self) -> None:
        assert self.link is not None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            to_hub = DeviceToHub(self, self.in_flight, self.tracking)
            nursery.start_soon(self._run_guarded, to_hub.run)
            nursery.start_soon(self._run_guarded, self._watch_keep_alive)
            self.start_pump(self.link)
            if self.renewal is not None:
                nursery.start_soon(self._run_guarded, self.renewal.run)

    async def _run_guarded(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run one task of the relay; a Stop from it ends the whole connection."""
        assert self._nursery is not None
        try:
            await fn(*args)
            return
        except Stop as stop:
            self.stop = self.stop or stop
        except SessionLost as lost:
            self.stop = self.stop or Stop(lost.reason, lost.detail)
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
                    raise Stop(
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
            waiting = self.device_reading

    def keep_alive_changed(self) -> None:
        """An MQTT 5 CONNACK may set the keep-alive (Server Keep Alive)."""
        if self._keep_alive_wait is not None:
            self._keep_alive_wait.deadline = self.state.keep_alive_deadline(self.last_heard)

    def start_pump(self, link: UpstreamLink) -> None:
        """Relay what `link` receives from the hub, in a task of the relay's nursery."""
        assert self._nursery is not None
        self._nursery.start_soon(self._run_guarded, self._pump_upstream, link)

    async def _pump_upstream(self, link: UpstreamLink) -> None:
        try:
            await HubToDevice(self, link, self.in_flight, self.tracking).run()
        except Stop as stop:
            if stop.reason == CloseReason.DEVICE_ERROR or self._is_current(link):
                raise
            # A retired connection (or a renewal's new one that failed) ending is expected.
            log.debug("mqtt %s: hub connection %d ended: %s", self.label, link.generation, stop)
        finally:
            link.ended.set()
            link.connack_received.set()  # a renewal waiting for this CONNACK gives up

    def _is_current(self, link: UpstreamLink) -> bool:
        return link is self.link and not link.retired

    # -- what a token renewal uses (renewal.RelayHost) ---------------------------------------

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
        self.report.up = link.record

    async def close_link(self, link: UpstreamLink) -> None:
        link.stop_reading()
        with trio.move_on_after(CLOSE_TIMEOUT):
            await link.ended.wait()
        await self._close_link_stream(link)

    # -- the end -------------------------------------------------------------------------

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


def _credential_note(decision: ConnectDecision | None) -> str:
    """What the log line about a new session says of gateway-held credentials."""
    if decision is None or decision.entry is None:
        return ""
    entry = decision.entry
    if decision.registration:
        return f", registration signed by the gateway ({entry.source})"
    if decision.token is not None:
        return f", token issued by the gateway ({entry.source}, {decision.token.lifetime:.0f}s)"
    return f", client certificate held by the gateway ({entry.source})"
