"""Device Provisioning Service over MQTT through the relay: paho devices -> relay -> hubsim DPS.

Routes by CONNECT user name (`mqtt_routes[].username`), refusals for registrations
no route covers, and registrations the gateway signs with an enrollment group key
it holds. What DPS and the hub received is read from hubsim's recorder. Keys and
tokens are computed here with hmac, independently of gateway.auth and hubsim.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote_plus

import pytest
import trio

from gateway.auth.credentials import CredentialStore
from gateway.config import parse_config_text
from gateway.daemon import serve_mqtt_listener
from gateway.hubsim import HubSim
from gateway.mqtt_relay import CloseReason, select_mqtt_route
from tests.waiting import FAILSAFE

from .paho_device import PahoDevice

HUB = "myhub.azure-devices.net"
SCOPE = "0ne00FLEET1"
WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)
RESPONSES = "$dps/registrations/res/#"
REGISTER = "$dps/registrations/PUT/iotdps-register/?$rid={}"
STATUS = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={}&operationId={}"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def derive(group_key: str, registration_id: str) -> str:
    digest = hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def token(resource: str, key: str, policy: str | None = None) -> str:
    expiry = int(time.time()) + 3600
    sr = quote_plus(resource)
    sig = hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    text = f"SharedAccessSignature sr={sr}&sig={quote_plus(base64.b64encode(sig).decode())}&se={expiry}"
    return text + (f"&skn={policy}" if policy else "")


def dps_username(registration_id: str, scope: str = SCOPE) -> str:
    return f"{scope}/registrations/{registration_id}/api-version=2019-03-31&ClientVersion=test"


# -- route selection ------------------------------------------------------------------------


def test_select_mqtt_route_username_before_hub_and_registrations_never_to_hubs() -> None:
    hub_any = SimpleNamespace(hub="*", username=None, name="hub-any")
    dps = SimpleNamespace(hub=None, username=f"{SCOPE}/registrations/*", name="dps")
    routes = [hub_any, dps]
    assert select_mqtt_route(routes, dps_username("sensor-1")) is dps
    assert select_mqtt_route(routes, f"{HUB}/dev1/?api-version=2021-04-12") is hub_any
    # Another scope: no username route covers it, and a hub route never takes a registration.
    assert select_mqtt_route(routes, dps_username("sensor-1", "0ne0OTHER")) is None
    # A device called "registrations" on a hub is still a hub device.
    assert select_mqtt_route(routes, f"{HUB}/registrations/?api-version=x") is hub_any


def test_username_and_hub_are_exclusive_and_hub_defaults_to_any() -> None:
    base = """
listeners: [{name: mqtt, protocol: mqtt, bind: "127.0.0.1:0"}]
connectors: [{name: c, protocol: mqtt, host: h, allow_plaintext: true}]
"""
    config = parse_config_text(base + "mqtt_routes: [{connector: c}, {username: 'x/*', connector: c}]\n", "g.yaml")
    assert [(r.hub, r.username) for r in config.mqtt_routes] == [("*", None), (None, "x/*")]
    with pytest.raises(Exception, match="hub or username"):
        parse_config_text(base + "mqtt_routes: [{hub: h, username: 'x/*', connector: c}]\n", "g.yaml")


# -- through the relay to hubsim's DPS --------------------------------------------------------


class Env:
    def __init__(self) -> None:
        self.group_key = new_key()


@pytest.fixture
def env() -> Env:
    return Env()


@pytest.fixture
def hub(env: Env):
    sim = HubSim(
        {}, hub_host=HUB, amqp_port=None, dps_scope=SCOPE, dps_group_keys={"fleet": env.group_key},
        dps_amqp_port=None, dps_retry_after=0,
    )
    with sim:
        yield sim
    sim.close()


def write_private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


async def start_relay(nursery, hub: HubSim, env: Env, tmp_path: Path):
    secrets = write_private(tmp_path / "secrets.yaml", f"fleet-key: {env.group_key}\n")
    config = parse_config_text(
        f"""
admin: {{enabled: false}}
tls_profiles:
  hubsim: {{ca_file: {hub.ca_file}, server_name: {HUB}}}
  dps: {{ca_file: {hub.ca_file}, server_name: {hub.dps_host_name}}}
listeners:
  - {{name: mqtt, protocol: mqtt, bind: "127.0.0.1:0"}}
connectors:
  - {{name: iothub-mqtt, protocol: mqtt, host: 127.0.0.1, port: {hub.mqtt_port}, tls_profile: hubsim}}
  - {{name: dps-mqtt, protocol: mqtt, host: 127.0.0.1, port: {hub.dps_mqtt_port}, tls_profile: dps}}
mqtt_routes:
  - {{username: "{SCOPE}/registrations/*", connector: dps-mqtt}}
  - {{hub: "*", connector: iothub-mqtt}}
credentials:
  secrets_file: {secrets}
  groups:
    - {{id_pattern: "fleet-*", group_key: fleet-key, trust: network}}
""",
        "gateway.yaml",
    )
    store = CredentialStore.from_config(config.credentials)
    closed: list[str] = []

    class Observer:
        def on_packet(self, *args):
            pass

        def on_close(self, reason):
            closed.append(reason)

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        await serve_mqtt_listener(
            config.listeners[0], config, task_status=task_status, observer=Observer(), credentials=store
        )

    bound = await nursery.start(serve)
    return bound[0][1], closed


async def provision(port: int, registration_id: str, password: str | None, scope: str = SCOPE) -> dict:
    """The DPS MQTT exchange as the SDKs run it; returns the registration state."""
    device = PahoDevice(registration_id, username=dps_username(registration_id, scope), password=password)
    assert await device.connect(port) == 0
    try:
        await device.subscribe(RESPONSES, 1)
        body = json.dumps({"registrationId": registration_id, "payload": {"site": 3}}).encode()
        await device.publish(REGISTER.format(1), body, qos=1)
        answer = await device.receive()
        assert answer.topic == "$dps/registrations/res/202/?$rid=1&retry-after=0"
        op = json.loads(answer.payload)["operationId"]
        await device.publish(STATUS.format(2, op), b" ", qos=1)
        answer = await device.receive()
        assert answer.topic == "$dps/registrations/res/200/?$rid=2"
        return json.loads(answer.payload)["registrationState"]
    finally:
        await device.disconnect()


async def send_telemetry(port: int, device_id: str, password: str | None, body: bytes) -> None:
    device = PahoDevice(device_id, username=f"{HUB}/{device_id}/?api-version=2021-04-12", password=password)
    assert await device.connect(port) == 0
    await device.publish(f"devices/{device_id}/messages/events/", body, qos=1)
    await device.disconnect()


async def wait_for(hub: HubSim, predicate):
    return await trio.to_thread.run_sync(hub.recorder.wait_for, predicate, WAIT)


async def test_device_with_its_own_key_provisions_then_sends_to_the_assigned_hub(
    nursery, hub, env, tmp_path
):
    port, _ = await start_relay(nursery, hub, env, tmp_path)
    key = derive(env.group_key, "own-1")
    reg_token = token(f"{SCOPE}/registrations/own-1", key, "registration")
    state = await provision(port, "own-1", reg_token)
    assert (state["assignedHub"], state["deviceId"]) == (HUB, "own-1")
    await send_telemetry(port, "own-1", token(f"{HUB}/devices/own-1", key), b"after provisioning")
    record = await wait_for(hub, lambda: hub.recorder.d2c and hub.recorder.d2c[0])
    assert (record.device_id, record.body) == ("own-1", b"after provisioning")
    assert [(r.operation, r.status, r.payload) for r in hub.recorder.dps] == [
        ("connect", 200, None), ("register", 202, {"site": 3}), ("status", 200, None)
    ]


async def test_gateway_signs_the_registration_with_the_group_key(nursery, hub, env, tmp_path, caplog):
    """The device holds nothing: the gateway signs its registration, then its hub token."""
    caplog.set_level(logging.INFO)
    port, _ = await start_relay(nursery, hub, env, tmp_path)
    state = await provision(port, "fleet-9", None)
    line = next(r.getMessage() for r in caplog.records if "-> connector dps-mqtt" in r.getMessage())
    assert f"registration 'fleet-9' of ID scope '{SCOPE}'" in line
    assert "registration signed by the gateway (group fleet-*" in line
    assert state["deviceId"] == "fleet-9"
    await send_telemetry(port, "fleet-9", None, b"signed by the gateway")
    record = await wait_for(hub, lambda: hub.recorder.d2c and hub.recorder.d2c[0])
    assert (record.device_id, record.body) == ("fleet-9", b"signed by the gateway")
    assert hub.state.devices["fleet-9"] == derive(env.group_key, "fleet-9")


async def test_registration_of_an_unrouted_scope_is_refused_others_carry_on(
    nursery, hub, env, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    port, closed = await start_relay(nursery, hub, env, tmp_path)
    stranger = PahoDevice("lost-1", username=dps_username("lost-1", "0ne0NOROUTE"), password="lan-secret")
    assert await stranger.connect(port) == "Not authorized"
    assert await stranger.wait_disconnected()
    stranger.close()
    lines = [r.getMessage() for r in caplog.records if "0ne0NOROUTE" in r.getMessage()]
    assert len(lines) == 1 and "no mqtt route" in lines[0], lines
    assert "lan-secret" not in caplog.text
    assert CloseReason.NO_ROUTE in closed
    assert not [r for r in hub.recorder.dps if r.registration_id == "lost-1"]
    # Another device provisions through the same listener meanwhile.
    state = await provision(port, "fleet-2", None)
    assert state["assignedHub"] == HUB
