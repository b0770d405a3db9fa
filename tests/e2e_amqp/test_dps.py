"""Device Provisioning Service over AMQP through the gateway: proton devices -> gateway -> hubsim DPS.

Each provisioning device's SASL PLAIN login (``{scope}/registrations/{regId}``,
its registration token as password) is relayed over a connection of its own
(``sasl: relay``), then its links are routed over it. Refusals: a scope no route
covers (SASL outcome auth), a login DPS refuses (its outcome), another
registration's node (``amqp:not-found``); other devices carry on. hubsim's
recorder says what the service received.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from gw_helpers import (
    HUB_HOST,
    Device,
    authenticated_device,
    data_message,
    in_thread,
    new_key,
    sas_token,
)
from proton import ConnectionException, Message
from proton.utils import LinkDetached

from gateway.auth.credentials import CredentialStore
from gateway.auth.dps import derive_device_key
from gateway.config import parse_config_text
from gateway.hubsim import HubSim
from gateway.net.amqp_listener import serve_amqp_listener
from gateway.net.upstream_io import AmqpConnectorIO
from gateway.router.core import Router

from .gw_helpers import running_gateway

SCOPE = "0ne00AMQP01"
DPS_HOST = "global.azure-devices-provisioning.net"
TIMEOUT = 15


@pytest.fixture
def group_key() -> str:
    return new_key()


@pytest.fixture
def dps_hub(keys: dict[str, str], group_key: str) -> Iterator[HubSim]:
    sim = HubSim(keys, hub_host=HUB_HOST, mqtt_port=None, dps_scope=SCOPE,
                 dps_group_keys={"fleet": group_key}, dps_mqtt_port=None, dps_retry_after=0)  # fmt: skip
    with sim:
        yield sim
    sim.close()


def dps_config(hub: HubSim, tmp_path: Path, credentials: str = ""):
    text = f"""
gateway: {{id: gw-test}}
admin: {{enabled: false}}
tls_profiles:
  hub: {{ca_file: "{hub.ca_file}", server_name: {HUB_HOST}}}
  dps: {{ca_file: "{hub.ca_file}", server_name: {DPS_HOST}}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "127.0.0.1:0"}}
connectors:
  - {{name: iothub, protocol: amqp, host: 127.0.0.1, port: {hub.amqp_port}, tls_profile: hub}}
  - {{name: dps, protocol: amqp, host: 127.0.0.1, port: {hub.dps_amqp_port}, tls_profile: dps, sasl: relay}}
link_routes:
  - {{prefix: "$cbs", connector: iothub}}
  - {{prefix: "devices/", connector: iothub}}
  - {{pattern: "{SCOPE}/registrations/*", connector: dps}}
{credentials}"""
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return parse_config_text(text, str(path))


def reg_token(registration_id: str, key: str, scope: str = SCOPE) -> str:
    return sas_token(f"{scope}/registrations/{registration_id}", key) + "&skn=registration"


def provision(url: str, registration_id: str, password: str, scope: str = SCOPE,
              prefix: str = "") -> dict:  # fmt: skip
    """What the SDKs do: PLAIN login, receiver + sender on the registration, register, poll.
    `prefix`: the C SDK puts ``amqps://{host}/`` before the address."""
    dev = Device(url, mechs="PLAIN", user=f"{scope}/registrations/{registration_id}", password=password)
    try:
        address = f"{prefix}{scope}/registrations/{registration_id}"
        rx = dev.conn.create_receiver(address)
        tx = dev.conn.create_sender(address)
        body = json.dumps({"registrationId": registration_id}).encode()
        tx.send(Message(correlation_id="r-1", body=body, properties={
            "iotdps-operation-type": "iotdps-register", "iotdps-forceRegistration": False}))
        reply = rx.receive(timeout=TIMEOUT)
        assert reply.correlation_id == "r-1"
        op = json.loads(bytes(reply.body))["operationId"]
        tx.send(Message(correlation_id="r-2", body=b"", properties={
            "iotdps-operation-type": "iotdps-get-operationstatus", "iotdps-operation-id": op}))
        reply = rx.receive(timeout=TIMEOUT)
        assert reply.correlation_id == "r-2"
        return json.loads(bytes(reply.body))
    finally:
        dev.close()


async def test_provision_over_a_relayed_login_then_send_to_the_assigned_hub(dps_hub, group_key, tmp_path):
    key = derive_device_key(group_key, "amqp-dev-1")
    async with running_gateway(dps_config(dps_hub, tmp_path)) as gw:
        answer = await in_thread(provision, gw.url, "amqp-dev-1", reg_token("amqp-dev-1", key))
        assert answer["status"] == "assigned"
        assert answer["registrationState"]["assignedHub"] == HUB_HOST

        def telemetry() -> None:
            with authenticated_device(gw.url, "amqp-dev-1", key) as dev:
                dev.conn.create_sender("devices/amqp-dev-1/messages/events").send(data_message(b"hi"))

        await in_thread(telemetry)
    record = await trio.to_thread.run_sync(dps_hub.recorder.wait_for, lambda: dps_hub.recorder.d2c)
    assert (record[0].device_id, record[0].body) == ("amqp-dev-1", b"hi")
    ops = [(r.protocol, r.operation, r.status) for r in dps_hub.recorder.dps]
    assert ops == [("dps-amqp", "connect", 200), ("dps-amqp", "register", 202), ("dps-amqp", "status", 200)]
    # The link properties and addresses arrived as the device sent them.
    links = [rec for rec in dps_hub.recorder.links if rec.address == f"{SCOPE}/registrations/amqp-dev-1"]
    assert sorted(r.role for r in links) == ["receiver", "sender"]


async def test_unrouted_scope_gets_sasl_auth_and_one_log_line(dps_hub, keys, group_key, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with running_gateway(dps_config(dps_hub, tmp_path)) as gw:
        with pytest.raises(ConnectionException):
            await in_thread(Device, gw.url, mechs="PLAIN", user="0ne0NOWHERE/registrations/x-1",
                            password="SharedAccessSignature sr=a&sig=b&se=1")  # fmt: skip
        lines = [r for r in caplog.records if "0ne0NOWHERE" in r.getMessage()]
        assert len(lines) == 1 and "outcome 1" in lines[0].getMessage()
        assert "sig=b" not in caplog.text
        # A hub device and another registration carry on.
        def hub_device() -> None:
            with authenticated_device(gw.url, "dev1", keys["dev1"]) as dev:
                dev.conn.create_sender("devices/dev1/messages/events").send(data_message(b"ok"))

        await in_thread(hub_device)
        key = derive_device_key(group_key, "amqp-dev-2")
        answer = await in_thread(provision, gw.url, "amqp-dev-2", reg_token("amqp-dev-2", key))
        assert answer["status"] == "assigned"
    assert not [r for r in dps_hub.recorder.dps if r.registration_id == "x-1"]


async def test_login_the_service_refuses_gets_its_outcome(dps_hub, tmp_path):
    async with running_gateway(dps_config(dps_hub, tmp_path)) as gw:
        with pytest.raises(ConnectionException):
            await in_thread(Device, gw.url, mechs="PLAIN", user=f"{SCOPE}/registrations/bad-1",
                            password=reg_token("bad-1", new_key()))  # fmt: skip
    assert [(r.operation, r.status) for r in dps_hub.recorder.dps] == [("connect", 401)]


async def test_other_registrations_node_is_not_found(dps_hub, group_key, tmp_path):
    key = derive_device_key(group_key, "amqp-dev-3")
    async with running_gateway(dps_config(dps_hub, tmp_path)) as gw:

        def attach_other() -> str:
            dev = Device(gw.url, mechs="PLAIN", user=f"{SCOPE}/registrations/amqp-dev-3",
                         password=reg_token("amqp-dev-3", key))  # fmt: skip
            try:
                with pytest.raises(LinkDetached) as err:
                    dev.conn.create_sender(f"{SCOPE}/registrations/someone-else")
                return str(err.value)
            finally:
                dev.close()

        assert "amqp:not-found" in await in_thread(attach_other)

        def anonymous_attach() -> str:
            dev = Device(gw.url)
            try:
                with pytest.raises(LinkDetached) as err:
                    dev.conn.create_sender(f"{SCOPE}/registrations/amqp-dev-3")
                return str(err.value)
            finally:
                dev.close()

        assert "amqp:not-found" in await in_thread(anonymous_attach)


async def test_gateway_signs_the_registration_with_the_group_key(dps_hub, group_key, tmp_path):
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(f"fleet-key: {group_key}\n")
    secrets.chmod(0o600)
    credentials = f"""credentials:
  secrets_file: {secrets}
  groups:
    - {{id_pattern: "fleet-*", group_key: fleet-key, trust: network}}
"""
    config = dps_config(dps_hub, tmp_path, credentials)
    async with trio.open_nursery() as nursery:
        router = Router(config, connector_io=AmqpConnectorIO(),
                        credentials=CredentialStore.from_config(config.credentials))
        await nursery.start(router.run)
        bound = await nursery.start(serve_amqp_listener, config.listeners[0], config, router)
        # The device holds no key: its password is not a token, its entry trusts the network.
        url = f"amqp://127.0.0.1:{bound[0][1]}"
        answer = await in_thread(provision, url, "fleet-4", "not-a-token")
        nursery.cancel_scope.cancel()
    assert answer["registrationState"]["deviceId"] == "fleet-4"
    assert dps_hub.state.devices["fleet-4"] == derive_device_key(group_key, "fleet-4")



async def test_c_sdk_address_form_with_scheme_and_host(dps_hub, group_key, tmp_path):
    """The C SDK attaches ``amqps://{provisioning host}/{scope}/registrations/{regId}``;
    it routes as the bare address, and reaches the service as the device sent it."""
    key = derive_device_key(group_key, "c-dev-1")
    prefix = f"amqps://{DPS_HOST}/"
    async with running_gateway(dps_config(dps_hub, tmp_path)) as gw:
        answer = await in_thread(provision, gw.url, "c-dev-1", reg_token("c-dev-1", key), prefix=prefix)
    assert answer["status"] == "assigned"
    addresses = {r.address for r in dps_hub.recorder.links if r.device_id == "c-dev-1"}
    assert addresses == {f"{prefix}{SCOPE}/registrations/c-dev-1"}


async def test_unreachable_service_gets_sys_temp(dps_hub, group_key, tmp_path, caplog):
    """The device is told to retry (outcome sys-temp), with one log line."""
    import socket

    caplog.set_level(logging.INFO)
    dps_config(dps_hub, tmp_path)  # writes gateway.yaml; its DPS port is swapped below
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        text = (tmp_path / "gateway.yaml").read_text().replace(
            f"port: {dps_hub.dps_amqp_port}, tls_profile: dps", f"port: {port}, tls_profile: dps"
        )
        config = parse_config_text(text, str(tmp_path / "gateway.yaml"))
        key = derive_device_key(group_key, "amqp-dev-5")
        async with running_gateway(config) as gw:
            with pytest.raises(ConnectionException):
                await in_thread(Device, gw.url, mechs="PLAIN", user=f"{SCOPE}/registrations/amqp-dev-5",
                                password=reg_token("amqp-dev-5", key))  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if "amqp-dev-5" in r.getMessage()]
    assert len(lines) == 1 and "outcome 4" in lines[0] and "unreachable" in lines[0]


async def test_relayed_connections_end_with_their_device(dps_hub, group_key, tmp_path):
    """Nothing stays behind at the service: each provisioning device's connection to it
    closes when the device leaves, provisioned or refused at attach."""
    key = derive_device_key(group_key, "amqp-dev-6")
    recorder = dps_hub.recorder
    async with running_gateway(dps_config(dps_hub, tmp_path)) as gw:
        for _ in range(3):
            await in_thread(provision, gw.url, "amqp-dev-6", reg_token("amqp-dev-6", key))

        def login_only() -> None:  # logs in, attaches nothing, leaves
            Device(gw.url, mechs="PLAIN", user=f"{SCOPE}/registrations/amqp-dev-6",
                   password=reg_token("amqp-dev-6", key)).close()  # fmt: skip

        await in_thread(login_only)
        await trio.to_thread.run_sync(
            recorder.wait_for,
            lambda: recorder.connections["dps-amqp"].opened == 4
            and recorder.connections["dps-amqp"].open == 0,
        )
