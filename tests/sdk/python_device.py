"""A device (or module) on the Azure IoT Python device SDK (azure-iot-device, MQTT).

Run by tests/sdk in the SDK virtual environment: ``python python_device.py SPEC``,
SPEC a JSON object (see `harness.SdkStack.device_spec`) plus:

- ``d2c``: [{body (base64), messageId, correlationId, contentType, contentEncoding, app}]
- ``c2d``: how many cloud-to-device messages to receive (MQTT: the SDK completes each)
- ``twin``: {reported: {...}, desired_key: "k"}: get the twin, patch reported, wait for
  the desired patch that sets desired_key
- ``method``: answer one direct method call of this name (200, echoes the payload)

Prints one JSON line per step (open, sent, c2d, c2d-done, twin, reported, twin-ready,
desired, method-ready, method, settled, done; "error" on failure) and waits for
``{"command": "close"}`` on stdin before disconnecting.
"""

from __future__ import annotations

import base64
import json
import queue
import sys
import threading
import traceback
from typing import Any

from azure.iot.device import IoTHubDeviceClient, IoTHubModuleClient, Message, MethodResponse

STEP = 90.0  # fail-safe bound for one wait (the test has its own)
_out = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    with _out:
        print(json.dumps({"event": event, **fields}), flush=True)


def wait_close() -> None:
    for line in sys.stdin:
        if json.loads(line).get("command") == "close":
            return


def run(spec: dict[str, Any]) -> None:
    with open(spec["ca_file"], encoding="utf-8") as f:
        ca = f.read()
    factory = IoTHubModuleClient if spec.get("module_id") else IoTHubDeviceClient
    client = factory.create_from_connection_string(
        spec["connection_string"], server_verification_cert=ca
    )
    c2d: queue.Queue[Message] = queue.Queue()
    desired: queue.Queue[dict[str, Any]] = queue.Queue()
    methods: queue.Queue[Any] = queue.Queue()
    if spec.get("c2d"):
        # A module's handler subscribes to its inputs/# instead, which only IoT Edge serves.
        client.on_message_received = c2d.put
    client.on_twin_desired_properties_patch_received = desired.put
    client.on_method_request_received = methods.put
    client.connect()
    emit("open")
    try:
        for index, m in enumerate(spec.get("d2c") or []):
            msg = Message(
                base64.b64decode(m["body"]),
                message_id=m.get("messageId"),
                content_encoding=m.get("contentEncoding"),
                content_type=m.get("contentType"),
            )
            if m.get("correlationId"):
                msg.correlation_id = m["correlationId"]
            msg.custom_properties = dict(m.get("app") or {})
            client.send_message(msg)  # returns once the hub's PUBACK is back
            emit("sent", index=index)

        for _ in range(spec.get("c2d") or 0):
            msg = c2d.get(timeout=STEP)
            data = msg.data if isinstance(msg.data, bytes) else str(msg.data).encode()
            emit("c2d", messageId=msg.message_id, action="complete",
                 body=base64.b64encode(data).decode(), correlationId=msg.correlation_id,
                 contentType=msg.content_type, app=dict(msg.custom_properties))  # fmt: skip
        if spec.get("c2d"):
            emit("c2d-done")

        twin_spec = spec.get("twin")
        if twin_spec:
            twin = client.get_twin()
            emit("twin", desired=twin.get("desired"), reported=twin.get("reported"))
            client.patch_twin_reported_properties(twin_spec["reported"])
            emit("reported")
            emit("twin-ready")
            while True:
                patch = desired.get(timeout=STEP)
                if twin_spec["desired_key"] in patch:
                    break
            emit("desired", patch=patch)

        if spec.get("method"):
            emit("method-ready")
            request = methods.get(timeout=STEP)
            payload = {"echo": request.payload, "method": request.name}
            client.send_method_response(MethodResponse.create_from_method_request(request, 200, payload))
            emit("method", payload=request.payload, requestId=request.request_id)

        emit("settled")
        wait_close()
    finally:
        client.shutdown()


def main() -> int:
    spec = json.loads(sys.argv[1])
    try:
        run(spec)
    except Exception as exc:  # the test prints it with the traceback
        emit("error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return 1
    emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
