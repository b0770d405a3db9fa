"""Pure rules of the emulated hub: SAS checks, property bags, MQTT topics, addresses."""

from __future__ import annotations

import pytest
from hubsim_clients import HUB_HOST, device_uri, new_key, sas_token

from gateway.hubsim import propbag
from gateway.hubsim.amqp_server import classify, split_address
from gateway.hubsim.mqtt_topics import classify_publish, classify_subscription, username_ok
from gateway.hubsim.records import Recorder
from gateway.hubsim.sas import parse_token, resource_covers, signature_ok
from gateway.hubsim.state import HubState

VECTOR_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
VECTOR_TOKEN = (
    "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdevice1"
    "&sig=gFSfLGMXDOvf906%2FiaX3KwzLLNFHgaFZyCbsGjxtd1Y%3D&se=1700000000"
)


def state(devices: dict[str, str], now: float, skew: float = 0) -> HubState:
    return HubState(HUB_HOST, devices, {"device": VECTOR_KEY}, Recorder(), skew, clock=lambda: now)


def test_reference_vector_verifies() -> None:
    token = parse_token(VECTOR_TOKEN)
    assert token.expiry == 1700000000
    assert signature_ok(token, VECTOR_KEY)
    assert not signature_ok(token, new_key())
    # The lower-case encoding is signed as sent, never re-encoded.
    lower = parse_token(
        "SharedAccessSignature sr=myhub.azure-devices.net%2fdevices%2fdevice1"
        "&sig=iIyvul1z7xsjQDMXvGvUxZi%2BlqnXkFn5lOgyNrICYDM%3D&se=1700000000"
    )
    assert signature_ok(lower, VECTOR_KEY)


def test_check_token_statuses() -> None:
    hub = state({"device1": VECTOR_KEY}, now=1699999000)
    assert hub.check_token(VECTOR_TOKEN, f"{HUB_HOST}/devices/device1").status == 200
    assert hub.check_token(VECTOR_TOKEN, f"amqps://{HUB_HOST}/devices/device1").identity == "device1"
    expired = state({"device1": VECTOR_KEY}, now=1700000001)
    assert expired.check_token(VECTOR_TOKEN, f"{HUB_HOST}/devices/device1").description == "token expired"
    assert state({"device1": VECTOR_KEY}, now=1700000001, skew=300).check_token(
        VECTOR_TOKEN, f"{HUB_HOST}/devices/device1"
    ).status == 200
    forged = VECTOR_TOKEN.replace("gFSf", "gFSe")
    assert hub.check_token(forged, f"{HUB_HOST}/devices/device1").status == 401
    assert hub.check_token(VECTOR_TOKEN, f"{HUB_HOST}/devices/other").status == 404
    assert hub.check_token(VECTOR_TOKEN, "otherhub.azure-devices.net/devices/device1").status == 404
    assert hub.check_token("garbage", f"{HUB_HOST}/devices/device1").status == 401
    assert hub.check_token(VECTOR_TOKEN, f"{HUB_HOST}/nodes/x").status == 400
    assert hub.put_token("put-token", "jwt", f"{HUB_HOST}/devices/device1", VECTOR_TOKEN).status == 400
    assert hub.put_token("delete-token", "servicebus.windows.net:sastoken", "x", VECTOR_TOKEN).status == 400


def test_token_scope_and_policies() -> None:
    key, mod_key = new_key(), new_key()
    hub = state({"d1": key, "d1/m1": mod_key, "d10": key}, now=0)
    # A token for d1 does not cover d10 (segment prefix), nor the module (its own key).
    assert hub.check_token(sas_token(device_uri("d1"), key, 100), device_uri("d10")).status == 401
    assert hub.check_token(sas_token(device_uri("d1"), key, 100), device_uri("d1/m1")).status == 401
    assert hub.check_token(sas_token(device_uri("d1/m1"), mod_key, 100), device_uri("d1/m1")).status == 200
    policy = sas_token(device_uri("d1"), VECTOR_KEY, 100, policy="device")
    assert hub.check_token(policy, device_uri("d1")).identity == "d1"
    assert hub.check_token(sas_token(device_uri("d1"), key, 100, policy="nope"), device_uri("d1")).status == 401
    assert resource_covers(f"{HUB_HOST.upper()}/devices", f"{HUB_HOST}/devices/d1")
    assert not resource_covers(f"{HUB_HOST}/devices/d1", f"{HUB_HOST}/devices/d10")


def test_property_bag() -> None:
    bag = propbag.decode("$.ct=application%2Fjson&%24.ce=utf-8&p=a%20b&flag&empty=")
    assert bag == {"$.ct": "application/json", "$.ce": "utf-8", "p": "a b", "flag": None, "empty": ""}
    assert propbag.encode({"$.mid": "m/1", "k": "a b"}) == "%24.mid=m%2F1&k=a%20b"
    assert propbag.decode(propbag.encode({"x&y": "1=2", "n": None})) == {"x&y": "1=2", "n": None}


@pytest.mark.parametrize(
    ("topic", "kind"),
    [
        ("devices/d1/messages/events/", "d2c"),
        ("devices/d1/messages/events/a=1", "d2c"),
        ("devices/d1/messages/events", "d2c"),
        ("$iothub/twin/GET/?$rid=1", "twin_get"),
        ("$iothub/twin/PATCH/properties/reported/?$rid=2", "twin_patch"),
        ("$iothub/methods/res/200/?$rid=3", "method_res"),
        ("devices/d2/messages/events/", None),
        ("devices/d1/messages/devicebound/", None),
        ("$iothub/twin/GET/", None),
        ("$iothub/methods/res/ok/?$rid=3", None),
        ("random/topic", None),
    ],
)
def test_publish_topics(topic: str, kind: str | None) -> None:
    route = classify_publish(topic, "d1")
    assert (route.kind if route else None) == kind


def test_publish_topics_of_modules_and_subscriptions() -> None:
    assert classify_publish("devices/d1/modules/m1/messages/events/", "d1/m1") is not None
    assert classify_publish("devices/d1/messages/events/", "d1/m1") is None
    assert classify_publish("$iothub/methods/res/404/?$rid=9", "d1").status == 404  # type: ignore[union-attr]
    assert classify_subscription("devices/d1/messages/devicebound/#", "d1") == "c2d"
    assert classify_subscription("devices/d2/messages/devicebound/#", "d1") is None
    assert classify_subscription("$iothub/twin/res/#", "d1") == "twin_res"
    assert classify_subscription("$iothub/#", "d1") is None
    assert classify_subscription("#", "d1") is None
    assert username_ok(f"{HUB_HOST}/d1/?api-version=2021-04-12&DeviceClientType=x", HUB_HOST, "d1")
    assert username_ok(f"{HUB_HOST}/d1/m1/?api-version=2021-04-12", HUB_HOST, "d1/m1")
    assert not username_ok(f"{HUB_HOST}/d2/?api-version=2021-04-12", HUB_HOST, "d1")
    assert not username_ok("otherhub.azure-devices.net/d1/?api-version=1", HUB_HOST, "d1")


def test_amqp_addresses() -> None:
    assert classify(split_address(f"amqps://{HUB_HOST}:5671/devices/d1/messages/events")) == ("events", "d1")  # type: ignore[arg-type]
    assert classify(split_address("/devices/d%2F1/messages/deviceBound")) == ("devicebound", "d/1")  # type: ignore[arg-type]
    assert classify(split_address("devices/d1/modules/m1/twin")) == ("twin", "d1/m1")  # type: ignore[arg-type]
    assert classify(split_address("/devices/d1/methods/devicebound")) == ("methods", "d1")  # type: ignore[arg-type]
    assert classify(split_address("$cbs")) == ("cbs", None)  # type: ignore[arg-type]
    assert classify(split_address("/messages/serviceBound/feedback")) == ("feedback", None)  # type: ignore[arg-type]
    assert classify(split_address("/devices/d1/messages")) is None  # type: ignore[arg-type]
