"""The emulated DPS's MQTT 3.1.1 front, as the SDKs' provisioning transports use it.

CONNECT: client id = registration id, user name
``{scope}/registrations/{regId}/api-version=...&ClientVersion=...``, password =
the registration SAS token. The device subscribes to ``$dps/registrations/res/#``
and publishes ``$dps/registrations/PUT/iotdps-register/?$rid={rid}`` (JSON body
``{"registrationId": ..., "payload": ...}``) and
``$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={id}``;
answers come on ``$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]``.
Refusals: CONNACK 4 (user name is not a registration of the client id), 5 (bad
token, unknown scope); other topics close the connection, as the hub does.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl

from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.suback import SubackPacket
from amqtt.mqtt.unsuback import UnsubackPacket

from .dps import DpsAnswer, DpsRecord, DpsState, payload_of, split_registration
from .mqtt_server import (
    CONNACK_ACCEPTED,
    CONNACK_BAD_CLIENT_ID,
    CONNACK_BAD_CREDENTIALS,
    CONNACK_BAD_PROTOCOL,
    CONNACK_NOT_AUTHORISED,
    MqttConnection,
    MqttServer,
    Violation,
    _puback,
)
from .records import AuthRecord

log = logging.getLogger("gateway.hubsim.dps")

RESPONSE_FILTER = "$dps/registrations/res/#"
REGISTER_PREFIX = "$dps/registrations/PUT/iotdps-register/?"
STATUS_PREFIX = "$dps/registrations/GET/iotdps-get-operationstatus/?"


class DpsMqttConnection(MqttConnection):
    server: DpsMqttServer

    def __init__(self, server: MqttServer, reader: Any, writer: Any) -> None:
        super().__init__(server, reader, writer)
        assert isinstance(server, DpsMqttServer)
        self.dps: DpsState = server.dps
        self.registration: tuple[str, str] | None = None
        self.key: str | None = None
        self.response_qos: int | None = None  # None until subscribed

    def _on_connect(self, packet: ConnectPacket) -> int | None:
        vh, pl = packet.variable_header, packet.payload
        assert vh is not None and pl is not None
        client_id = pl.client_id or ""
        if vh.proto_name != "MQTT" or vh.proto_level != 4:
            return self._refuse_dps(client_id, CONNACK_BAD_PROTOCOL, "MQTT 3.1.1 only")
        if pl.client_id_is_random or not client_id:
            return self._refuse_dps(None, CONNACK_BAD_CLIENT_ID, "empty client id")
        reg = split_registration((pl.username or "").partition("?")[0])
        if reg is None or reg[1] != client_id:
            return self._refuse_dps(client_id, CONNACK_BAD_CREDENTIALS, "user name is not a registration")
        ok, why = self.dps.check_token(reg[0], reg[1], pl.password)
        self.dps.record(DpsRecord("dps-mqtt", reg[0], reg[1], "connect", 200 if ok else 401, self.id))
        if not ok:
            return self._refuse_dps(client_id, CONNACK_NOT_AUTHORISED, why)
        self.registration = reg
        self.key = self.dps.key_for(reg[1], str(pl.password))
        self.recorder.add("auth", AuthRecord("dps-mqtt", client_id, "sas", True, "OK", self.id, 0))
        self._send(ConnackPacket.build(0, CONNACK_ACCEPTED))
        return vh.keep_alive

    def _refuse_dps(self, client_id: str | None, code: int, description: str) -> None:
        self.recorder.add("auth", AuthRecord("dps-mqtt", client_id, "sas", False, description, self.id, code))
        log.info("dps-mqtt conn %d: CONNECT of %r refused (%d): %s", self.id, client_id, code, description)
        self._send(ConnackPacket.build(0, code))
        self.close_reason = f"CONNACK {code}: {description}"
        self.writer.transport.close()
        return None

    def _on_subscribe(self, packet: Any) -> None:
        granted = []
        for topic_filter, qos in packet.payload.topics:
            if topic_filter != RESPONSE_FILTER:
                raise Violation(f"SUBSCRIBE to unsupported topic {topic_filter!r}")
            self.response_qos = min(qos, 1)
            granted.append(self.response_qos)
        self._send(SubackPacket.build(packet.variable_header.packet_id, granted))

    def _on_unsubscribe(self, packet: Any) -> None:
        if RESPONSE_FILTER in packet.payload.topics:
            self.response_qos = None
        self._send(UnsubackPacket.build(packet.variable_header.packet_id))

    def _on_publish(self, packet: PublishPacket) -> None:
        assert self.registration is not None and self.key is not None
        qos = packet.qos or 0
        if qos > 1:
            raise Violation("PUBLISH with QoS 2")
        topic = packet.topic_name or ""
        payload = bytes(packet.data or b"")
        scope, reg_id = self.registration
        if topic.startswith(REGISTER_PREFIX):
            query = dict(parse_qsl(topic[len(REGISTER_PREFIX) :]))
            answer = self.dps.register(reg_id, self.key, payload)
            self.dps.record(
                DpsRecord("dps-mqtt", scope, reg_id, "register", answer.status, self.id,
                          answer.body.get("operationId"), payload_of(payload))
            )
        elif topic.startswith(STATUS_PREFIX):
            query = dict(parse_qsl(topic[len(STATUS_PREFIX) :]))
            op_id = query.get("operationId", "")
            answer = self.dps.operation_status(reg_id, op_id)
            self.dps.record(DpsRecord("dps-mqtt", scope, reg_id, "status", answer.status, self.id, op_id))
        else:
            raise Violation(f"PUBLISH to unsupported topic {topic!r}")
        if "$rid" not in query:
            raise Violation("request without $rid")
        if qos == 1:
            self._send(_puback(packet.packet_id))
        self._answer(query["$rid"], answer)

    def _answer(self, rid: str, answer: DpsAnswer) -> None:
        if self.response_qos is None:
            return  # not subscribed: the service's answer goes nowhere
        topic = f"$dps/registrations/res/{answer.status}/?$rid={rid}"
        if answer.retry_after is not None:
            topic += f"&retry-after={answer.retry_after}"
        pid = next(self.pids) if self.response_qos else None
        self._send(PublishPacket.build(topic, answer.encoded(), pid, False, self.response_qos, False))


class DpsMqttServer(MqttServer):
    label = "dps-mqtt"
    connection_class = DpsMqttConnection

    def __init__(self, dps: DpsState) -> None:
        super().__init__(_StateShim(dps))  # type: ignore[arg-type]
        self.dps = dps


class _StateShim:
    """What MqttConnection reads from the hub state."""

    def __init__(self, dps: DpsState) -> None:
        self.recorder = dps.recorder
        self.clock = dps.clock
        self.devices: dict[str, str] = {}
