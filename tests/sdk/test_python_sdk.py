"""The Azure IoT Python device SDK (azure-iot-device, MQTT) through the gateway.

Connection string with GatewayHostName (the gateway's MQTT TLS listener on 8883 of
a loopback address of the test's own; the SDK is given the test CA as
server_verification_cert), D2C with properties, C2D (MQTT: completed by PUBACK),
twin get / reported patch / desired patch and a direct method, as a device and
as a module. Asserted at the hub.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import (
    SDK_DIR,
    DeviceProcess,
    SdkStack,
    start_stack,
    wait_desired_watch,
    wait_methods_ready,
)
from .test_node import assert_d2c_at_hub, d2c_messages, invoke

IDENTITIES = ["py-dev", "py-host/mod"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdkStack]:
    yield from start_stack(tmp_path_factory.mktemp("sdk-python"), IDENTITIES)


@pytest.mark.parametrize("identity", IDENTITIES, ids=["device", "module"])
def test_mqtt_d2c_c2d_twin_method(sdk_py: Path, stack: SdkStack, identity: str) -> None:
    hub = stack.hub
    module = "/" in identity
    c2d = {}
    if not module:  # IoT Hub has no cloud-to-device messages for modules
        for i in range(3):
            body = f"c2d {i} \x00\xff".encode("latin-1")
            mid = hub.send_c2d(identity, body, properties={"message_id": f"py-{i}",
                               "correlation_id": f"corr-{i}", "content_type": "text/plain"},
                               app_properties={"k": f"v{i}"})  # fmt: skip
            c2d[mid] = body
    sent = d2c_messages(identity.replace("/", "-"))
    device = DeviceProcess.start(
        [str(sdk_py), str(SDK_DIR / "python_device.py")],
        stack.device_spec(identity, d2c=sent, c2d=len(c2d), method="restart",
                          twin={"reported": {"sdk": "python", "n": [1, 2]}, "desired_key": "rate"}),
        name=f"python-sdk {identity}",
    )  # fmt: skip
    try:
        with device.failing_with_transcript():
            device.expect("open")
            for _ in sent:
                device.expect("sent")
            got = [device.expect("c2d") for _ in c2d]
            device.expect("twin")
            device.expect("reported")
            device.expect("twin-ready")
            wait_desired_watch(hub, identity, "mqtt")
            hub.update_desired(identity, {"rate": 7})
            desired = device.expect("desired")
            device.expect("method-ready")
            wait_methods_ready(hub, identity, "mqtt")
            status, response = invoke(stack, identity, "restart", {"force": True})
            device.expect("method")
            device.expect("settled")
            device.send({"command": "close"})
            device.finish()
    finally:
        device.close()

    assert_d2c_at_hub(stack, identity, "mqtt", sent)
    for g in got:
        i = g["messageId"].split("-")[1]
        assert base64.b64decode(g["body"]) == c2d[g["messageId"]]
        assert g["app"] == {"k": f"v{i}"}
        assert (g["correlationId"], g["contentType"]) == (f"corr-{i}", "text/plain")
    feedback = sorted((f.message_id, f.status) for f in hub.recorder.feedback if f.device_id == identity)
    assert feedback == [(mid, "Success") for mid in sorted(c2d)]
    reported = hub.twin(identity)["reported"]
    assert reported["sdk"] == "python" and reported["n"] == [1, 2]
    assert desired["patch"]["rate"] == 7
    assert status == 200
    assert json.loads(response) == {"echo": {"force": True}, "method": "restart"}
