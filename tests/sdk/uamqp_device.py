"""A device on uamqp (PyPI), the Python binding of uamqp-c, the Azure IoT C SDK's AMQP stack.

Run by tests/sdk in the SDK virtual environment: ``python uamqp_device.py SPEC``,
SPEC a JSON object (see `harness.SdkStack.device_spec`) with "scenario":

- ``d2c``: CBS put-token with a SAS token (SASL MSSBCBS, uamqp's choice for
  token auth), then send "messages" ([{body (base64), properties, app}]);
  prints ``sent`` per message with the message as uamqp encoded it and the
  hub's outcome.
- ``d2c-anonymous``: as ``d2c``, but SASL ANONYMOUS and no CBS: a device that
  relies on the gateway for its hub token (``credentials:``).
- ``c2d``: receive "count" cloud-to-device deliveries and settle each as its
  message-id says (``accept-*``, ``reject-*``, ``release-*``: a released one
  is accepted when it comes back); prints ``ready`` once the link is up, then
  ``c2d`` per delivery, ``settled`` when all are, and waits for the test's
  ``{"command": "close"}`` on stdin.

Ends with ``done``; a failure prints ``error``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
import threading
import time
import traceback
from typing import Any
from urllib.parse import quote_plus

import uamqp
from uamqp import authentication
from uamqp.message import MessageProperties


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def sas_token(resource: str, key_b64: str, ttl: int = 3600) -> str:
    expiry = int(time.time()) + ttl
    sr = quote_plus(resource)
    mac = hmac.new(base64.b64decode(key_b64), f"{sr}\n{expiry}".encode(), hashlib.sha256)
    sig = quote_plus(base64.b64encode(mac.digest()).decode())
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}"


def text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


_commands: list[str] = []


def _read_commands() -> None:
    for line in sys.stdin:
        _commands.append(line.strip())


def commands_closed() -> bool:
    return any('"close"' in c for c in _commands) or sys.stdin.closed


def auth_for(spec: dict[str, Any]) -> authentication.SASTokenAuth:
    resource = f"{spec['hub_host']}/devices/{spec['device_id']}"
    # The URI names the hub (the token's audience); the TCP endpoint is the gateway.
    return authentication.SASTokenAuth(
        audience=resource,
        uri=f"amqps://{resource}",
        token=sas_token(resource, spec["key"]),
        expires_in=None,
        expires_at=time.time() + 3600,
        port=spec.get("port", 5671),
        verify=spec["ca_file"],
        custom_endpoint_hostname=spec["gateway"],
    )


def d2c(spec: dict[str, Any], auth: Any = None) -> None:
    target = f"amqps://{spec['hub_host']}/devices/{spec['device_id']}/messages/events"
    client = uamqp.SendClient(target, auth=auth or auth_for(spec), msg_timeout=60000)
    try:
        for index, m in enumerate(spec["messages"]):
            props = m.get("properties") or {}
            message = uamqp.Message(
                body=base64.b64decode(m["body"]),
                properties=MessageProperties(
                    message_id=props.get("message_id"),
                    correlation_id=props.get("correlation_id"),
                    content_type=props.get("content_type"),
                    content_encoding=props.get("content_encoding"),
                ),
                application_properties=m.get("app") or None,
            )
            encoded = message.encode_message()
            results = client.send_message(message)
            emit("sent", index=index, encoded=base64.b64encode(encoded).decode(),
                 state=str(message.state), results=str(results))
    finally:
        client.close()


def d2c_anonymous(spec: dict[str, Any]) -> None:
    d2c(spec, authentication.SASLAnonymous(spec["gateway"], port=spec.get("port", 5671),
                                           verify=spec["ca_file"]))  # fmt: skip


def c2d(spec: dict[str, Any]) -> None:
    source = f"amqps://{spec['hub_host']}/devices/{spec['device_id']}/messages/devicebound"
    client = uamqp.ReceiveClient(source, auth=auth_for(spec), auto_complete=False, prefetch=10)
    try:
        client.open()
        while not client.client_ready():
            client.do_work()
        emit("ready")
        settled = 0
        while settled < spec["count"]:
            for message in client.receive_message_batch(max_batch_size=10, timeout=1000):
                props = message.properties
                message_id = text(props.message_id)
                count = message.header.delivery_count if message.header else 0
                if message_id.startswith("accept") or (message_id.startswith("release") and count):
                    action = "accept"
                    message.accept()
                elif message_id.startswith("reject"):
                    action = "reject"
                    message.reject()
                else:
                    action = "release"
                    message.release()
                settled += action != "release"
                emit("c2d", message_id=message_id, action=action, delivery_count=count,
                     body=base64.b64encode(b"".join(message.get_data())).decode(),
                     app={text(k): text(v) for k, v in (message.application_properties or {}).items()},
                     correlation_id=text(props.correlation_id),
                     content_type=text(props.content_type))  # fmt: skip
        emit("settled")
        # Keep the connection serviced until the test has seen the hub's record of
        # every disposition and says "close".
        while not commands_closed():
            client.do_work()
            time.sleep(0.01)  # do_work does not block: pace the service loop
    finally:
        client.close()


def main() -> int:
    spec = json.loads(sys.argv[1])
    threading.Thread(target=_read_commands, daemon=True).start()
    try:
        {"d2c": d2c, "d2c-anonymous": d2c_anonymous, "c2d": c2d}[spec["scenario"]](spec)
    except Exception as exc:  # the test prints it with the traceback
        emit("error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return 1
    emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
