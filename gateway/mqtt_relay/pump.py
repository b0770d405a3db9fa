"""The byte pump: one direction of a relayed session, device -> hub or hub -> device.

One loop (`Pump.run`) serves both directions: read, frame, check, forward,
count. Each direction's pump says where its bytes come from and go to and
which checks apply (`DeviceToHub`, `HubToDevice`). What varies with the
session is decided once, when the session is routed, as plain objects the
loop consults:

- `in_flight` (`InFlight`, or None): the connector holds the hub's answers
  under load (`ack_batching`), so the PUBLISHes sent to the hub and their
  answers are counted, and the hub is read after the wait the policy asks for.
- `tracking` (`Tracking`, or None): the gateway renews the session's token
  (`renewal.TokenRenewal`), so every packet goes on by itself through the
  session tracker, which may rewrite or drop it, and a renewal can move the
  session to a new upstream connection between two packets.

Without tracking (the fast path) every complete packet of a read goes on in
one write: PUBLISH, its acknowledgements and pings are checked from their
fixed and variable headers (`gateway.mqtt.triage`); anything else, and a
PUBLISH to a topic not yet seen on the connection, is parsed in full first.
With tracking, or while the packet trace is on, every packet is parsed.

Backpressure: each direction reads its next bytes only after the previous
ones were written to the other side (one write in flight per direction), so
a slow hub slows the device and buffers stay bounded by one packet plus one
read.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from gateway.logsafe import shown
from gateway.mqtt.constants import MQTT_5, PacketType
from gateway.mqtt.errors import MQTTProtocolError, PacketTooLarge
from gateway.mqtt.packets import Connack, Packet, Puback, Publish, Subscribe
from gateway.mqtt.reader import Buffer, PacketReader, Span, parse_span
from gateway.mqtt.session import RelayState
from gateway.mqtt.topics import TopicPolicy
from gateway.mqtt.tracking import SessionTracker
from gateway.mqtt.triage import CLIENT, SERVER, Triage

from .closing import CloseReason, Stop, describe, is_ragged_eof
from .in_flight import InFlight
from .observer import IN, OUT, PacketReport
from .upstream import UpstreamLink

__all__ = ["DeviceToHub", "HubToDevice", "Pump", "PumpSession", "Tracking"]

# Hub side: a read of the TLS stream (gateway.net.tls_stream) returns every record
# already received, up to this many bytes, so a hub's PUBACKs (one record each)
# go to the device in one write.
TLS_RECEIVE_SIZE = 262144

Checked = tuple[int, list[Packet] | None, Stop | None]


class PumpSession(Protocol):
    """What a pump uses of its session (`session.Session`)."""

    state: RelayState
    policy: TopicPolicy | None  # the route's allowed topics
    topic_aliases: dict[int, str]  # the device's MQTT 5 topic aliases
    device: trio.abc.Stream
    device_reader: PacketReader
    device_read_at: float  # when the device's bytes being relayed were read
    last_heard: float  # when the device's last packet went to the hub (trio's clock)
    link: UpstreamLink | None  # the current upstream connection
    report: PacketReport

    async def read_device(self) -> bool: ...
    async def send_upstream(self, packet: Packet, raw: bytes | None = None) -> None: ...
    def keep_alive_changed(self) -> None: ...


class Tracking:
    """A session whose gateway-issued token is renewed under it.

    Its packets pass one at a time through the `SessionTracker`, which knows what
    a new upstream connection must be told. A renewal holds `switch_lock` while it
    moves the session; with two upstream connections for a moment, two pumps may
    write to the device, one at a time (`device_lock`).
    """

    __slots__ = ("tracker", "switch_lock", "device_lock", "_acked")

    def __init__(self, tracker: SessionTracker) -> None:
        self.tracker = tracker
        self.switch_lock = trio.Lock()
        self.device_lock = trio.Lock()
        self._acked: trio.Event | None = None  # a PUBACK freed room in the tracker

    async def room_for(self, packet: Packet) -> None:
        """Wait, for a QoS 1 PUBLISH, until the tracker's retransmission store has room."""
        if isinstance(packet, Publish) and packet.qos == 1:
            while self.tracker.full:
                # Bounded retransmission store: wait for the hub's PUBACKs.
                self._acked = trio.Event()
                await self._acked.wait()

    def answered(self, packet: Packet) -> None:
        """The hub's `packet` goes to the device; a PUBACK frees room in the tracker."""
        if isinstance(packet, Puback) and self._acked is not None:
            self._acked.set()


class Pump:
    """One direction of a relayed session (see the module's docstring)."""

    side = CLIENT  # whose packets are read (gateway.mqtt.triage)
    write_error = CloseReason.UPSTREAM_ERROR  # why the session ends if the write fails

    def __init__(
        self,
        session: PumpSession,
        reader: PacketReader,
        send_all: Callable[[Buffer], Awaitable[None]],
        in_flight: InFlight | None,
        tracking: Tracking | None,
    ) -> None:
        self.session = session
        self.reader = reader
        self.in_flight = in_flight
        self.tracking = tracking
        self.report = session.report
        self.tracer = session.report.tracer
        self._send_all = send_all  # the other side, written in one piece without tracking
        # Called with the spans about to be written in one piece (None: nothing to do).
        self._before_write: Callable[[list[Span], int], None] | None = None

    async def run(self) -> None:
        """Relay until the source ends (a Stop) or, for a retired link, stops being read."""
        reader = self.reader
        tracking = self.tracking
        send_all = self._send_all
        before_write = self._before_write
        triage = Triage(self.side, self.session.state.protocol_level)
        while True:
            try:
                buf, spans = reader.next_spans()
            except MQTTProtocolError as exc:
                raise self._framing_error(exc) from None
            if not spans:
                if not await self._read():
                    return
                continue
            count, views, stop = self._check(buf, spans, triage)
            if count:
                if tracking is None:
                    # In one write. Inline, not a method: this is the relay's hot path.
                    data = joined(buf, spans, count)
                    if before_write is not None:
                        before_write(spans, count)
                    try:
                        await send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        raise Stop(self.write_error, describe(exc)) from None
                    self._written(spans, count, views)
                elif views:
                    await self._send_each(views, tracking)
            if stop is not None:
                raise stop
            if spans[-1][3] == len(buf):
                # The read is used up: no need to frame again.
                if not await self._read():
                    return

    # What each direction supplies:

    async def _read(self) -> bool:
        """Feed the reader the source's next bytes; False: the source is no longer read."""
        raise NotImplementedError

    def _framing_error(self, exc: MQTTProtocolError) -> Stop:
        raise NotImplementedError

    def _check(self, buf: Buffer, spans: list[Span], triage: Triage) -> Checked:
        """How many of `spans` may be forwarded, their views if needed (tracking, trace),
        and why the connection ends after them (None: it goes on)."""
        raise NotImplementedError

    def _written(self, spans: list[Span], count: int, views: list[Packet] | None) -> None:
        """The first `count` of `spans` were written in one piece: count them."""
        raise NotImplementedError

    async def _send_each(self, packets: list[Packet], tracking: Tracking) -> None:
        """Forward `packets` one at a time through the session tracker."""
        raise NotImplementedError


class DeviceToHub(Pump):
    """Device -> hub: checked against the session's state and the route's allowed topics."""

    side = CLIENT

    def __init__(
        self, session: PumpSession, in_flight: InFlight | None, tracking: Tracking | None
    ) -> None:
        link = session.link
        assert link is not None  # without tracking, the session's only upstream connection
        super().__init__(session, session.device_reader, link.stream.send_all, in_flight, tracking)
        self._read = session.read_device  # type: ignore[method-assign]
        if in_flight is not None:
            # Counted before the write, which may yield to the pump that relays their answers.
            self._before_write = in_flight.sent

    def _framing_error(self, exc: MQTTProtocolError) -> Stop:
        if isinstance(exc, PacketTooLarge):
            return Stop(CloseReason.PACKET_TOO_LARGE, exc.reason)
        return Stop(CloseReason.DEVICE_PROTOCOL_ERROR, exc.reason)

    def _check(self, buf: Buffer, spans: list[Span], triage: Triage) -> Checked:
        total = len(spans)
        views: list[Packet] | None = None
        tracer = self.tracer
        if self.tracking is None and (tracer is None or not tracer.mqtt_enabled):
            index = triage.fast_prefix(buf, spans)
            if index == total:
                return total, None, None
        else:
            views = []
            index = 0
        session = self.session
        state = session.state
        level = state.protocol_level
        while index < total:
            try:
                packet = parse_span(buf, spans[index], level)
                state.client_packet(packet)
            except MQTTProtocolError as exc:
                return index, views, Stop(CloseReason.DEVICE_PROTOCOL_ERROR, exc.reason)
            if session.policy is not None:
                try:
                    check_policy(session, packet)
                except Stop as stop:
                    return index, views, stop
            if isinstance(packet, Publish):
                triage.learn_topic(packet)
            if views is not None:
                views.append(packet)
            index += 1
            if state.client_disconnected:
                # The device is done (3.1.1 section 3.14.4): close both, the hub drops the Will.
                return index, views, Stop(CloseReason.DEVICE_DISCONNECT, "device disconnected")
            if views is None:
                index = triage.fast_prefix(buf, spans, index)
        return total, views, None

    def _written(self, spans: list[Span], count: int, views: list[Packet] | None) -> None:
        session = self.session
        self.report.batch(IN, "<-", spans, count, views, session.device_read_at)
        session.last_heard = trio.current_time()

    async def _send_each(self, packets: list[Packet], tracking: Tracking) -> None:
        session = self.session
        tracker = tracking.tracker
        for packet in packets:
            await tracking.room_for(packet)
            # Under the renewal's lock, so a packet goes to exactly one upstream
            # connection and the tracker knows which.
            async with tracking.switch_lock:
                raw = tracker.client_packet(packet)
                if raw is not None:
                    await session.send_upstream(packet, raw)
            session.last_heard = trio.current_time()


def check_policy(session: PumpSession, packet: Packet) -> None:
    """Raise Stop if the route's allowed topics refuse the device's `packet`."""
    policy = session.policy
    assert policy is not None
    if isinstance(packet, Publish):
        topic = packet.topic
        alias = packet.topic_alias if session.state.protocol_level == MQTT_5 else None
        if alias is not None:
            if topic:
                session.topic_aliases[alias] = topic
            else:
                topic = session.topic_aliases.get(alias, "")
                if not topic:
                    raise Stop(CloseReason.DEVICE_PROTOCOL_ERROR, f"unknown topic alias {alias}")
        if not policy.allows_publish(topic):
            raise Stop(
                CloseReason.TOPIC_REFUSED,
                f"PUBLISH to {shown(topic)} refused: not in the route's allowed_topics",
            )
    elif isinstance(packet, Subscribe):
        for topic_filter in packet.topic_filters:
            if not policy.allows_subscribe(topic_filter):
                raise Stop(
                    CloseReason.TOPIC_REFUSED,
                    f"SUBSCRIBE to {shown(topic_filter)} refused: not in the route's allowed_topics",
                )


class HubToDevice(Pump):
    """Hub -> device, from one upstream connection (`link`): checked against the
    session's state; the hub's refusal of the CONNECT ends the session once the
    device has it."""

    side = SERVER
    write_error = CloseReason.DEVICE_ERROR

    def __init__(
        self,
        session: PumpSession,
        link: UpstreamLink,
        in_flight: InFlight | None,
        tracking: Tracking | None,
    ) -> None:
        super().__init__(session, link.reader, session.device.send_all, in_flight, tracking)
        self.link = link
        self.read_at = 0.0  # when the bytes being relayed were read
        # A renewal may stop a tracked session's link from being read (it returns None).
        self._receive = link.stream.receive_some if tracking is None else link.receive_some

    def _framing_error(self, exc: MQTTProtocolError) -> Stop:
        return Stop(CloseReason.UPSTREAM_PROTOCOL_ERROR, exc.reason)

    async def _read(self) -> bool:
        """Feed the reader the hub's next bytes (every TLS record already received);
        raises Stop when the hub's side has ended (bytes received before the end
        were returned by earlier reads and are relayed first)."""
        in_flight = self.in_flight
        if in_flight is not None:
            wait = in_flight.wait_before_read(time.perf_counter())
            if wait:
                await trio.sleep(wait)  # let the hub's answers gather: one wake-up for several
        try:
            data = await self._receive(TLS_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._broken(exc) from None
        if data is None:
            return False  # a renewal retired this connection and stopped reading it
        if not data:
            raise Stop(CloseReason.UPSTREAM_CLOSED, self._eof_detail())
        self.read_at = time.perf_counter()
        self.reader.feed(data)
        return True

    def _broken(self, exc: BaseException) -> Stop:
        if is_ragged_eof(exc):
            # Closed without a TLS close_notify: still just a close; MQTT's own framing
            # shows whether a packet was cut short.
            return Stop(CloseReason.UPSTREAM_CLOSED, self._eof_detail())
        return Stop(CloseReason.UPSTREAM_ERROR, describe(exc))

    def _eof_detail(self) -> str:
        buffered = self.reader.buffered
        partial = f" mid-packet ({buffered} bytes buffered)" if buffered else ""
        return f"hub closed the connection{partial}"

    def _check(self, buf: Buffer, spans: list[Span], triage: Triage) -> Checked:
        state = self.session.state
        total = len(spans)
        index = 0
        views: list[Packet] | None = None
        tracer = self.tracer
        if self.tracking is not None or (tracer is not None and tracer.mqtt_enabled):
            views = []  # every packet parsed (tracked, or for the trace)
        elif state.connack_code is not None:
            index = triage.fast_prefix(buf, spans)
            if index == total:
                return total, None, None
        link = self.link
        level = state.protocol_level
        while index < total:
            try:
                packet = parse_span(buf, spans[index], level)
                if link.awaiting_connack:
                    self._connack_for_renewal(packet)
                    index += 1
                    continue
                if link.retired and packet.type is PacketType.DISCONNECT:
                    index += 1
                    continue  # MQTT 5 "session taken over" belongs to the old connection
                state.server_packet(packet)
            except MQTTProtocolError as exc:
                return index, views, Stop(CloseReason.UPSTREAM_PROTOCOL_ERROR, exc.reason)
            except Stop as stop:
                return index, views, stop
            if isinstance(packet, Publish):
                triage.learn_topic(packet)
            if views is not None:
                views.append(packet)
            index += 1
            if isinstance(packet, Connack):
                self.session.keep_alive_changed()
                if packet.return_code:
                    # The hub refused the device; the session is over once the device has
                    # the answer.
                    return (
                        index,
                        views,
                        Stop(
                            CloseReason.UPSTREAM_REFUSED,
                            f"hub refused CONNECT with code {packet.return_code}",
                        ),
                    )
            if views is None and state.connack_code is not None:
                index = triage.fast_prefix(buf, spans, index)
        return total, views, None

    def _connack_for_renewal(self, packet: Packet) -> None:
        """The first packet on a renewal's new connection: its CONNACK, not for the device."""
        link = self.link
        if not isinstance(packet, Connack):
            raise MQTTProtocolError(f"server's first packet is {packet.type.name}, not CONNACK")
        link.awaiting_connack = False
        link.connack_code = packet.return_code
        link.connack_received.set()
        if packet.return_code:
            raise Stop(
                CloseReason.UPSTREAM_REFUSED, f"renewal CONNECT refused ({packet.return_code})"
            )

    def _written(self, spans: list[Span], count: int, views: list[Packet] | None) -> None:
        self.report.batch(OUT, "->", spans, count, views, self.read_at)
        if self.in_flight is not None:
            self.in_flight.answered(self.read_at, spans, count)

    async def _send_each(self, packets: list[Packet], tracking: Tracking) -> None:
        device = self.session.device
        generation = self.link.generation
        for packet in packets:
            if not tracking.tracker.server_packet(packet, generation):
                continue
            tracking.answered(packet)
            async with tracking.device_lock:
                try:
                    await device.send_all(packet.raw)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise Stop(CloseReason.DEVICE_ERROR, describe(exc)) from None
                self.report.packet(OUT, "->", packet)


def joined(buf: Buffer, spans: list[Span], count: int) -> Buffer:
    """The bytes of the first `count` spans, which lie back to back in `buf`."""
    start = spans[0][1]
    end = spans[count - 1][3]
    if start == 0 and end == len(buf) and isinstance(buf, bytes):
        return buf  # the whole read, as it came
    return buf[start:end]
