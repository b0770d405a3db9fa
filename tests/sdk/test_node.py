"""The Azure IoT Node.js device SDK (azure-iot-device + -amqp / -mqtt) through the gateway.

Connection string with GatewayHostName (the gateway's TLS listeners on 5671 and
8883 of a loopback address of the test's own), D2C with properties, C2D
settled every way the transport allows, twin get / reported patch / desired
patch, and a direct method; as a device and as a module. Asserted at the hub.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    STEP_TIMEOUT,
    SdkStack,
    start_node,
    start_stack,
    wait_desired_watch,
    wait_methods_ready,
)

TRANSPORTS = ["amqp", "mqtt"]
IDENTITIES = [f"node-{t}" for t in TRANSPORTS] + [f"node-{t}-host/mod" for t in TRANSPORTS]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdkStack]:
    yield from start_stack(tmp_path_factory.mktemp("sdk-node"), IDENTITIES)


def d2c_messages(tag: str) -> list[dict[str, Any]]:
    bodies = [b"\x00\x01\x02binary\xff\xfe", json.dumps({"t": 21.5, "tag": tag}).encode(),
              "ünïcode ✓".encode()]  # fmt: skip
    return [
        {
            "body": base64.b64encode(body).decode(),
            "messageId": f"{tag}-m{i}",
            "correlationId": f"{tag}-c{i}",
            "contentType": "application/json",
            "contentEncoding": "utf-8",
            "app": {"seq": str(i), "alert": "high temp", "ünicode": "wert"},
        }
        for i, body in enumerate(bodies)
    ]


def assert_d2c_at_hub(stack: SdkStack, identity: str, transport: str,
                      sent: list[dict[str, Any]]) -> None:  # fmt: skip
    records = stack.hub.recorder.d2c_for(identity)
    assert len(records) == len(sent)
    for record, m in zip(records, sent, strict=True):
        assert record.protocol == transport
        assert record.body == base64.b64decode(m["body"])  # the payload, bit for bit
        props = record.properties
        for key, value in m["app"].items():
            assert props[key] == value
        if transport == "amqp":
            assert (props["message-id"], props["correlation-id"]) == (m["messageId"], m["correlationId"])
            assert (props["content-type"], props["content-encoding"]) == ("application/json", "utf-8")
            assert record.app_properties == m["app"]
        else:
            assert (props["$.mid"], props["$.cid"]) == (m["messageId"], m["correlationId"])
            assert (props["$.ct"], props["$.ce"]) == ("application/json", "utf-8")


def invoke(stack: SdkStack, identity: str, name: str, payload: Any) -> tuple[int, bytes]:
    # invoke_method blocks until the device answers: run it beside the script's reader.
    result: list[tuple[int, bytes]] = []
    t = threading.Thread(target=lambda: result.append(
        stack.hub.invoke_method(identity, name, payload, timeout=STEP_TIMEOUT)))  # fmt: skip
    t.start()
    t.join(STEP_TIMEOUT + 10)
    assert result, "invoke_method did not return"
    return result[0]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_device_d2c_c2d_twin_method(node_sdk: Path, stack: SdkStack, transport: str) -> None:
    identity = f"node-{transport}"
    hub = stack.hub
    # One C2D message at a time, the next once the hub has the previous one's outcome:
    # rhea (under the Node SDK) writes two different outcomes settled in the same tick
    # as one disposition range with the first one's outcome.
    actions = ["complete", "reject", "abandon"] if transport == "amqp" else ["complete"] * 3
    c2d = {}

    def send_c2d(i: int, action: str) -> None:
        mid = f"{action}-{i}"
        body = f"{action} {i} \x00\xff".encode("latin-1")
        hub.send_c2d(identity, body, properties={"message_id": mid, "correlation_id": f"corr-{i}",
                                                 "content_type": "text/plain"},
                     app_properties={"k": f"v{i}", "action": action})  # fmt: skip
        c2d[mid] = body

    def outcomes() -> list[tuple[str, str]]:
        return [(d.message_id, d.outcome) for d in hub.recorder.dispositions
                if d.device_id == identity]  # fmt: skip

    send_c2d(0, actions[0])  # queued at the hub: it arrives once the device listens
    sent = d2c_messages(identity)
    device = start_node(
        node_sdk, stack, identity, transport=transport, d2c=sent, c2d=len(actions),
        twin={"reported": {"firmware": "1.2.3", "nested": {"a": 1}}, "desired_key": "interval"},
        method="reboot",
    )  # fmt: skip
    try:
        with device.failing_with_transcript():
            opened = device.expect("open")
            for _ in sent:
                device.expect("sent")
            got = [device.expect("c2d")]
            for i, action in enumerate(actions[1:], start=1):
                hub.recorder.wait_for(lambda n=i: len(outcomes()) >= n, timeout=STEP_TIMEOUT)
                send_c2d(i, action)
                got.append(device.expect("c2d"))
            if transport == "amqp":
                got.append(device.expect("c2d"))  # the abandoned one, back again
            device.expect("c2d-done")
            twin = device.expect("twin")
            device.expect("reported")
            hub.recorder.wait_for(lambda: any(kind == "twin-reported" and what[0] == identity
                                              for kind, what in hub.recorder.events),
                                  timeout=STEP_TIMEOUT)  # fmt: skip
            device.expect("twin-ready")
            wait_desired_watch(hub, identity, transport)
            hub.update_desired(identity, {"interval": 30, "mode": "eco"})
            desired = device.expect("desired")
            device.expect("method-ready")
            wait_methods_ready(hub, identity, transport)
            status, response = invoke(stack, identity, "reboot", {"delay": 5, "why": "test"})
            device.expect("method")
            device.expect("settled")
            device.send({"command": "close"})
            device.finish()
    finally:
        device.close()

    assert_d2c_at_hub(stack, identity, transport, sent)
    # C2D: every body and property as the hub sent it; settled as the device chose.
    first = {g["messageId"]: g for g in reversed(got)}
    for mid, body in c2d.items():
        g = first[mid]
        assert base64.b64decode(g["body"]) == body
        i = mid.split("-")[1]
        assert g["app"] == {"k": f"v{i}", "action": mid.split("-")[0]}
        assert (g["correlationId"], g["contentType"]) == (f"corr-{i}", "text/plain")
    settled = sorted(outcomes())
    feedback = sorted((f.message_id, f.status) for f in hub.recorder.feedback if f.device_id == identity)
    if transport == "amqp":
        assert settled == [("abandon-2", "accepted"), ("abandon-2", "released"),
                            ("complete-0", "accepted"), ("reject-1", "rejected")]  # fmt: skip
        assert feedback == [("abandon-2", "Success"), ("complete-0", "Success"),
                            ("reject-1", "Rejected")]  # fmt: skip
    else:
        assert settled == [(mid, "puback") for mid in sorted(c2d)]
        assert feedback == [(mid, "Success") for mid in sorted(c2d)]
    # Twin: the reported patch landed, the desired patch reached the device.
    reported = hub.twin(identity)["reported"]
    assert reported["firmware"] == "1.2.3" and reported["nested"] == {"a": 1}
    assert isinstance(twin["desired"], dict)
    assert desired["patch"]["interval"] == 30 and desired["patch"]["mode"] == "eco"
    # Direct method: the payload reached the device, its answer the hub.
    assert status == 200
    assert json.loads(response) == {"echo": {"delay": 5, "why": "test"}, "method": "reboot"}
    if transport == "amqp":
        assert_amqp_link_properties(stack, f"devices/{identity}", opened["apiVersion"])


def assert_amqp_link_properties(stack: SdkStack, path: str, api_version: str) -> None:
    """Twin and method links reached the hub with the SDK's attach properties intact:
    its api-version, and one channel-correlation-id per channel ("twin:<uuid>",
    "methods:<uuid>") shared by that channel's sender and receiver."""
    for channel, suffix in (("twin", "/twin"), ("methods", "/methods/devicebound")):
        links = [link for link in stack.hub.recorder.links
                 if link.accepted and (link.address or "").endswith(path + suffix)]  # fmt: skip
        assert {link.role for link in links} == {"sender", "receiver"}, channel
        props = [{str(k): v for k, v in link.properties.items()} for link in links]
        assert {p["com.microsoft:api-version"] for p in props} == {api_version}
        ids = {p["com.microsoft:channel-correlation-id"] for p in props}
        assert len(ids) == 1 and ids.pop().startswith(channel + ":"), ids


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_module_d2c_twin_method(node_sdk: Path, stack: SdkStack, transport: str) -> None:
    """A module identity (ModuleId in the connection string): devices/{id}/modules/{mid}/..."""
    identity = f"node-{transport}-host/mod"
    hub = stack.hub
    sent = d2c_messages("module")
    device = start_node(
        node_sdk, stack, identity, transport=transport, d2c=sent,
        twin={"reported": {"module": "ok"}, "desired_key": "level"}, method="configure",
    )  # fmt: skip
    try:
        with device.failing_with_transcript():
            opened = device.expect("open")
            for _ in sent:
                device.expect("sent")
            device.expect("twin")
            device.expect("reported")
            device.expect("twin-ready")
            wait_desired_watch(hub, identity, transport)
            hub.update_desired(identity, {"level": 3})
            desired = device.expect("desired")
            device.expect("method-ready")
            wait_methods_ready(hub, identity, transport)
            status, response = invoke(stack, identity, "configure", [1, 2, 3])
            device.expect("method")
            device.expect("settled")
            device.send({"command": "close"})
            device.finish()
    finally:
        device.close()
    assert_d2c_at_hub(stack, identity, transport, sent)
    assert hub.twin(identity)["reported"]["module"] == "ok"
    assert desired["patch"]["level"] == 3
    assert status == 200 and json.loads(response)["echo"] == [1, 2, 3]
    if transport == "amqp":
        assert_amqp_link_properties(stack, "devices/node-amqp-host/modules/mod", opened["apiVersion"])
        events = {link.address for link in hub.recorder.links if link.device_id == identity}
        assert any(a.endswith("devices/node-amqp-host/modules/mod/messages/events") for a in events)
    else:
        assert hub.recorder.d2c_for(identity)[0].topic.startswith(
            "devices/node-mqtt-host/modules/mod/messages/events/"
        )
