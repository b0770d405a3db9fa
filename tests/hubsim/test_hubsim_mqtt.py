"""hubsim's MQTT side against paho-mqtt devices (no gateway in between)."""

from __future__ import annotations

import json
import pathlib
import threading
import time

import pytest
from hubsim_clients import TIMEOUT, MqttDevice, device_uri, new_key, sas_token

from gateway.hubsim import HubSim

EVENTS = "devices/dev1/messages/events/"


def connect(hub: HubSim, keys: dict[str, str], identity: str = "dev1", **kwargs: object) -> MqttDevice:
    dev = MqttDevice(hub, identity, sas_token(device_uri(identity), keys[identity]), **kwargs)  # type: ignore[arg-type]
    assert dev.connected()
    return dev


def closed_reason(hub: HubSim, conn_id: int | None = None) -> str:
    def closed() -> str:
        for rec in hub.recorder.connection_log:
            if rec.protocol == "mqtt" and rec.kind == "close" and conn_id in (None, rec.connection):
                return rec.reason
        return ""

    return hub.recorder.wait_for(closed)


def test_sas_connect_and_d2c_qos0_qos1_with_property_bag(hub: HubSim, keys: dict[str, str]) -> None:
    dev = connect(hub, keys)
    try:
        dev.publish(EVENTS + "%24.ct=application%2Fjson&$.ce=utf-8&p=a%20b&flag", b'{"t":1}', qos=1)
        dev.publish(EVENTS, b"zero", qos=0)
        dev.publish(EVENTS + "r=1", b"kept?", qos=1, retain=True)
        hub.recorder.wait_for(lambda: len(hub.recorder.d2c) == 3)
    finally:
        dev.close()
    first, second, third = hub.recorder.d2c
    assert (first.device_id, first.protocol, first.qos, first.body, first.raw) == (
        "dev1", "mqtt", 1, b'{"t":1}', b'{"t":1}'
    )
    assert first.properties == {"$.ct": "application/json", "$.ce": "utf-8", "p": "a b", "flag": None}
    assert first.topic == EVENTS + "%24.ct=application%2Fjson&$.ce=utf-8&p=a%20b&flag"
    assert (second.qos, second.body, second.properties) == (0, b"zero", {})
    assert third.retain and third.properties == {"r": "1", "mqtt-retain": "true"}
    assert hub.recorder.auth[0].mechanism == "sas" and hub.recorder.auth[0].ok
    assert closed_reason(hub) == "DISCONNECT"
    assert hub.recorder.connections["mqtt"].devices == {"dev1": 1}


def test_twin_get_patch_desired_and_direct_method(hub: HubSim, keys: dict[str, str]) -> None:
    dev = connect(hub, keys)
    try:
        granted = dev.subscribe(
            "$iothub/twin/res/#", "$iothub/twin/PATCH/properties/desired/#", "$iothub/methods/POST/#", qos=0
        )
        assert granted == [0, 0, 0]
        hub.update_desired("dev1", {"interval": 5})
        assert dev.expect("message")[1] == "$iothub/twin/PATCH/properties/desired/?$version=2"
        dev.publish("$iothub/twin/GET/?$rid=1", b"", qos=0)
        _, topic, payload, _ = dev.expect("message")
        assert topic == "$iothub/twin/res/200/?$rid=1"
        assert json.loads(payload) == {"desired": {"interval": 5, "$version": 2}, "reported": {"$version": 1}}

        dev.publish("$iothub/twin/PATCH/properties/reported/?$rid=2", b'{"fw":"1.2"}', qos=0)
        assert dev.expect("message")[1] == "$iothub/twin/res/204/?$rid=2&$version=2"
        assert hub.twin("dev1")["reported"] == {"fw": "1.2", "$version": 2}

        assert hub.update_desired("dev1", {"interval": None, "mode": "eco"}) == 3
        _, topic, payload, _ = dev.expect("message")
        assert topic == "$iothub/twin/PATCH/properties/desired/?$version=3"
        assert json.loads(payload) == {"interval": None, "mode": "eco", "$version": 3}
        assert hub.twin("dev1")["desired"] == {"mode": "eco", "$version": 3}

        result: list[tuple[int, bytes]] = []
        caller = threading.Thread(
            target=lambda: result.append(hub.invoke_method("dev1", "reboot", {"delay": 1}, timeout=TIMEOUT))
        )
        caller.start()
        _, topic, payload, _ = dev.expect("message")
        assert topic.startswith("$iothub/methods/POST/reboot/?$rid=")
        assert json.loads(payload) == {"delay": 1}
        rid = topic.split("$rid=")[1]
        dev.publish(f"$iothub/methods/res/201/?$rid={rid}", b'{"done":true}', qos=0)
        caller.join(TIMEOUT)
        assert result == [(201, b'{"done":true}')]
    finally:
        dev.close()


def test_c2d_queued_then_delivered_on_subscribe_puback_completes(hub: HubSim, keys: dict[str, str]) -> None:
    message_id = hub.send_c2d(
        "dev1", b"cmd", {"content_type": "text/plain", "correlation_id": "c/1"}, {"k": "v w"}
    )
    dev = connect(hub, keys)
    try:
        assert dev.subscribe("devices/dev1/messages/devicebound/#", qos=2) == [1]  # QoS 2 granted as 1
        _, topic, payload, qos = dev.expect("message")
    finally:
        dev.close()
    assert (payload, qos) == (b"cmd", 1)
    prefix = "devices/dev1/messages/devicebound/"
    assert topic.startswith(prefix)
    from gateway.hubsim import propbag

    assert propbag.decode(topic[len(prefix):]) == {
        "$.mid": message_id,
        "$.cid": "c/1",
        "$.ct": "text/plain",
        "$.to": "/devices/dev1/messages/deviceBound",
        "k": "v w",
    }
    hub.recorder.wait_for(lambda: hub.recorder.feedback)
    assert [(d.outcome, d.protocol) for d in hub.recorder.dispositions] == [("puback", "mqtt")]
    assert [(f.message_id, f.status) for f in hub.recorder.feedback] == [(message_id, "Success")]


@pytest.mark.parametrize(
    ("password", "code"),
    [
        ("forged", 5),
        ("expired", 5),
        ("other-device", 5),
        (None, 4),
    ],
)
def test_bad_credentials_get_connack_refusal(
    hub: HubSim, keys: dict[str, str], password: str | None, code: int
) -> None:
    tokens = {
        "forged": sas_token(device_uri("dev1"), new_key()),
        "expired": sas_token(device_uri("dev1"), keys["dev1"], int(time.time()) - 3600),
        "other-device": sas_token(device_uri("dev2"), keys["dev2"]),
        None: None,
    }
    dev = MqttDevice(hub, "dev1", tokens[password])
    try:
        assert not dev.connected()
    finally:
        dev.stop()
    auth = hub.recorder.wait_for(lambda: hub.recorder.auth)[0]
    assert (auth.ok, auth.code) == (False, code)
    assert not hub.recorder.connections["mqtt"].devices


def test_username_must_name_this_hub_and_device(hub: HubSim, keys: dict[str, str]) -> None:
    token = sas_token(device_uri("dev1"), keys["dev1"])
    dev = MqttDevice(hub, "dev1", token, username="otherhub.azure-devices.net/dev1/?api-version=2021-04-12")
    try:
        assert not dev.connected()
    finally:
        dev.stop()
    assert hub.recorder.wait_for(lambda: hub.recorder.auth)[0].code == 4


@pytest.mark.parametrize(
    "action",
    ["qos2-publish", "foreign-publish", "foreign-subscribe", "other-device-subscribe"],
)
def test_rule_breaking_closes_the_connection(hub: HubSim, keys: dict[str, str], action: str) -> None:
    dev = connect(hub, keys)
    try:
        if action == "qos2-publish":
            dev.client.publish(EVENTS, b"x", qos=2)
        elif action == "foreign-publish":
            dev.client.publish("devices/dev2/messages/events/", b"x", qos=1)
        elif action == "foreign-subscribe":
            dev.client.subscribe("#", qos=1)
        else:
            dev.client.subscribe("devices/dev2/messages/devicebound/#", qos=1)
        dev.expect("disconnect")
    finally:
        dev.stop()
    assert closed_reason(hub).startswith("closed by hub")
    assert not hub.recorder.d2c


def test_second_connection_kicks_the_first(hub: HubSim, keys: dict[str, str]) -> None:
    first = connect(hub, keys)
    second = connect(hub, keys)
    try:
        first.expect("disconnect")
        second.publish(EVENTS, b"from the second", qos=1)
    finally:
        first.stop()
        second.close()
    assert closed_reason(hub).startswith("kicked")
    assert [r.body for r in hub.recorder.d2c] == [b"from the second"]
    assert hub.recorder.connections["mqtt"].devices == {"dev1": 2}


def test_will_is_recorded_on_abrupt_loss(hub: HubSim, keys: dict[str, str]) -> None:
    dev = connect(hub, keys, will=(EVENTS + "state=lost", b"gone"))
    dev.client.loop_stop()
    sock = dev.client.socket()
    assert sock is not None
    sock.close()  # no DISCONNECT
    record = hub.recorder.wait_for(lambda: hub.recorder.d2c and hub.recorder.d2c[0])
    assert (record.body, record.properties) == (b"gone", {"state": "lost", "iothub-MessageType": "Will"})


def test_keep_alive_is_enforced_at_one_and_a_half_times(hub: HubSim, keys: dict[str, str]) -> None:
    dev = connect(hub, keys, keepalive=1)
    dev.client.loop_stop()  # the device goes silent: no PINGREQ
    try:
        assert closed_reason(hub) == "keep-alive expired"
        closed = next(r for r in hub.recorder.connection_log if r.kind == "close")
        assert 1.5 <= closed.at - hub.recorder.auth[0].at < TIMEOUT
    finally:
        dev.client.socket().close()  # type: ignore[union-attr]


def test_module_identity(hub: HubSim, keys: dict[str, str]) -> None:
    dev = connect(hub, keys, identity="dev1/mod1")
    try:
        dev.publish("devices/dev1/modules/mod1/messages/events/", b"from a module", qos=1)
    finally:
        dev.close()
    assert [(r.device_id, r.body) for r in hub.recorder.d2c] == [("dev1/mod1", b"from a module")]


def test_x509_client_certificate_without_password(hub: HubSim, tmp_path: pathlib.Path) -> None:
    cert_pem, key_pem = hub.issue_device_cert("dev2")
    (tmp_path / "dev2.pem").write_bytes(cert_pem)
    (tmp_path / "dev2.key").write_bytes(key_pem)
    dev = MqttDevice(hub, "dev2", None, cert=(str(tmp_path / "dev2.pem"), str(tmp_path / "dev2.key")))
    try:
        assert dev.connected()
    finally:
        dev.close()
    assert (hub.recorder.auth[0].mechanism, hub.recorder.auth[0].ok) == ("x509", True)


def test_hub_loss_drops_devices_and_restart_keeps_the_port(hub: HubSim, keys: dict[str, str]) -> None:
    dev = connect(hub, keys)
    hub.kill_connections()
    dev.expect("disconnect")
    dev.stop()
    port = hub.mqtt_port
    hub.stop()
    hub.start()
    assert hub.mqtt_port == port
    again = connect(hub, keys)
    again.publish(EVENTS, b"back", qos=1)
    again.close()
    assert hub.recorder.d2c[-1].body == b"back"
