"""Store-and-forward with uamqp (uamqp-c, the Azure IoT C SDK's AMQP stack) as the
device: it logs in with SASL ANONYMOUS over TLS and does no CBS (the gateway holds its
key and it opted in). With hubsim stopped its messages are accepted once stored; when
hubsim is back they arrive exactly as uamqp encoded them, in order.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from gateway.hubsim import HubSim
from tests.acceptance.gateway_proc import GatewayProcess, start_gateway, write_config

from .harness import (
    AMQPS_PORT,
    HUB_HOST,
    SDK_DIR,
    DeviceProcess,
    SdkStack,
    new_key,
    random_loopback,
)

IDENTITY = "uamqp-sf"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[SdkStack]:
    keys = {IDENTITY: new_key()}
    ca = trustme.CA(organization_name="iot-gateway SDK tests")
    ca_file = tmp_path / "device-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    hub = HubSim(keys, hub_host=HUB_HOST, mqtt_port=None).start()
    secrets = tmp_path / "secrets.yaml"
    fd = os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"sf-key: {keys[IDENTITY]}\n")
    gw: GatewayProcess | None = None
    try:
        address = random_loopback()
        leaf = ca.issue_cert(address, "gateway.sdk.test")
        cert, key = tmp_path / "gw.pem", tmp_path / "gw.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        config = write_config(tmp_path, f"""\
gateway: {{id: sdk-gw, drain_timeout: 2s}}
admin: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: text}}
tls_profiles:
  hub: {{ca_file: "{hub.ca_file}", server_name: {HUB_HOST}}}
  devices: {{cert_file: "{cert}", key_file: "{key}"}}
listeners:
  - {{name: amqps, protocol: amqp, bind: "{address}:{AMQPS_PORT}", tls_profile: devices}}
connectors:
  - {{name: iothub, protocol: amqp, host: 127.0.0.1, port: {hub.amqp_port}, tls_profile: hub,
      reconnect: {{initial: 0.2s, max: 1s}}}}
link_routes:
  - {{prefix: "$cbs", connector: iothub}}
  - {{prefix: "devices/", connector: iothub}}
store_and_forward:
  path: {tmp_path / "store.db"}
credentials:
  secrets_file: {secrets}
  devices:
    - {{id: {IDENTITY}, key: sf-key, trust: network, store_and_forward: true}}
""")
        hub.stop()
        gw = start_gateway(config, listeners=("amqps",), timeout=60)
        yield SdkStack(hub, gw, address, ca_file, keys)
    finally:
        if gw is not None:
            gw.stop()
        hub.close()


def test_uamqp_device_stores_offline_and_replays(sdk_py: Path, stack: SdkStack) -> None:
    bodies = [b"\x00\x01binary\xff", "grüße".encode(), os.urandom(30000)]
    messages = [
        {"body": base64.b64encode(body).decode(), "properties": {"message_id": f"sf-{i}"},
         "app": {"seq": str(i)}}  # fmt: skip
        for i, body in enumerate(bodies)
    ]
    device = DeviceProcess.start(
        [str(sdk_py), str(SDK_DIR / "uamqp_device.py")],
        stack.device_spec(IDENTITY, scenario="d2c-anonymous", messages=messages),
        name=f"uamqp {IDENTITY}",
    )
    try:
        sent = [device.expect("sent") for _ in messages]
        device.finish()
    finally:
        device.close()
    # Accepted by the gateway once stored: the hub has seen nothing yet.
    assert [out["state"] for out in sent] == ["MessageState.SendComplete"] * len(messages)
    assert stack.hub.recorder.d2c_for(IDENTITY) == []
    stack.hub.start()
    stack.hub.recorder.wait_for(lambda: len(stack.hub.recorder.d2c_for(IDENTITY)) >= len(messages),
                                timeout=60)  # fmt: skip
    records = stack.hub.recorder.d2c_for(IDENTITY)
    assert [r.raw for r in records] == [base64.b64decode(out["encoded"]) for out in sent]
    assert [r.body for r in records] == bodies
    assert [r.properties["message-id"] for r in records] == ["sf-0", "sf-1", "sf-2"]
