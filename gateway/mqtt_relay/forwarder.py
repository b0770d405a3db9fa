"""Store-and-forward, MQTT side: replaying stored messages to the hub.

The daemon runs one `MqttForwarder` when `store_and_forward:` is configured. It
watches the devices with stored MQTT messages (`store.devices_waiting("mqtt")`)
and those in a local session (`LocalSessions`), and for each one, one at a time
per device:

1. reads the device's CONNECT saved by its local session (password removed),
   picks the route and connector from the user name as the relay does, and
   opens a connection to the connector with the relay's own opener (proxy,
   WebSockets and failover apply);
2. sends that CONNECT with a fresh gateway-issued SAS token as password, as
   the credentials path does for a live session (`MqttCredentials`), and waits
   for CONNACK 0; CONNACK 3, a close or a timeout: the hub is unreachable, the
   connector backs off (one probe at a time per connector while it does);
3. sends the stored messages oldest first, each as a QoS 1 PUBLISH with the
   original topic (property bag included) and payload bytes (RETAIN as the
   device set it), at most `window` unacknowledged and no faster than the
   connector's `store.replay_limiter`; each is deleted from the store only
   after the hub's PUBACK;
4. once nothing is left, sends DISCONNECT and closes the device's local
   sessions (`hub_reachable`), so its next session is relayed to the hub
   transparently. IoT Hub allows one connection per device: the replay
   connection runs only while the device is local or not connected (a device
   with stored messages is always answered locally).

A lost connection is retried with backoff. MQTT 3.1.1 has no negative PUBACK: a
hub that refuses a message closes the connection. So after a loss the next
`window` messages go one at a time, which tells which message the hub closes
on; a message on which the connection was lost `max_attempts` times in a row is
given up: `store.reject` (deleted, counted, logged). At-least-once: the hub may
have a message whose PUBACK was lost with the connection; it is sent again, at
most `window` duplicates per lost connection or gateway crash.

The replay connection uses the device's CONNECT as it was (clean session,
keep-alive, Will): with clean session 0 the hub may deliver the device's queued
C2D messages on it; they are never acknowledged, so the hub delivers them again
to the device. The token is not renewed in place: the connection is ended
(DISCONNECT) after `renew_at` of its lifetime and a new one opened.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import trio

from gateway.auth.credentials import CredentialError
from gateway.mqtt import encode
from gateway.mqtt.constants import ConnackCode
from gateway.mqtt.errors import MQTTProtocolError
from gateway.mqtt.packets import Connack, Connect, Puback
from gateway.mqtt.reader import PacketReader
from gateway.store import StoreError

from .credentials import MqttCredentials
from .local_session import CONNECT_META, RETAIN_META, LocalSessions, StoreForward
from .observer import call_hook
from .routes import find_connector, hub_host_from_username, select_mqtt_route
from .upstream import OpenUpstream, UpstreamUnavailable

__all__ = ["MqttForwarder"]

log = logging.getLogger("gateway.mqtt.forwarder")

WINDOW = 16  # unacknowledged PUBLISHes per replay connection
MAX_ATTEMPTS = 3  # losses on one message (sent alone) before it is rejected
SCAN_INTERVAL = 1.0  # how often the store is looked at without a wake-up
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
MAX_PARALLEL = 8  # replay connections at a time per connector
RECEIVE_SIZE = 65536
# Waiting for the last PUBACKs before an orderly end (token renewal, shutdown).
DRAIN_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0


class _Lost(Exception):
    """The replay connection ended (reason for the log)."""


@dataclass
class _Backoff:
    """Exponential backoff with jitter, trio's clock."""

    low: float = BACKOFF_MIN
    high: float = BACKOFF_MAX
    delay: float = 0.0
    until: float = 0.0

    def failed(self) -> float:
        self.delay = min(self.high, max(self.low, self.delay * 2))
        wait = self.delay * random.uniform(0.8, 1.2)
        self.until = trio.current_time() + wait
        return wait

    def ok(self) -> None:
        self.delay = 0.0
        self.until = 0.0


@dataclass
class _Connector:
    """Per connector: whether the hub was reachable last time, and one probe at a
    time while it was not (a thousand local devices do not dial a thousand times)."""

    backoff: _Backoff
    down: bool = False
    probing: bool = False  # a device task is finding out whether it is still down
    settled: trio.Event = field(default_factory=trio.Event)
    parallel: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(MAX_PARALLEL)
    )


@dataclass
class _Device:
    """Per device: backoff after a lost connection, and the message under suspicion."""

    backoff: _Backoff
    suspect: int | None = None  # seq of the message the last loss happened on
    attempts: int = 0  # losses on it, in a row
    probe_left: int = 0  # messages to send one at a time after a loss
    warned: str = ""  # last "cannot replay" warning, logged once


class MqttForwarder:
    """Replays stored MQTT messages to the hub (module docstring).

    `config` is read on every attempt (the daemon's live configuration);
    `credentials` is the credential store in force (`CredentialStore`, or the
    daemon's `LiveCredentials`); `open_upstream` the relay's opener.
    """

    def __init__(
        self,
        forward: StoreForward,
        config: Any,
        credentials: Any,
        open_upstream: OpenUpstream,
        *,
        clock: Any = None,
        window: int = WINDOW,
        max_attempts: int = MAX_ATTEMPTS,
        scan_interval: float = SCAN_INTERVAL,
        backoff: tuple[float, float] = (BACKOFF_MIN, BACKOFF_MAX),
        observer: Any = None,
    ) -> None:
        self.store = forward.store
        self.sessions: LocalSessions = forward.sessions
        self.config = config
        self.open_upstream = open_upstream
        kwargs = {"clock": clock} if clock is not None else {}
        self.credentials = MqttCredentials(credentials, **kwargs)
        self.window = window
        self.max_attempts = max_attempts
        self.scan_interval = scan_interval
        self.backoff = backoff
        self.observer = observer
        self._connectors: dict[str, _Connector] = {}
        self._devices: dict[str, _Device] = {}
        self._running: set[str] = set()
        self.replayed = 0
        self.rejected = 0
        self.connections = 0

    # -- the watch ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                for identity in self._candidates():
                    if identity not in self._running:
                        self._running.add(identity)
                        nursery.start_soon(self._device_task, identity)
                with trio.move_on_after(self.scan_interval):
                    await self.sessions.wait_changed()

    def _candidates(self) -> list[str]:
        waiting = self.store.devices_waiting("mqtt")
        return list(dict.fromkeys([*waiting, *self.sessions.devices()]))

    def _pending(self, identity: str) -> bool:
        return self.store.backlog(identity) > 0 or self.sessions.count(identity) > 0

    async def _device_task(self, identity: str) -> None:
        state = self._devices.get(identity)
        if state is None:
            state = self._devices[identity] = _Device(_Backoff(*self.backoff))
        try:
            while self._pending(identity):
                wait = state.backoff.until - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
                    continue
                try:
                    await self._attempt(identity, state)
                except StoreError as exc:
                    wait = state.backoff.failed()
                    log.warning("store and forward: %s: store error: %s; retrying in %.1fs",
                                identity, exc.reason, wait)  # fmt: skip
                except Exception:
                    # A bug: logged with its traceback; live relaying must not end with it.
                    state.backoff.delay = state.backoff.high
                    state.backoff.failed()
                    log.exception("store and forward: %s: replay failed", identity)
        finally:
            self._running.discard(identity)
            if not self._pending(identity):
                self._devices.pop(identity, None)

    # -- one replay connection -------------------------------------------------------------

    async def _attempt(self, identity: str, state: _Device) -> None:
        """One replay connection for `identity`; sets the backoff when it failed."""
        target = await self._target(identity, state)
        if target is None:
            state.backoff.delay = state.backoff.high
            state.backoff.failed()
            return
        connect, entry, connector, profile, hub = target
        gate = self._connectors.get(connector.name)
        if gate is None:
            gate = self._connectors[connector.name] = _Connector(_Backoff(*self.backoff))
        probing = await self._wait_gate(gate)
        try:
            async with gate.parallel:
                try:
                    opened = await self.open_upstream(connector, profile)
                except UpstreamUnavailable as exc:
                    self._down(gate, connector.name, f"{exc.reason}: {exc.detail}")
                    return
                stream = opened.stream
                try:
                    try:
                        login = await self._login(stream, connect, entry, hub, connector)
                    except _Lost as refused:
                        wait = state.backoff.failed()
                        log.warning("store and forward: %s: %s; retrying in %.1fs",
                                    identity, refused, wait)  # fmt: skip
                        return
                    if isinstance(login, str):
                        self._down(gate, connector.name, login)
                        return
                    if gate.down:
                        log.info("store and forward: connector %s reachable again", connector.name)
                    gate.down = False
                    gate.backoff.ok()
                    if probing:
                        probing = False
                        self._settle(gate)
                    await self._replay(stream, identity, state, connector, connect, *login)
                finally:
                    await _close(stream)
        finally:
            if probing:
                self._settle(gate)

    async def _wait_gate(self, gate: _Connector) -> bool:
        """While the connector is down, one device task probes it after the backoff and
        the others wait for the outcome; True for the one that probes."""
        while gate.down:
            if gate.probing:
                await gate.settled.wait()
                continue
            wait = gate.backoff.until - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
                continue
            gate.probing = True
            return True
        return False

    def _settle(self, gate: _Connector) -> None:
        gate.probing = False
        gate.settled.set()
        gate.settled = trio.Event()

    def _down(self, gate: _Connector, name: str, why: str) -> None:
        wait = gate.backoff.failed()
        if not gate.down:
            log.info("store and forward: connector %s unreachable (%s); retrying in %.1fs",
                     name, why, wait)  # fmt: skip
        gate.down = True

    async def _target(self, identity: str, state: _Device) -> tuple[Any, ...] | None:
        """What the replay connection needs, or None (warned once) if it cannot be made."""
        raw = await self.store.get_meta(identity, CONNECT_META)
        problem = ""
        result: tuple[Any, ...] | None = None
        if raw is None:
            problem = "no saved CONNECT"
        else:
            reader = PacketReader(len(raw) + 16)
            reader.feed(raw)
            try:
                connect = reader.next_packet()
            except MQTTProtocolError as exc:
                connect, problem = None, f"saved CONNECT unreadable: {exc.reason}"
            entry = self.credentials.store.lookup_identity(identity)
            route = None
            if not isinstance(connect, Connect):
                problem = problem or "saved CONNECT unreadable"
            elif entry is None or not getattr(entry, "store_and_forward", False):
                problem = "no credentials entry with store_and_forward for it any more"
            else:
                route = select_mqtt_route(self.config.mqtt_routes, connect.username)
                if route is None:
                    problem = f"no mqtt route for user name {connect.username!r}"
            if not problem:
                assert isinstance(connect, Connect) and route is not None
                connector = find_connector(self.config, route.connector)
                tls = self.config.tls_profiles
                profile = tls[connector.tls_profile] if connector.tls_profile else None
                hub = hub_host_from_username(connect.username)
                result = (connect, entry, connector, profile, hub)
        if problem and problem != state.warned:
            log.warning("store and forward: cannot replay %s's stored messages: %s; "
                        "retrying in %.0fs", identity, problem, self.backoff[1])  # fmt: skip
        state.warned = problem
        return result

    async def _login(
        self, stream: trio.abc.Stream, connect: Connect, entry: Any, hub: str, connector: Any
    ) -> str | tuple[PacketReader, float]:
        """CONNECT as the device: when the hub accepted, the connection's reader and the
        token's lifetime, else why the hub is unreachable.

        A refusal other than CONNACK 3 (the hub does not accept the gateway's token)
        raises _Lost: the device backs off, nothing is rejected."""
        try:
            raw, _token = self.credentials.connect_with_token(connect, entry, hub)
        except CredentialError as exc:
            raise _Lost(str(exc)) from None
        timeout = float(connector.connect_timeout)
        reader = PacketReader(1 << 20, protocol_level=connect.protocol_level)
        with trio.move_on_after(timeout):
            try:
                await stream.send_all(raw)
                while True:
                    data = await stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        return "hub closed the connection before CONNACK"
                    reader.feed(data)
                    packet = reader.next_packet()
                    if packet is None:
                        continue
                    if not isinstance(packet, Connack):
                        raise _Lost(f"hub's first packet is {packet.type.name}")
                    if packet.return_code == int(ConnackCode.SERVER_UNAVAILABLE):
                        return "CONNACK 3 (server unavailable)"
                    if packet.return_code:
                        raise _Lost(
                            f"hub refused the replay CONNECT with code {packet.return_code}"
                        )
                    return reader, float(_token.lifetime)
            except (trio.BrokenResourceError, trio.ClosedResourceError, MQTTProtocolError) as exc:
                return f"{type(exc).__name__} before CONNACK"
        return f"no CONNACK within {timeout:g}s"

    async def _replay(
        self,
        stream: trio.abc.Stream,
        identity: str,
        state: _Device,
        connector: Any,
        connect: Connect,
        reader: PacketReader,
        lifetime: float,
    ) -> None:
        replay = _Replay(self, stream, identity, state, connector, connect, reader, lifetime)
        self.connections += 1
        try:
            done = await replay.run()
        except _Lost as lost:
            await replay.lost(str(lost))
            return
        if done:
            closed = self.sessions.close_device(
                identity, "stored messages delivered; hub reachable"
            )
            log.info("store and forward: %s: backlog delivered (%d message(s) on this "
                     "connection)%s", identity, replay.acked,
                     f"; closing its {closed} local session(s)" if closed else "")  # fmt: skip


class _Replay:
    """One replay connection's send and acknowledgement loops."""

    def __init__(
        self,
        forwarder: MqttForwarder,
        stream: trio.abc.Stream,
        identity: str,
        state: _Device,
        connector: Any,
        connect: Connect,
        reader: PacketReader,
        lifetime: float,
    ) -> None:
        self.fw = forwarder
        self.store = forwarder.store
        self.stream = stream
        self.identity = identity
        self.state = state
        self.connector = connector.name
        self.level = connect.protocol_level
        self.reader = reader
        self.limiter = self.store.replay_limiter(connector.name)
        # Messages stored from now on are the device's live traffic, held back only for
        # order: replay_rate bounds the backlog, not them (else a device sending at that
        # rate would never drain its backlog).
        self.live_from = self.store.now()
        self.in_flight: OrderedDict[int, Any] = OrderedDict()  # packet id -> StoredMessage
        self.queue: deque[Any] = deque()
        self.last_sent = 0  # seq of the last message sent
        self.next_id = 0
        self.acked = 0
        self.deleting = 0  # acknowledged by the hub, being deleted from the store
        self.changed = trio.Event()
        renew_at = float(getattr(forwarder.credentials.store, "renew_at", 0.8))
        self.end_at = trio.current_time() + lifetime * renew_at

    async def run(self) -> bool:
        """Send until the backlog is empty (True) or the token is due (False); _Lost
        if the connection is lost first."""
        lost: list[str] = []
        failed: list[StoreError] = []
        done = False

        async def guarded(fn: Any) -> Any:
            try:
                return await fn()
            except _Lost as exc:
                lost.append(str(exc))
            except StoreError as exc:
                failed.append(exc)
            nursery.cancel_scope.cancel()
            return None

        async with trio.open_nursery() as nursery:
            nursery.start_soon(guarded, self._receive)
            done = bool(await guarded(self._send))
            if not lost and not failed:
                await self._drain()
            nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]
        if lost:
            raise _Lost(lost[0])
        await self._write(encode.disconnect())
        return done

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def _send(self) -> bool:
        while True:
            if trio.current_time() >= self.end_at:
                return False
            if not self.queue:
                await self._refill()
                if not self.queue:
                    if not self.in_flight and not self.deleting:
                        return True
                    await self.changed.wait()
                    continue
            window = 1 if self.state.probe_left > 0 else self.fw.window
            if len(self.in_flight) >= window:
                await self.changed.wait()
                continue
            if self.queue[0].stored_at < self.live_from:
                await self.limiter.acquire()
            msg = self.queue.popleft()
            packet_id = self._packet_id()
            self.in_flight[packet_id] = msg
            self.last_sent = msg.seq
            await self._write(
                encode.publish(
                    msg.address,
                    msg.payload,
                    qos=1,
                    packet_id=packet_id,
                    retain=msg.meta == RETAIN_META,
                )
            )

    async def _refill(self) -> None:
        limit = len(self.in_flight) + 2 * self.fw.window
        for msg in await self.store.peek(self.identity, limit):
            if msg.seq > self.last_sent:
                self.queue.append(msg)

    def _packet_id(self) -> int:
        while True:
            self.next_id = self.next_id % 0xFFFF + 1
            if self.next_id not in self.in_flight:
                return self.next_id

    async def _write(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _Lost(f"{type(exc).__name__} while sending") from None

    async def _receive(self) -> None:
        reader = self.reader
        while True:
            acked: list[Any] = []
            while True:
                try:
                    packet = reader.next_packet()
                except MQTTProtocolError as exc:
                    raise _Lost(f"hub protocol error: {exc.reason}") from None
                if packet is None:
                    break
                if isinstance(packet, Puback):
                    msg = self.in_flight.pop(packet.packet_id, None)
                    if msg is not None:
                        acked.append(msg)
                # Anything else (a C2D PUBLISH on a clean-session-0 login, PINGRESP) is
                # left unanswered: the hub delivers it again to the device itself.
            if acked:
                # Shielded: a message the hub acknowledged is deleted even if the
                # connection is being ended, or it would be sent again.
                self.deleting += len(acked)
                try:
                    with trio.CancelScope(shield=True):
                        await self._acked(acked)
                finally:
                    self.deleting -= len(acked)
                    self._wake()
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _Lost(f"{type(exc).__name__}") from None
            if not data:
                raise _Lost("hub closed the connection")
            reader.feed(data)

    async def _acked(self, msgs: list[Any]) -> None:
        state = self.state
        await self.store.delete([m.seq for m in msgs])
        self.store.record_replayed(self.connector, self.identity, len(msgs))
        self.acked += len(msgs)
        self.fw.replayed += len(msgs)
        for msg in msgs:
            if msg.seq == state.suspect:
                state.suspect, state.attempts = None, 0
        state.probe_left = max(0, state.probe_left - len(msgs))
        state.backoff.ok()
        self._wake()

    async def _drain(self) -> None:
        with trio.move_on_after(DRAIN_TIMEOUT):
            while self.in_flight or self.deleting:
                await self.changed.wait()

    async def lost(self, why: str) -> None:
        """The connection was lost: note the suspect, maybe reject it, back off."""
        state = self.state
        wait = state.backoff.failed()
        if not self.in_flight:
            log.info("store and forward: %s: replay connection lost (%s); retrying in %.1fs",
                     self.identity, why, wait)  # fmt: skip
            return
        # The hub may have had them and its PUBACKs were lost: they go again.
        suspect = getattr(self.store, "record_duplicate_suspect", None)
        if suspect is not None:
            suspect(self.connector, self.identity, len(self.in_flight))
        oldest = min(self.in_flight.values(), key=lambda m: m.seq)
        if state.suspect == oldest.seq and len(self.in_flight) == 1:
            state.attempts += 1
        else:
            state.suspect, state.attempts = oldest.seq, 1
        state.probe_left = self.fw.window
        if state.attempts >= self.fw.max_attempts:
            reason = (f"the hub closed the connection {state.attempts} times on this message "
                      f"({why})")  # fmt: skip
            log.warning("store and forward: %s: message %d (topic %r, %d bytes) rejected: %s",
                        self.identity, oldest.seq, oldest.address, len(oldest.payload),
                        reason)  # fmt: skip
            await self.store.reject(oldest, reason)
            self.fw.rejected += 1
            call_hook(self.fw.observer, "on_store_rejected", self.identity)
            state.suspect, state.attempts = None, 0
            state.backoff.ok()
            return
        log.info("store and forward: %s: replay connection lost with %d message(s) "
                 "unacknowledged (%s); retrying in %.1fs", self.identity,
                 len(self.in_flight), why, wait)  # fmt: skip


async def _close(stream: trio.abc.Stream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT) as scope:
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    if scope.cancelled_caught:
        await trio.aclose_forcefully(stream)
