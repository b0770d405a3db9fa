"""The hub's MQTT 3.1.1 front: asyncio TLS server, packets coded by amqtt.

IoT Hub rules: CONNECT checked (client id, username, SAS token or client
certificate), one connection per identity, only the documented topics, QoS 2
and anything unexpected close the connection without an error reply.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from typing import Any

from amqtt.adapters import StreamReaderAdapter
from amqtt.mqtt import packet_class
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.packet import (
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBLISH,
    SUBSCRIBE,
    UNSUBSCRIBE,
    MQTTFixedHeader,
)
from amqtt.mqtt.pingresp import PingRespPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.suback import SubackPacket
from amqtt.mqtt.unsuback import UnsubackPacket

import gateway.hubsim.propbag as propbag

from .certs import peer_common_name
from .mqtt_topics import (
    SUBSCRIPTION_LIMIT,
    classify_publish,
    classify_subscription,
    device_prefix,
    username_ok,
)
from .netutil import TrackingSocket, drop, end_handshakes, tracking_listener
from .records import AuthRecord, D2CRecord
from .state import C2DMessage, HubState, MethodCall

log = logging.getLogger("gateway.hubsim.mqtt")

CONNECT_TIMEOUT = 30.0
KEEPALIVE_CAP = 1767.0
DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024

CONNACK_ACCEPTED = 0
CONNACK_BAD_PROTOCOL = 1
CONNACK_BAD_CLIENT_ID = 2
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORISED = 5

_conn_ids = itertools.count(1)


class Violation(Exception):
    """The device broke a hub rule: the hub closes the connection, no reply."""


class PeerGone(Exception):
    pass


class MqttConnection:
    protocol = "mqtt"

    def __init__(
        self, server: MqttServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.state: HubState = server.state
        self.recorder = server.state.recorder
        self.id = next(_conn_ids)
        self.reader = StreamReaderAdapter(reader)
        self.writer = writer
        self.identity: str | None = None
        self.subs: dict[str, tuple[str, int]] = {}  # kind -> (filter, granted qos)
        self.inflight: dict[int, C2DMessage] = {}
        self.pids = itertools.cycle(range(1, 65536))
        self.will: tuple[str, bytes, bool] | None = None
        self.clean_session = True
        self.clean_disconnect = False
        self.close_reason = ""
        self.closed = False
        self.expiry_handle: asyncio.TimerHandle | None = None
        self.cert_identity = peer_common_name(writer.get_extra_info("ssl_object"))

    # -- lifecycle -----------------------------------------------------------------

    async def serve(self) -> None:
        self.recorder.connection_opened(self.server.label, self.id)
        try:
            await self._serve()
        except Violation as exc:
            self.close_reason = self.close_reason or f"closed by hub: {exc}"
            log.info("mqtt conn %d (%s): %s", self.id, self.identity, exc)
        except TimeoutError:  # before OSError, its base class
            self.close_reason = self.close_reason or "keep-alive expired"
        except (PeerGone, ConnectionError, asyncio.IncompleteReadError, OSError):
            self.close_reason = self.close_reason or "peer closed"
        except Exception as exc:  # a packet amqtt could not decode
            self.close_reason = self.close_reason or f"malformed packet: {exc}"
            log.info("mqtt conn %d: malformed packet: %s", self.id, exc)
        finally:
            self._cleanup()

    def close(self, reason: str, reset: bool = False) -> None:
        """Close from the hub side (kick, expiry, disconnect_all, kill)."""
        self.close_reason = self.close_reason or reason
        drop(self.writer.transport, reset)

    def _cleanup(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.expiry_handle is not None:
            self.expiry_handle.cancel()
        identity = self.identity
        if identity is not None:
            self._deactivate_all()
            if self.server.by_identity.get(identity) is self:
                del self.server.by_identity[identity]
                # A kicked connection leaves the session to the one that replaced it.
                if self.clean_session:
                    self.server.sessions.pop(identity, None)
            if not self.clean_disconnect and not self.server.stopping:
                self._publish_will()
        self.server.connections.discard(self)
        self.writer.transport.abort()
        self.recorder.connection_closed(
            self.server.label, self.id, [identity] if identity else [], self.close_reason or "closed"
        )

    # -- reading ---------------------------------------------------------------------

    async def _read(self, timeout: float | None) -> Any:
        return await asyncio.wait_for(self._read_packet(), timeout)

    async def _read_packet(self) -> Any:
        header = await MQTTFixedHeader.from_stream(self.reader)
        if header is None:
            raise PeerGone()
        if header.remaining_length > self.server.max_packet_size:
            raise Violation(f"packet of {header.remaining_length} bytes is over the limit")
        cls = packet_class(header)
        return await cls.from_stream(self.reader, fixed_header=header)

    async def _serve(self) -> None:
        try:
            first = await self._read(CONNECT_TIMEOUT)
        except TimeoutError:
            raise Violation("no CONNECT in time") from None
        if not isinstance(first, ConnectPacket):
            raise Violation("first packet is not CONNECT")
        keep_alive = self._on_connect(first)
        if keep_alive is None:
            return
        timeout = min(keep_alive * 1.5, KEEPALIVE_CAP) if keep_alive else None
        while True:
            packet = await self._read(timeout)
            ptype = packet.fixed_header.packet_type
            if ptype == PUBLISH:
                self._on_publish(packet)
            elif ptype == PUBACK:
                msg = self.inflight.pop(packet.variable_header.packet_id, None)
                if msg is not None:
                    self.state.settle_c2d(msg, "mqtt", None, "puback", self)
            elif ptype == SUBSCRIBE:
                self._on_subscribe(packet)
            elif ptype == UNSUBSCRIBE:
                self._on_unsubscribe(packet)
            elif ptype == PINGREQ:
                self._send(PingRespPacket.build())
            elif ptype == DISCONNECT:
                self.clean_disconnect = True
                self.close_reason = "DISCONNECT"
                return
            elif ptype == CONNECT:
                raise Violation("second CONNECT")
            else:
                raise Violation(f"unsupported packet type {ptype}")

    def _send(self, packet: Any) -> None:
        if not self.closed and not self.writer.transport.is_closing():
            self.writer.write(packet.to_bytes())

    # -- CONNECT -----------------------------------------------------------------------

    def _on_connect(self, packet: ConnectPacket) -> int | None:
        """Authenticate; returns the keep-alive, or None after a refusal."""
        vh, pl = packet.variable_header, packet.payload
        assert vh is not None and pl is not None
        identity = pl.client_id or ""
        method = "sas" if vh.password_flag else "x509"
        if vh.proto_name != "MQTT" or vh.proto_level != 4:
            return self._refuse(identity, method, CONNACK_BAD_PROTOCOL, "MQTT 3.1.1 only")
        if pl.client_id_is_random or not identity:
            return self._refuse(None, method, CONNACK_BAD_CLIENT_ID, "empty client id")
        if not pl.username or not username_ok(pl.username, self.state.hub_host, identity):
            return self._refuse(identity, method, CONNACK_BAD_CREDENTIALS, "bad username")
        expiry: float | None = None
        if pl.password:
            check = self.state.check_token(pl.password, self.state.resource_of(identity))
            if check.status != 200:
                return self._refuse(identity, method, CONNACK_NOT_AUTHORISED, check.description)
            expiry = self.state.token_valid_until(check.expiry)
        elif self.cert_identity != identity or identity not in self.state.devices:
            return self._refuse(identity, method, CONNACK_BAD_CREDENTIALS, "no token and no matching certificate")
        # One connection per identity: the newcomer wins.
        old = self.server.by_identity.get(identity)
        if old is not None and old is not self:
            old.close("kicked: another connection for this identity")
        self.server.by_identity[identity] = self
        self.identity = identity
        self.clean_session = vh.clean_session_flag
        if vh.will_flag and pl.will_topic is not None:
            self.will = (pl.will_topic, bytes(pl.will_message or b""), vh.will_retain_flag)
        self.recorder.add("auth", AuthRecord("mqtt", identity, method, True, "OK", self.id, 0))
        self.recorder.device_connected("mqtt", identity)
        log.info("mqtt conn %d: %s connected (%s)", self.id, identity, method)
        if self.clean_session:
            self.server.sessions.pop(identity, None)
            present = False
        else:
            present = identity in self.server.sessions
        session = self.server.sessions.setdefault(identity, {})
        self._send(ConnackPacket.build(1 if present else 0, CONNACK_ACCEPTED))
        for topic_filter, qos in list(session.items()):
            kind = classify_subscription(topic_filter, identity)
            if kind is not None:
                self._activate(kind, topic_filter, qos)
        if expiry is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, expiry - self.state.clock())
            self.expiry_handle = loop.call_later(delay, self.close, "token expired")
        return vh.keep_alive

    def _refuse(self, identity: str | None, method: str, code: int, description: str) -> None:
        self.recorder.add("auth", AuthRecord("mqtt", identity, method, False, description, self.id, code))
        log.info("mqtt conn %d: CONNECT of %r refused (%d): %s", self.id, identity, code, description)
        self._send(ConnackPacket.build(0, code))
        self.close_reason = f"CONNACK {code}: {description}"
        self.writer.transport.close()
        return None

    # -- PUBLISH from the device ----------------------------------------------------------

    def _on_publish(self, packet: PublishPacket) -> None:
        assert self.identity is not None
        qos = packet.qos or 0
        if qos > 1:
            raise Violation("PUBLISH with QoS 2")
        topic = packet.topic_name or ""
        route = classify_publish(topic, self.identity)
        if route is None:
            raise Violation(f"PUBLISH to unsupported topic {topic!r}")
        payload = bytes(packet.data or b"")
        if len(payload) > self.server.max_message_size:
            raise Violation(f"message of {len(payload)} bytes is over the limit")
        if route.kind == "d2c":
            self._record_d2c(topic, route.bag, payload, qos, packet.retain_flag)
        if qos == 1:
            self._send(_puback(packet.packet_id))
        if route.kind == "twin_get":
            doc = json.dumps(self.state.twin(self.identity).document()).encode()
            self.recorder.add("twin-request", (self.identity, "mqtt", "GET", "", 200))
            self._respond_twin(f"$iothub/twin/res/200/?$rid={route.rid}", doc)
        elif route.kind == "twin_patch":
            status, version = self.state.patch_reported(self.identity, payload)
            self.recorder.add("twin-request", (self.identity, "mqtt", "PATCH", "/properties/reported", status))
            suffix = f"&$version={version}" if status == 204 else ""
            self._respond_twin(f"$iothub/twin/res/{status}/?$rid={route.rid}{suffix}", b"")
        elif route.kind == "method_res":
            self.state.complete_method(str(route.rid), int(route.status or 0), payload)

    def _record_d2c(self, topic: str, bag: str, payload: bytes, qos: int, retain: bool, will: bool = False) -> None:
        assert self.identity is not None
        props: dict[str, Any] = dict(propbag.decode(bag))
        if retain:
            props["mqtt-retain"] = "true"
        if will:
            props["iothub-MessageType"] = "Will"
        self.recorder.add(
            "d2c",
            D2CRecord(
                device_id=self.identity,
                protocol="mqtt",
                body=payload,
                raw=payload,
                properties=props,
                topic=topic,
                qos=qos,
                retain=retain,
                app_properties={k: v for k, v in props.items() if not k.startswith("$.")},
                connection=self.id,
            ),
        )
        log.info("mqtt conn %d: D2C from %s, %d bytes%s", self.id, self.identity, len(payload), " (will)" if will else "")

    def _publish_will(self) -> None:
        if self.will is None or self.identity is None:
            return
        topic, payload, retain = self.will
        route = classify_publish(topic, self.identity)
        if route is not None and route.kind == "d2c":
            self._record_d2c(topic, route.bag, payload, 0, retain, will=True)

    def _respond_twin(self, topic: str, payload: bytes) -> None:
        sub = self.subs.get("twin_res")
        if sub is not None:
            self._publish(topic, payload, sub[1])

    def _publish(self, topic: str, payload: bytes, qos: int) -> int | None:
        pid = next(self.pids) if qos else None
        self._send(PublishPacket.build(topic, payload, pid, False, qos, False))
        return pid

    # -- subscriptions ---------------------------------------------------------------------

    def _on_subscribe(self, packet: Any) -> None:
        assert self.identity is not None
        granted: list[int] = []
        new: list[tuple[str, str, int]] = []
        for topic_filter, qos in packet.payload.topics:
            kind = classify_subscription(topic_filter, self.identity)
            if kind is None:
                raise Violation(f"SUBSCRIBE to unsupported topic {topic_filter!r}")
            if qos not in (0, 1, 2):
                raise Violation("SUBSCRIBE with an invalid QoS")
            new.append((kind, topic_filter, min(qos, 1)))
            granted.append(min(qos, 1))
        kinds = set(self.subs) | {k for k, _, _ in new}
        if len(kinds) > SUBSCRIPTION_LIMIT:
            raise Violation("more than 5 subscriptions")
        self._send(SubackPacket.build(packet.variable_header.packet_id, granted))
        session = self.server.sessions.setdefault(self.identity, {})
        for kind, topic_filter, qos in new:
            session[topic_filter] = qos
            self._activate(kind, topic_filter, qos)
        self.recorder.add("mqtt-subscribe", (self.identity, [f for _, f, _ in new]))

    def _on_unsubscribe(self, packet: Any) -> None:
        assert self.identity is not None
        session = self.server.sessions.get(self.identity, {})
        for topic_filter in packet.payload.topics:
            kind = classify_subscription(topic_filter, self.identity)
            session.pop(topic_filter, None)
            if kind is not None and kind in self.subs:
                self._deactivate(kind)
        self._send(UnsubackPacket.build(packet.variable_header.packet_id))

    def _activate(self, kind: str, topic_filter: str, qos: int) -> None:
        assert self.identity is not None
        self.subs[kind] = (topic_filter, qos)
        if kind == "c2d":
            self.state.add_c2d_consumer(self.identity, self)
        elif kind == "twin_desired":
            self.state.watch_desired(self.identity, self)
        elif kind == "methods":
            self.state.add_method_target(self.identity, self)

    def _deactivate(self, kind: str) -> None:
        assert self.identity is not None
        self.subs.pop(kind, None)
        if kind == "c2d":
            self.inflight.clear()
            self.state.remove_c2d_consumer(self.identity, self)
        elif kind == "twin_desired":
            self.state.unwatch_desired(self.identity, self)
        elif kind == "methods":
            self.state.remove_method_target(self.identity, self)

    def _deactivate_all(self) -> None:
        for kind in list(self.subs):
            self._deactivate(kind)

    # -- hub -> device ---------------------------------------------------------------------

    def offer(self, msg: C2DMessage) -> bool:
        sub = self.subs.get("c2d")
        if sub is None or self.closed:
            return False
        props = msg.properties
        bag: dict[str, Any] = {"$.mid": msg.message_id}
        for key, name in (
            ("correlation_id", "$.cid"),
            ("user_id", "$.uid"),
            ("content_type", "$.ct"),
            ("content_encoding", "$.ce"),
        ):
            if props.get(key) is not None:
                bag[name] = props[key]
        bag["$.to"] = f"/{device_prefix(msg.identity)}/messages/deviceBound"
        if "ack" in props:
            bag["iothub-ack"] = props["ack"]
        bag.update(msg.app_properties)
        topic = f"{device_prefix(msg.identity)}/messages/devicebound/{propbag.encode(bag)}"
        pid = self._publish(topic, msg.body, sub[1])
        if pid is None:
            # QoS 0: the hub completes the message once it is sent.
            asyncio.get_running_loop().call_soon(
                self.state.settle_c2d, msg, "mqtt", None, "accepted", self
            )
        else:
            self.inflight[pid] = msg
        return True

    def desired_changed(self, patch: dict[str, Any], version: int) -> None:
        sub = self.subs.get("twin_desired")
        if sub is not None:
            topic = f"$iothub/twin/PATCH/properties/desired/?$version={version}"
            self._publish(topic, json.dumps(patch).encode(), sub[1])

    def send_method(self, call: MethodCall) -> bool:
        sub = self.subs.get("methods")
        if sub is None or self.closed:
            return False
        self._publish(f"$iothub/methods/POST/{call.name}/?$rid={call.request_id}", call.payload, sub[1])
        return True


def _puback(packet_id: int) -> Any:
    from amqtt.mqtt.puback import PubackPacket

    return PubackPacket.build(packet_id)


class MqttServer:
    label = "mqtt"  # the recorder's name for this front's connections
    connection_class: type[MqttConnection] = MqttConnection

    def __init__(self, state: HubState, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.state = state
        self.max_message_size = max_message_size
        self.max_packet_size = max_message_size + 65536 + 4
        self.connections: set[MqttConnection] = set()
        self.by_identity: dict[str, MqttConnection] = {}
        self.sessions: dict[str, dict[str, int]] = {}  # identity -> {filter: qos} (clean session 0)
        self.server: asyncio.Server | None = None
        self.listener: TrackingSocket | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False

    async def start(self, host: str, port: int, ssl_context: Any) -> int:
        self.stopping = False
        self.listener = tracking_listener(host, port)
        self.server = await asyncio.start_server(self._handle, sock=self.listener, ssl=ssl_context)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connection_class(self, reader, writer)
        self.connections.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            await conn.serve()
        finally:
            if task is not None:
                self.tasks.discard(task)

    def close_all(self, graceful: bool) -> None:
        for conn in list(self.connections):
            conn.close("hub closed the connection" if graceful else "killed", reset=not graceful)

    async def stop(self) -> None:
        self.stopping = True
        if self.server is not None:
            self.server.close()
        end_handshakes(self.listener, [c.writer.transport for c in self.connections])
        self.close_all(graceful=False)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=2.0)
        if self.server is not None:
            try:
                await asyncio.wait_for(self.server.wait_closed(), 2.0)
            except TimeoutError:
                pass
            self.server = None
