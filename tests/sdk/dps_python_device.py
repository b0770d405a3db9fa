"""A device on the Python SDK (azure-iot-device): provision over MQTT, then send telemetry.

Run by tests/sdk in the SDK virtual environment: ``python dps_python_device.py SPEC``,
SPEC a JSON object: "provisioning_host" (the gateway's address: the SDK dials
port 8883 there), "id_scope", "registration_id", "key" (the device's symmetric
key), "ca_file", "payload" (optional custom allocation data), "gateway" (the
gateway's address for the hub connection) and "messages" (bodies, UTF-8).

Prints ``registered`` with the registration result, ``sent`` per message, then
``done``; a failure prints ``error``.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

from azure.iot.device import IoTHubDeviceClient, Message, ProvisioningDeviceClient


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main(spec: dict[str, Any]) -> None:
    with open(spec["ca_file"], encoding="ascii") as f:
        ca = f.read()
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=spec["provisioning_host"],
        registration_id=spec["registration_id"],
        id_scope=spec["id_scope"],
        symmetric_key=spec["key"],
        server_verification_cert=ca,
    )
    if spec.get("payload") is not None:
        client.provisioning_payload = spec["payload"]
    result = client.register()
    state = result.registration_state
    emit("registered", status=result.status, assigned_hub=state.assigned_hub,
         device_id=state.device_id, payload=state.response_payload)  # fmt: skip
    if result.status != "assigned":
        raise RuntimeError(f"registration ended {result.status}")
    hub = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=spec["key"],
        hostname=state.assigned_hub,
        device_id=state.device_id,
        server_verification_cert=ca,
        gateway_hostname=spec["gateway"],
    )
    hub.connect()
    try:
        for index, body in enumerate(spec.get("messages", [])):
            msg = Message(body)
            msg.message_id = f"{spec['registration_id']}-{index}"
            hub.send_message(msg)
            emit("sent", index=index)
    finally:
        hub.shutdown()
    emit("done")


if __name__ == "__main__":
    try:
        main(json.loads(sys.argv[1]))
    except Exception as exc:  # reported to the test, which fails with the transcript
        emit("error", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        sys.exit(1)
