"""A device on uamqp (PyPI), i.e. uamqp-c, the Azure IoT C SDK's AMQP stack, provisioning as
the C SDK's provisioning AMQP transport does, then sending telemetry to the assigned hub.

Run by tests/sdk in the SDK virtual environment: ``python dps_uamqp_device.py SPEC``,
SPEC as for dps_python_device.py. Provisioning: SASL PLAIN as
``{idScope}/registrations/{regId}`` with the registration SAS token (``skn=registration``),
one connection with a receiver ("recv_link", receiver settle mode first) and a sender
("sender_link") on ``amqps://{host}/{idScope}/registrations/{regId}``, link property
``com.microsoft:api-version``; requests carry ``iotdps-operation-type`` (and
``iotdps-operation-id`` when polling) and a JSON body. Then D2C with a CBS token
(uamqp.SendClient). Prints ``registered``, ``sent`` per message, ``done``; or ``error``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
import time
import traceback
from typing import Any
from urllib.parse import quote_plus

import uamqp
from uamqp import Connection, Session, authentication, constants
from uamqp.address import Source, Target
from uamqp.receiver import MessageReceiver
from uamqp.sender import MessageSender
from uamqp.types import AMQPSymbol

API_VERSION = "2019-03-31"
STEP = 60.0


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def sas_token(resource: str, key_b64: str, skn: str | None = None) -> str:
    expiry = int(time.time()) + 3600
    sr = quote_plus(resource)
    mac = hmac.new(base64.b64decode(key_b64), f"{sr}\n{expiry}".encode(), hashlib.sha256)
    token = f"SharedAccessSignature sr={sr}&sig={quote_plus(base64.b64encode(mac.digest()).decode())}&se={expiry}"
    return token + (f"&skn={skn}" if skn else "")


def provision(spec: dict[str, Any]) -> dict[str, Any]:
    host, scope, reg = spec["provisioning_host"], spec["id_scope"], spec["registration_id"]
    user = f"{scope}/registrations/{reg}"
    auth = authentication.SASLPlain(host, user, sas_token(user, spec["key"], "registration"),
                                    port=5671, verify=spec["ca_file"])  # fmt: skip
    conn = Connection(host, auth, container_id=f"prov-{reg}")
    session = Session(conn)
    address = f"amqps://{host}/{user}"
    props = {AMQPSymbol("com.microsoft:api-version"): API_VERSION}
    answers: list[dict[str, Any]] = []

    def on_message(message: Any) -> None:
        answers.append(json.loads(b"".join(message.get_data())))

    receiver = MessageReceiver(session, Source(address), "recv_target", on_message, name="recv_link",
                               receive_settle_mode=constants.ReceiverSettleMode.ReceiveAndDelete,
                               properties=props)  # fmt: skip
    sender = MessageSender(session, "sender_source", Target(address), name="sender_link",
                           properties=props)  # fmt: skip
    outcomes: list[Any] = []
    try:
        receiver.open()
        sender.open()

        def pump(until: Any, what: str) -> None:
            deadline = time.monotonic() + STEP
            while not until():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {what}")
                conn.work()
                time.sleep(0.005)  # work() does not block: pace the service loop

        def request(app: dict[str, Any], body: bytes) -> dict[str, Any]:
            before = len(answers)
            message = uamqp.Message(body=body, application_properties=app)
            sender.send(message, lambda msg, result, error: outcomes.append(result))
            pump(lambda: len(answers) > before, "answer from the provisioning service")
            return answers[-1]

        pump(lambda: sender.get_state() == constants.MessageSenderState.Open, "open sender")
        body = json.dumps({"registrationId": reg, "payload": spec.get("payload")}).encode()
        answer = request({"iotdps-operation-type": "iotdps-register"}, body)
        for _ in range(20):
            if answer.get("status") != "assigning":
                break
            answer = request({"iotdps-operation-type": "iotdps-get-operationstatus",
                              "iotdps-operation-id": answer["operationId"]}, body)  # fmt: skip
        return answer
    finally:
        sender.close()
        receiver.close()
        session.destroy()
        conn.destroy()


def send(spec: dict[str, Any], hub: str, device: str) -> None:
    resource = f"{hub}/devices/{device}"
    auth = authentication.SASTokenAuth(
        audience=resource, uri=f"amqps://{resource}", token=sas_token(resource, spec["key"]),
        expires_in=None, expires_at=time.time() + 3600, port=5671, verify=spec["ca_file"],
        custom_endpoint_hostname=spec["gateway"],
    )  # fmt: skip
    client = uamqp.SendClient(f"amqps://{resource}/messages/events", auth=auth, msg_timeout=60000)
    try:
        for index, body in enumerate(spec.get("messages", [])):
            client.send_message(uamqp.Message(body=body.encode()))
            emit("sent", index=index)
    finally:
        client.close()


def main() -> int:
    spec = json.loads(sys.argv[1])
    try:
        answer = provision(spec)
        state = answer.get("registrationState") or {}
        emit("registered", status=answer.get("status"), assigned_hub=state.get("assignedHub"),
             device_id=state.get("deviceId"))  # fmt: skip
        if answer.get("status") != "assigned":
            raise RuntimeError(f"registration ended {answer}")
        send(spec, state["assignedHub"], state["deviceId"])
    except Exception as exc:  # the test prints it with the traceback
        emit("error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return 1
    emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
