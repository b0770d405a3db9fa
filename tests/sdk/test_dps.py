"""The SDKs' own provisioning clients through the gateway, then telemetry to the assigned hub.

Python ``ProvisioningDeviceClient`` (MQTT) and the Node ``azure-iot-provisioning-device``
client with its AMQP and its MQTT transport provision with hubsim's Device
Provisioning Service through the gateway (DPS scope routed by `mqtt_routes[].username`
and by a link route to a `sasl: relay` connector), then connect to the hub DPS
assigned them, through the gateway too, and send telemetry. hubsim's recorder
says what the provisioning service and the hub received. Keys are derived from
an enrollment group key here, as DPS derives them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from gateway.hubsim import HubSim
from tests.acceptance.gateway_proc import GatewayProcess, start_gateway, write_config

from .harness import (
    AMQPS_PORT,
    HUB_HOST,
    MQTTS_PORT,
    NODE_DIR,
    SDK_DIR,
    DeviceProcess,
    new_key,
    random_loopback,
)

SCOPE = "0ne00SDK0D"
DPS_HOST = "global.azure-devices-provisioning.net"
BODIES = ["first reading", "zweite Messung: 21,5 °C", "x" * 3000]


def derive(group_key: str, registration_id: str) -> str:
    digest = hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


@dataclass
class DpsStack:
    hub: HubSim
    gateway: GatewayProcess
    address: str
    ca_file: Path
    group_key: str

    def spec(self, registration_id: str, **extra: Any) -> dict[str, Any]:
        return {
            "provisioning_host": self.address,
            "gateway": self.address,
            "id_scope": SCOPE,
            "registration_id": registration_id,
            "key": derive(self.group_key, registration_id),
            "ca_file": str(self.ca_file),
            "payload": {"site": "lab", "n": 7},
            "messages": BODIES,
            **extra,
        }


def gateway_yaml(hub: HubSim, address: str, cert: Path, key: Path) -> str:
    return f"""\
gateway: {{id: sdk-dps-gw, drain_timeout: 2s}}
admin: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: text}}
tls_profiles:
  hub: {{ca_file: "{hub.ca_file}", server_name: {HUB_HOST}}}
  dps: {{ca_file: "{hub.ca_file}", server_name: {DPS_HOST}}}
  devices: {{cert_file: "{cert}", key_file: "{key}"}}
listeners:
  - {{name: amqps, protocol: amqp, bind: "{address}:{AMQPS_PORT}", tls_profile: devices}}
  - {{name: mqtts, protocol: mqtt, bind: "{address}:{MQTTS_PORT}", tls_profile: devices}}
connectors:
  - {{name: iothub, protocol: amqp, host: 127.0.0.1, port: {hub.amqp_port}, tls_profile: hub}}
  - {{name: iothub-mqtt, protocol: mqtt, host: 127.0.0.1, port: {hub.mqtt_port}, tls_profile: hub}}
  - {{name: dps, protocol: amqp, host: 127.0.0.1, port: {hub.dps_amqp_port}, tls_profile: dps, sasl: relay}}
  - {{name: dps-mqtt, protocol: mqtt, host: 127.0.0.1, port: {hub.dps_mqtt_port}, tls_profile: dps}}
link_routes:
  - {{prefix: "$cbs", connector: iothub}}
  - {{prefix: "devices/", connector: iothub}}
  - {{pattern: "{SCOPE}/registrations/*", connector: dps}}
mqtt_routes:
  - {{username: "{SCOPE}/registrations/*", connector: dps-mqtt}}
  - {{hub: "*", connector: iothub-mqtt}}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DpsStack]:
    tmp = tmp_path_factory.mktemp("sdk-dps")
    group_key = new_key()
    ca = trustme.CA(organization_name="iot-gateway SDK DPS tests")
    ca_file = tmp / "device-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    # retry-after 1 s: the SDKs' own pace between polls (the Python SDK's minimum).
    hub = HubSim({}, hub_host=HUB_HOST, dps_scope=SCOPE, dps_group_keys={"fleet": group_key},
                 dps_retry_after=1).start()  # fmt: skip
    gw: GatewayProcess | None = None
    try:
        for attempt in range(5):  # another run may hold an address's ports: take a fresh one
            address = random_loopback()
            leaf = ca.issue_cert(address)
            cert, key = tmp / f"gw-{attempt}.pem", tmp / f"gw-{attempt}.key"
            cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            leaf.private_key_pem.write_to_path(str(key))
            config = write_config(tmp, gateway_yaml(hub, address, cert, key), f"gw-{attempt}.yaml")
            try:
                gw = start_gateway(config, listeners=("amqps", "mqtts"), timeout=60)
                break
            except RuntimeError as exc:
                if "address already in use" not in str(exc).lower() or attempt == 4:
                    raise
        assert gw is not None
        yield DpsStack(hub, gw, address, ca_file, group_key)
    finally:
        if gw is not None:
            gw.stop()
        hub.close()


def check_hub_side(stack: DpsStack, registration_id: str, protocol: str) -> None:
    rec = stack.hub.recorder
    steps = [(r.protocol, r.operation, r.status) for r in rec.dps if r.registration_id == registration_id]
    assert steps[0] == (protocol, "connect", 200)
    assert (protocol, "register", 202) in steps and steps[-1] == (protocol, "status", 200)
    register = next(r for r in rec.dps if r.registration_id == registration_id and r.operation == "register")
    assert register.payload == {"site": "lab", "n": 7}  # the custom payload crossed intact
    # Every message reached the assigned hub intact, in order.
    received = stack.hub.recorder.d2c_for(registration_id)
    assert [r.body.decode() for r in received] == BODIES
    assert stack.hub.state.devices[registration_id] == derive(stack.group_key, registration_id)


def run_device(device: DeviceProcess, count: int) -> dict[str, Any]:
    try:
        registered = device.expect("registered")
        for _ in range(count):
            device.expect("sent")
        device.finish()
    finally:
        device.close()
    return registered


def test_python_sdk_provisions_over_mqtt_then_sends(sdk_py: Path, stack: DpsStack) -> None:
    device = DeviceProcess.start(
        [str(sdk_py), str(SDK_DIR / "dps_python_device.py")], stack.spec("py-mqtt-1"),
        name="python dps mqtt",
    )  # fmt: skip
    registered = run_device(device, len(BODIES))
    assert (registered["status"], registered["assigned_hub"], registered["device_id"]) == (
        "assigned", HUB_HOST, "py-mqtt-1"
    )
    check_hub_side(stack, "py-mqtt-1", "dps-mqtt")


@pytest.mark.parametrize("transport", ["mqtt", "amqp"])
def test_node_sdk_provisions_then_sends(node_sdk: Path, stack: DpsStack, transport: str) -> None:
    registration_id = f"node-{transport}-1"
    device = DeviceProcess.start(
        ["node", str(NODE_DIR / "dps_device.js")], stack.spec(registration_id, transport=transport),
        name=f"node dps {transport}", cwd=NODE_DIR, env={"NODE_EXTRA_CA_CERTS": str(stack.ca_file)},
    )  # fmt: skip
    registered = run_device(device, len(BODIES))
    assert (registered["assigned_hub"], registered["device_id"]) == (HUB_HOST, registration_id)
    check_hub_side(stack, registration_id, f"dps-{transport}")
    if transport == "amqp":
        # Its login went over a connection of its own, relayed, and nothing was refused.
        log = stack.gateway.log()
        assert f"registration {registration_id!r} of ID scope {SCOPE!r} logged in" in log
        assert "refused" not in log


def expect_error(device: DeviceProcess) -> str:
    """The script's error line (a refusal), then its exit."""
    try:
        while True:
            item = device.lines.get(timeout=90)
            if item is None:
                raise AssertionError(f"{device.name}: exited without an error\n{device.transcript()}")
            if item.get("event") == "error":
                return str(item.get("error"))
            if item.get("event") in ("registered", "done"):
                raise AssertionError(f"{device.name}: provisioned through an unrouted scope")
    finally:
        device.close()


def test_unrouted_scope_is_refused_each_with_one_log_line(
    sdk_py: Path, node_sdk: Path, stack: DpsStack
) -> None:
    spec = stack.spec("lost-py", id_scope="0ne0NOROUTE")
    python = DeviceProcess.start([str(sdk_py), str(SDK_DIR / "dps_python_device.py")], spec,
                                 name="python dps unrouted")  # fmt: skip
    expect_error(python)
    spec = stack.spec("lost-node", id_scope="0ne0NOROUTE", transport="amqp")
    node = DeviceProcess.start(
        ["node", str(NODE_DIR / "dps_device.js")], spec, name="node dps unrouted", cwd=NODE_DIR,
        env={"NODE_EXTRA_CA_CERTS": str(stack.ca_file)},
    )  # fmt: skip
    expect_error(node)
    log = stack.gateway.log()
    for registration in ("lost-py", "lost-node"):
        lines = [line for line in log.splitlines() if repr(registration) in line]
        assert len(lines) == 1, lines  # refused once: the SDK gives up, no retry loop
        assert "0ne0NOROUTE" in lines[0]
    assert not [r for r in stack.hub.recorder.dps if r.scope == "0ne0NOROUTE"]
    # Counted: the AMQP login as a refused registration (the MQTT one as a refused session).
    assert stack.gateway.metric_sum("iotgw_device_connections_refused_total", reason="registration") >= 1
    # The same gateway still provisions a device of a routed scope.
    device = DeviceProcess.start([str(sdk_py), str(SDK_DIR / "dps_python_device.py")],
                                 stack.spec("py-after-1", messages=["still here"]),
                                 name="python dps after")  # fmt: skip
    run_device(device, 1)
    assert [r.body for r in stack.hub.recorder.d2c_for("py-after-1")] == [b"still here"]


def test_c_amqp_stack_provisions_as_the_c_sdk_then_sends(sdk_py: Path, stack: DpsStack) -> None:
    """uamqp-c (the C SDK's AMQP layer) with the C SDK's provisioning login and links."""
    device = DeviceProcess.start(
        [str(sdk_py), str(SDK_DIR / "dps_uamqp_device.py")], stack.spec("c-amqp-1"),
        name="uamqp dps",
    )  # fmt: skip
    registered = run_device(device, len(BODIES))
    assert (registered["assigned_hub"], registered["device_id"]) == (HUB_HOST, "c-amqp-1")
    check_hub_side(stack, "c-amqp-1", "dps-amqp")
    links = {(r.address, r.name.split("@")[0]) for r in stack.hub.recorder.links
             if r.device_id == "c-amqp-1" and r.address and "registrations" in r.address}  # fmt: skip
    address = f"amqps://{stack.address}/{SCOPE}/registrations/c-amqp-1"
    assert links == {(address, "recv_link"), (address, "sender_link")}
