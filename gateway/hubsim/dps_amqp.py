"""The emulated DPS's AMQP 1.0 front, as the SDKs' provisioning transports use it.

SASL PLAIN with user ``{scope}/registrations/{regId}`` and the registration SAS
token as password (the C SDK's ``prov_transport_amqp_common.c`` and the Node
``azure-iot-provisioning-device-amqp`` transport both log in this way); then a
receiver and a sender on ``{scope}/registrations/{regId}`` (the C SDK prefixes
``amqps://{host}/``). Requests carry the application property
``iotdps-operation-type`` (``iotdps-register`` or ``iotdps-get-operationstatus``
with ``iotdps-operation-id``); each answer goes back on the sender with the
request's correlation-id, a JSON data section, and ``retry-after`` (seconds)
when the device should poll again.
"""

from __future__ import annotations

import logging
from collections import deque

from proton import Condition, Delivery, Link, Message, Receiver, Sender, Terminus, int32

from .amqp_frames import SaslResult
from .amqp_server import CREDIT_WINDOW, AmqpConnection, AmqpServer, body_bytes, split_address
from .dps import DpsRecord, DpsState, payload_of, split_registration
from .records import AuthRecord, LinkRecord

log = logging.getLogger("gateway.hubsim.dps")

OP_TYPE = "iotdps-operation-type"
OP_ID = "iotdps-operation-id"
REGISTER = "iotdps-register"
GET_STATUS = "iotdps-get-operationstatus"


class DpsAmqpConnection(AmqpConnection):
    sasl_mechanisms = ["PLAIN"]
    server: DpsAmqpServer

    def __init__(self, server: AmqpServer) -> None:
        super().__init__(server)
        assert isinstance(server, DpsAmqpServer)
        self.dps: DpsState = server.dps
        self.registration: tuple[str, str] | None = None  # (scope, regId) proved in SASL
        self.key: str | None = None
        self.reply_link: Sender | None = None

    def _authenticate(self, mech: str, response: bytes | None, hostname: str | None) -> SaslResult:
        parts = (response or b"").split(b"\x00")
        if mech != "PLAIN" or len(parts) != 3:
            return SaslResult(mech, False, description="PLAIN with a registration token expected")
        user, token = parts[1].decode(errors="replace"), parts[2].decode(errors="replace")
        reg = split_registration(user)
        if reg is None or user.strip("/").count("/") != 2:
            return SaslResult(mech, False, description=f"user {user!r} is not SCOPE/registrations/ID")
        ok, why = self.dps.check_token(reg[0], reg[1], token)
        self.dps.record(DpsRecord("dps-amqp", reg[0], reg[1], "connect", 200 if ok else 401, self.id))
        if not ok:
            return SaslResult(mech, False, reg[1], why)
        self.registration = reg
        self.key = self.dps.key_for(reg[1], token)
        # No identity for the base class: a registration is not a hub device identity.
        return SaslResult(mech, True, None, "OK")

    def _record_auth(self, result: SaslResult) -> None:
        self.recorder.add(
            "auth",
            AuthRecord("dps-amqp", result.identity, result.mechanism, result.ok, result.description, self.id),
        )

    def _on_attach(self, link: Link) -> None:
        role = "receiver" if link.is_receiver else "sender"
        address = link.remote_target.address if link.is_receiver else link.remote_source.address
        segments = split_address(address) or []
        reg = split_registration("/".join(segments)) if len(segments) == 3 else None
        if self.registration is None or reg != self.registration:
            self._refuse_dps(link, address, role, "amqp:not-found", f"no registration node {address!r}")
            return
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        link.hub_kind = "dps"
        link.hub_identity = reg[1]
        link.open()
        properties = dict(link.remote_properties or {})
        self.recorder.add("link", LinkRecord(self.id, address, role, link.name, reg[1], True, None, properties))
        if isinstance(link, Receiver):
            link.flow(CREDIT_WINDOW)
        elif isinstance(link, Sender):
            self.outq[link] = deque()
            self.reply_link = link

    def _refuse_dps(self, link: Link, address: str | None, role: str, condition: str, description: str) -> None:
        if link.is_receiver:
            link.source.copy(link.remote_source)
            link.target.type = Terminus.UNSPECIFIED
        else:
            link.source.type = Terminus.UNSPECIFIED
            link.target.copy(link.remote_target)
        link.open()
        link.condition = Condition(condition, description)
        link.close()
        self.recorder.add("link", LinkRecord(self.id, address, role, link.name, None, False, condition))
        log.info("dps-amqp conn %d: attach %r refused: %s", self.id, address, condition)

    def _on_node_transfer(self, delivery: Delivery, link: Link, msg: Message) -> None:
        if getattr(link, "hub_kind", None) != "dps" or self.registration is None or self.key is None:
            super()._on_node_transfer(delivery, link, msg)
            return
        app = dict(msg.properties or {})
        operation = app.get(OP_TYPE)
        scope, reg_id = self.registration
        if operation == REGISTER:
            answer = self.dps.register(reg_id, self.key, body_bytes(msg))
            op_id = answer.body.get("operationId")
            self.dps.record(DpsRecord("dps-amqp", scope, reg_id, "register", answer.status, self.id, op_id,
                                      payload_of(body_bytes(msg))))
        elif operation == GET_STATUS:
            op_id = str(app.get(OP_ID, ""))
            answer = self.dps.operation_status(reg_id, op_id)
            self.dps.record(DpsRecord("dps-amqp", scope, reg_id, "status", answer.status, self.id, op_id))
        else:
            self._settle(
                delivery, Delivery.REJECTED,
                Condition("amqp:not-implemented", f"unknown {OP_TYPE} {operation!r}"),
            )
            return
        self._settle(delivery, Delivery.ACCEPTED)
        props: dict[str, object] = {OP_TYPE: operation}
        if answer.retry_after is not None:
            props["retry-after"] = int32(answer.retry_after)
        reply = Message(correlation_id=msg.correlation_id, properties=props, body=answer.encoded())
        reply.inferred = True
        if self.reply_link is not None:
            self.send_response(self.reply_link, reply)


class DpsAmqpServer(AmqpServer):
    label = "dps-amqp"
    connection_class = DpsAmqpConnection

    def __init__(self, dps: DpsState, container_id: str) -> None:
        # The hub state is not served here; the base class only needs its recorder.
        super().__init__(_RecorderOnly(dps), container_id)  # type: ignore[arg-type]
        self.dps = dps


class _RecorderOnly:
    """What AmqpConnection reads from the hub state (recorder, clock, registry)."""

    def __init__(self, dps: DpsState) -> None:
        self.recorder = dps.recorder
        self.clock = dps.clock
        self.devices: dict[str, str] = {}
