"""Store-and-forward, MQTT side: the session the gateway answers itself while the hub
cannot be reached (see `docs/store-and-forward.md`, "MQTT devices").

Only for an eligible device (`eligible`): its credentials are held by the gateway,
its entry says `store_and_forward: true`, it relies on the gateway for its hub
token (its password is not a SAS token) and it speaks MQTT 3.1.1. Its session is
*local* when, at CONNECT, the hub cannot be reached (dial, TLS, proxy or timeout;
the hub answers CONNACK 3 or closes before a CONNACK), or when older messages of
the device are still stored, so its messages reach the hub in the order it sent
them. In a local session the gateway answers:

- CONNECT: CONNACK 0, session present 0;
- QoS 1 PUBLISH on the device's telemetry topic (`devices/{id}/messages/events`
  and below; a module's `devices/{id}/modules/{mid}/messages/events`): stored,
  then PUBACKed once the store has committed it; never before;
- QoS 0 telemetry: dropped and counted (nothing can be acknowledged);
- SUBSCRIBE: SUBACK 0x80 (failure) for each filter: C2D, twin and methods need
  the hub; UNSUBSCRIBE: UNSUBACK;
- PUBLISH to a twin or method topic (or any other topic): the connection is
  closed with one log line (MQTT 3.1.1 has no negative PUBACK);
- PINGREQ: PINGRESP; keep-alive enforced at 1.5 x the device's value;
- a full store: the PUBLISH is not acknowledged; the store is asked again for
  up to `FULL_WAIT` seconds (the device's next packets wait in its socket), then
  the connection is closed (`store_full`), so the device resends later. An
  unusable store (`StoreUnavailable`): closed at once (`store_unavailable`), one
  log line.

The forwarder (`forwarder.MqttForwarder`) closes a device's local sessions once
its stored messages have reached the hub (`hub_reachable`): the device
reconnects and is relayed to the hub transparently again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import trio

from gateway.mqtt import encode
from gateway.mqtt.constants import MQTT_3_1_1
from gateway.mqtt.errors import MQTTProtocolError
from gateway.mqtt.packets import (
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Publish,
    Subscribe,
    Unsubscribe,
)
from gateway.mqtt.session import RelayState
from gateway.mqtt.topics import TopicPolicy
from gateway.store import StoreError, StoreFull

from .closing import CloseReason, Stop
from .observer import PacketReport, call_hook
from .pump import check_policy

if TYPE_CHECKING:
    from gateway.auth.credentials import DeviceCredential

__all__ = [
    "CONNECT_META",
    "FULL_WAIT",
    "LocalSession",
    "LocalSessions",
    "StoreForward",
    "eligible",
    "is_telemetry",
    "telemetry_prefix",
]

log = logging.getLogger("gateway.mqtt.store")

# The store's meta key for a device's CONNECT (password removed), which the
# forwarder logs in with, a fresh gateway-issued token put in.
CONNECT_META = "mqtt.connect"
# Meta of a stored message: b"r" when the device set RETAIN (the hub records it as
# the `mqtt-retain` property), else empty.
RETAIN_META = b"r"
# How long a PUBLISH waits unacknowledged for room in a full store before the
# device is closed; the store is asked again every FULL_RETRY seconds meanwhile.
FULL_WAIT = 10.0
FULL_RETRY = 0.5
# Writing one of the gateway's answers never waits longer than this.
SEND_TIMEOUT = 5.0

# Close reasons of local sessions (see CloseReason).
STORE_FULL = CloseReason.STORE_FULL
STORE_UNAVAILABLE = CloseReason.STORE_UNAVAILABLE
HUB_REQUIRED = CloseReason.HUB_REQUIRED
HUB_REACHABLE = CloseReason.HUB_REACHABLE
SUBACK_FAILURE = 0x80


def telemetry_prefix(identity: str) -> str:
    """`devices/{id}/messages/events`, or a module's `devices/{id}/modules/{mid}/...`."""
    device, _, module = identity.partition("/")
    return (
        f"devices/{device}/modules/{module}/messages/events"
        if module
        else (f"devices/{device}/messages/events")
    )


def is_telemetry(topic: str, identity: str) -> bool:
    prefix = telemetry_prefix(identity)
    return topic == prefix or topic.startswith(prefix + "/")


def eligible(connect: Connect, entry: DeviceCredential | None, token: Any) -> bool:
    """Whether this device's sessions may be answered locally (module docstring).

    `entry`, `token`: the credential decision's (a token is issued only for an
    entry that authenticated locally and whose CONNECT carried no SAS token)."""
    return (
        entry is not None
        and token is not None
        and bool(getattr(entry, "store_and_forward", False))
        and connect.protocol_level == MQTT_3_1_1
    )


class LocalSessions:
    """The local sessions open now, by device identity; the forwarder reads it and
    closes a device's sessions when its backlog has reached the hub."""

    def __init__(self) -> None:
        self._by_device: dict[str, set[LocalSession]] = {}
        self._changed = trio.Event()

    def add(self, session: LocalSession) -> None:
        self._by_device.setdefault(session.identity, set()).add(session)
        self._changed.set()

    def remove(self, session: LocalSession) -> None:
        sessions = self._by_device.get(session.identity)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._by_device[session.identity]

    def devices(self) -> list[str]:
        """Devices with a local session not asked to close."""
        return [d for d in self._by_device if self.count(d)]

    def count(self, identity: str | None = None) -> int:
        """Local sessions (of `identity`) not asked to close."""
        if identity is None:
            return sum(self.count(d) for d in self._by_device)
        return sum(1 for s in self._by_device.get(identity, ()) if s.closing is None)

    def close_device(self, identity: str, detail: str) -> int:
        """Ask every local session of `identity` to close; how many there were."""
        sessions = list(self._by_device.get(identity, ()))
        for session in sessions:
            session.close_soon(detail)
        return len(sessions)

    def notify(self) -> None:
        """Wake the forwarder (a device went local, or stored its first message)."""
        self._changed.set()

    async def wait_changed(self) -> None:
        await self._changed.wait()
        self._changed = trio.Event()


class StoreForward:
    """What the relay is handed when store-and-forward is configured: the message
    store (`gateway.store.MessageStore`) and the registry of local sessions."""

    def __init__(self, store: Any, sessions: LocalSessions | None = None) -> None:
        self.store = store
        self.sessions = sessions or LocalSessions()


class LocalHost(Protocol):
    """What a local session uses of its relayed connection (`session.Session`)."""

    device: trio.abc.Stream
    state: RelayState
    policy: TopicPolicy | None
    report: PacketReport
    label: str
    obs: Any

    async def next_device_packet(self) -> Packet: ...


class LocalSession:
    """One device session answered by the gateway (module docstring). `run` ends
    only with a Stop, like the relay's own steps."""

    full_wait = FULL_WAIT
    full_retry = FULL_RETRY

    def __init__(
        self,
        host: LocalHost,
        forward: StoreForward,
        connect: Connect,
        connector: str,
        why: str,
    ) -> None:
        self.host = host
        self.store = forward.store
        self.sessions = forward.sessions
        self.connect = connect
        self.identity = connect.client_id
        self.connector = connector
        self.why = why
        self.prefix = telemetry_prefix(self.identity)
        self.stored = 0
        self.dropped_qos0 = 0
        self.closing: str | None = None
        self._read_scope: trio.CancelScope | None = None

    def close_soon(self, detail: str) -> None:
        """End the session after the packet being handled (never during a store append,
        whose PUBACK the device is owed)."""
        self.closing = detail
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def run(self) -> None:
        host = self.host
        level = self.connect.protocol_level
        try:
            await self.store.put_meta(
                self.identity, CONNECT_META, encode.connect_with_password(self.connect, None)
            )
        except StoreError as exc:
            await self._send(encode.connack(3, protocol_level=level))
            self._store_failed(exc, "saving the device's CONNECT")
        log.info(
            "mqtt %s: answered by the gateway (store and forward, connector %s): %s",
            host.label,
            self.connector,
            self.why,
        )
        call_hook(host.obs, "on_local_session", self.identity, self.why)
        await self._send(encode.connack(0, protocol_level=level))
        self.sessions.add(self)
        try:
            await self._serve()
        finally:
            self.sessions.remove(self)

    async def _serve(self) -> None:
        state = self.host.state
        last_heard = trio.current_time()
        while True:
            if self.closing is not None:
                raise Stop(HUB_REACHABLE, self.closing)
            with trio.CancelScope(deadline=state.keep_alive_deadline(last_heard)) as scope:
                self._read_scope = scope
                packet = await self.host.next_device_packet()
            self._read_scope = None
            if scope.cancelled_caught:
                if self.closing is not None:
                    raise Stop(HUB_REACHABLE, self.closing)
                raise Stop(
                    CloseReason.KEEPALIVE_TIMEOUT,
                    f"no packet from the device for {state.keep_alive_timeout:g}s "
                    f"(keep-alive {state.keep_alive}s)",
                )
            try:
                state.client_packet(packet)
            except MQTTProtocolError as exc:
                raise Stop(CloseReason.DEVICE_PROTOCOL_ERROR, exc.reason) from None
            report = self.host.report
            if report.tracing:
                assert report.tracer is not None
                report.tracer.mqtt(report.conn_id, "<-", packet)
            await self._handle(packet)
            last_heard = trio.current_time()

    async def _handle(self, packet: Packet) -> None:
        if isinstance(packet, Publish):
            await self._publish(packet)
        elif isinstance(packet, Pingreq):
            await self._send(encode.pingresp())
        elif isinstance(packet, Subscribe):
            self._check_policy(packet)
            log.info(
                "mqtt %s: SUBSCRIBE %s refused (0x80): the hub is unreachable; "
                "C2D, twin and methods need it",
                self.host.label,
                ", ".join(repr(f) for f in packet.topic_filters),
            )
            await self._send(
                encode.suback(packet.packet_id, [SUBACK_FAILURE] * len(packet.subscriptions))
            )
        elif isinstance(packet, Unsubscribe):
            await self._send(encode.unsuback(packet.packet_id))
        elif isinstance(packet, Disconnect):
            raise Stop(CloseReason.DEVICE_DISCONNECT, "device disconnected")
        # Anything else a client may send (PUBACK and the QoS 2 exchange) has nothing
        # to answer: the gateway never sent this device a PUBLISH.

    def _check_policy(self, packet: Packet) -> None:
        if self.host.policy is not None:
            check_policy(self.host, packet)  # type: ignore[arg-type]

    async def _publish(self, packet: Publish) -> None:
        self._check_policy(packet)
        topic = packet.topic
        if not is_telemetry(topic, self.identity):
            log.warning(
                "mqtt %s: PUBLISH to %r while the hub is unreachable: only telemetry "
                "(%s) is stored; closing the connection",
                self.host.label,
                topic,
                self.prefix,
            )
            raise Stop(HUB_REQUIRED, f"PUBLISH to {topic!r} needs the hub")
        if packet.qos == 0:
            # Nothing to acknowledge, so nothing promised: dropped, counted.
            self.dropped_qos0 += 1
            call_hook(self.host.obs, "on_store_dropped", self.identity, "qos0")
            return
        if packet.qos != 1:
            raise Stop(CloseReason.DEVICE_PROTOCOL_ERROR, "QoS 2 PUBLISH (IoT Hub refuses QoS 2)")
        assert packet.packet_id is not None
        await self._append(packet)
        await self._send(encode.puback(packet.packet_id))

    async def _append(self, packet: Publish) -> None:
        """Store `packet`; returns once committed. Raises Stop when it cannot be."""
        meta = RETAIN_META if packet.retain else b""
        payload = bytes(packet.payload)
        waited = 0.0
        while True:
            try:
                await self.store.append(
                    device=self.identity,
                    connector=self.connector,
                    protocol="mqtt",
                    address=packet.topic,
                    meta=meta,
                    payload=payload,
                )
            except StoreFull as exc:
                if waited >= self.full_wait:
                    # One line for it: the session's close line, at WARNING, says all.
                    raise Stop(
                        STORE_FULL,
                        f"store full ({exc.reason}) for {waited:g}s; PUBLISH "
                        f"{packet.packet_id} not acknowledged, the device resends it",
                    ) from None
                if waited == 0.0:
                    call_hook(self.host.obs, "on_store_refused", self.identity, "full")
                await trio.sleep(self.full_retry)  # back-pressure: the device waits
                waited += self.full_retry
                continue
            except StoreError as exc:
                self._store_failed(exc, f"storing PUBLISH {packet.packet_id}")
            if self.stored == 0:
                self.sessions.notify()
            self.stored += 1
            return

    def _store_failed(self, exc: Exception, what: str) -> None:
        reason = getattr(exc, "reason", str(exc))
        log.error(
            "mqtt %s: store unavailable %s: %s; closing the connection",
            self.host.label,
            what,
            reason,
        )
        call_hook(self.host.obs, "on_store_refused", self.identity, "unavailable")
        raise Stop(STORE_UNAVAILABLE, f"store unavailable: {reason}") from None

    async def _send(self, data: bytes) -> None:
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            try:
                await self.host.device.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise Stop(CloseReason.DEVICE_ERROR, f"{type(exc).__name__}") from None
        if scope.cancelled_caught:
            raise Stop(CloseReason.DEVICE_ERROR, f"device did not read for {SEND_TIMEOUT:g}s")
