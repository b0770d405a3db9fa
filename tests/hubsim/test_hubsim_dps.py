"""hubsim's Device Provisioning Service, driven by paho-mqtt and python-qpid-proton.

The SDKs' own provisioning clients are exercised in tests/sdk; here each rule is
pinned with a client whose every byte the test chooses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import queue
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hubsim_clients import HUB_HOST, TIMEOUT, new_key, sas_token
from proton import ConnectionException, Message, SSLDomain
from proton.utils import BlockingConnection, LinkDetached

from gateway.hubsim import HubSim

SCOPE = "0ne00DPS001"
# paho reports MQTT 3.1.1 CONNACK codes 4 and 5 as their MQTT 5 reason codes.
BAD_CREDENTIALS, NOT_AUTHORISED = 134, 135


def derive(group_key: str, registration_id: str) -> str:
    raw = hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256).digest()
    return base64.b64encode(raw).decode()


def reg_token(registration_id: str, key: str, scope: str = SCOPE, expiry: int | None = None) -> str:
    return sas_token(f"{scope}/registrations/{registration_id}", key, expiry, policy="registration")


@pytest.fixture
def group_key() -> str:
    return new_key()


@pytest.fixture
def dps_hub(group_key: str) -> Iterator[HubSim]:
    sim = HubSim(
        {}, hub_host=HUB_HOST, dps_scope=SCOPE, dps_group_keys={"fleet": group_key},
        dps_device_keys={"solo": derive(new_key(), "solo")}, dps_retry_after=0,
    )
    with sim:
        yield sim
    sim.close()


class DpsMqtt:
    def __init__(self, hub: HubSim, registration_id: str, password: str, scope: str = SCOPE,
                 username: str | None = None) -> None:
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=registration_id,
                                  protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        self.client.username_pw_set(
            username or f"{scope}/registrations/{registration_id}/api-version=2019-03-31&ClientVersion=x",
            password,
        )
        self.client.tls_set(ca_certs=hub.ca_file)
        self.client.on_connect = lambda c, u, f, rc, p: self.events.put(("connect", rc))
        self.client.on_message = lambda c, u, m: self.events.put(("message", m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.events.put(("suback",))
        assert hub.dps_mqtt_port is not None
        self.client.connect("127.0.0.1", hub.dps_mqtt_port, keepalive=30)
        self.client.loop_start()

    def expect(self, kind: str) -> tuple[Any, ...]:
        while True:
            event = self.events.get(timeout=TIMEOUT)
            if event[0] == kind:
                return event

    def request(self, topic: str, body: bytes) -> tuple[str, dict[str, Any]]:
        self.client.publish(topic, body, qos=1).wait_for_publish(TIMEOUT)
        _, rtopic, payload = self.expect("message")
        return rtopic, json.loads(payload)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_mqtt_register_poll_then_connect_to_hub(dps_hub: HubSim, group_key: str) -> None:
    key = derive(group_key, "sensor-7")
    dev = DpsMqtt(dps_hub, "sensor-7", reg_token("sensor-7", key))
    try:
        assert not dev.expect("connect")[1].is_failure
        dev.client.subscribe("$dps/registrations/res/#", qos=1)
        dev.expect("suback")
        body = json.dumps({"registrationId": "sensor-7", "payload": {"room": 4}}).encode()
        topic, answer = dev.request("$dps/registrations/PUT/iotdps-register/?$rid=1", body)
        assert topic == "$dps/registrations/res/202/?$rid=1&retry-after=0"
        assert answer["status"] == "assigning"
        op = answer["operationId"]
        topic, answer = dev.request(
            f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId={op}", b" "
        )
        assert topic == "$dps/registrations/res/200/?$rid=2"
        assert answer["status"] == "assigned"
        state = answer["registrationState"]
        assert (state["assignedHub"], state["deviceId"], state["payload"]) == (HUB_HOST, "sensor-7", {"room": 4})
    finally:
        dev.close()
    ops = [(r.operation, r.status, r.payload) for r in dps_hub.recorder.dps]
    assert ops == [("connect", 200, None), ("register", 202, {"room": 4}), ("status", 200, None)]
    # Assigned: the hub now knows the device with the key DPS derived.
    assert dps_hub.state.devices["sensor-7"] == key


@pytest.mark.parametrize(
    ("password", "scope", "code"),
    [
        ("wrong", SCOPE, NOT_AUTHORISED),
        (None, "0ne0OTHER", NOT_AUTHORISED),  # a scope this service is not
    ],
)
def test_mqtt_refusals(dps_hub: HubSim, group_key: str, password: str | None, scope: str, code: int) -> None:
    token = password or reg_token("sensor-8", derive(group_key, "sensor-8"), scope=scope)
    dev = DpsMqtt(dps_hub, "sensor-8", token, scope=scope)
    try:
        assert dev.expect("connect")[1].value == code
    finally:
        dev.close()


def test_mqtt_user_name_for_another_registration_is_refused(dps_hub: HubSim, group_key: str) -> None:
    token = reg_token("sensor-9", derive(group_key, "sensor-9"))
    dev = DpsMqtt(dps_hub, "sensor-9", token, username=f"{SCOPE}/registrations/other/api-version=x")
    try:
        assert dev.expect("connect")[1].value == BAD_CREDENTIALS
    finally:
        dev.close()


def test_mqtt_expired_token_is_refused(dps_hub: HubSim, group_key: str) -> None:
    token = reg_token("sensor-9", derive(group_key, "sensor-9"), expiry=int(time.time()) - 3600)
    dev = DpsMqtt(dps_hub, "sensor-9", token)
    try:
        assert dev.expect("connect")[1].value == NOT_AUTHORISED
    finally:
        dev.close()


def amqp_connect(hub: HubSim, registration_id: str, token: str, scope: str = SCOPE) -> BlockingConnection:
    domain = SSLDomain(SSLDomain.MODE_CLIENT)
    domain.set_trusted_ca_db(hub.ca_file)
    domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
    return BlockingConnection(
        f"amqps://127.0.0.1:{hub.dps_amqp_port}", ssl_domain=domain, allowed_mechs="PLAIN",
        user=f"{scope}/registrations/{registration_id}", password=token,
        virtual_host="global.azure-devices-provisioning.net", timeout=TIMEOUT,
    )


def test_amqp_register_and_poll(dps_hub: HubSim, group_key: str) -> None:
    key = derive(group_key, "sensor-a")
    conn = amqp_connect(dps_hub, "sensor-a", reg_token("sensor-a", key))
    try:
        address = f"{SCOPE}/registrations/sensor-a"
        rx = conn.create_receiver(address)
        tx = conn.create_sender(address)
        body = json.dumps({"registrationId": "sensor-a"}).encode()
        tx.send(Message(correlation_id="c-1", properties={"iotdps-operation-type": "iotdps-register",
                                                           "iotdps-forceRegistration": False}, body=body))
        reply = rx.receive(timeout=TIMEOUT)
        assert reply.correlation_id == "c-1"
        assert reply.properties["retry-after"] == 0
        answer = json.loads(bytes(reply.body))
        assert answer["status"] == "assigning"
        tx.send(Message(correlation_id="c-2", properties={
            "iotdps-operation-type": "iotdps-get-operationstatus",
            "iotdps-operation-id": answer["operationId"]}, body=b""))
        reply = rx.receive(timeout=TIMEOUT)
        assert reply.correlation_id == "c-2"
        answer = json.loads(bytes(reply.body))
        assert answer["registrationState"]["assignedHub"] == HUB_HOST
        # A node of another registration is not served on this connection.
        with pytest.raises(LinkDetached) as err:
            conn.create_sender(f"{SCOPE}/registrations/someone-else")
        assert "amqp:not-found" in str(err.value)
    finally:
        conn.close()
    assert dps_hub.state.devices["sensor-a"] == key


def test_amqp_bad_token_fails_sasl(dps_hub: HubSim) -> None:
    with pytest.raises(ConnectionException):
        amqp_connect(dps_hub, "sensor-b", reg_token("sensor-b", new_key()))
    rec = dps_hub.recorder.wait_for(lambda: [a for a in dps_hub.recorder.auth if a.protocol == "dps-amqp"])
    assert not rec[0].ok
