"""uamqp (PyPI), i.e. uamqp-c, the Azure IoT C SDK's AMQP stack, through the gateway.

uamqp authenticates with SASL MSSBCBS and a CBS put-token; before the listeners
offered MSSBCBS it could not log in through the gateway at all.
"""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from proton import Message, symbol

from tests.acceptance.gateway_proc import wait_until
from tests.amqp.test_sasl import SASL_HEADER, decode_sasl_frames, sasl_frame

from .harness import AMQPS_PORT, SDK_DIR, DeviceProcess, SdkStack, start_stack

IDENTITIES = ["uamqp-d2c", "uamqp-c2d", "uamqp-refused"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdkStack]:
    yield from start_stack(tmp_path_factory.mktemp("sdk-uamqp"), IDENTITIES)


def run_uamqp(sdk_py: Path, stack: SdkStack, identity: str, **spec: object) -> DeviceProcess:
    return DeviceProcess.start(
        [str(sdk_py), str(SDK_DIR / "uamqp_device.py")],
        stack.device_spec(identity, **spec),
        name=f"uamqp {identity}",
    )


def test_d2c_with_cbs_token_arrives_bit_for_bit(sdk_py: Path, stack: SdkStack) -> None:
    bodies = [b"\x00\x01binary\xff", "grüße".encode(), b"x" * 20000]
    messages = [
        {
            "body": base64.b64encode(body).decode(),
            "properties": {"message_id": f"msg-{i}", "correlation_id": f"corr-{i}",
                           "content_type": "application/octet-stream"},
            "app": {"temperature": "21.5", "seq": str(i), "ünicode": "wert"},
        }  # fmt: skip
        for i, body in enumerate(bodies)
    ]
    device = run_uamqp(sdk_py, stack, "uamqp-d2c", scenario="d2c", messages=messages)
    try:
        sent = [device.expect("sent") for _ in messages]
        device.finish()
    finally:
        device.close()
    records = stack.hub.recorder.d2c_for("uamqp-d2c")
    assert len(records) == len(messages)
    for record, out, body in zip(records, sent, bodies, strict=True):
        # The hub got exactly the message uamqp encoded, and accepted it.
        assert record.raw == base64.b64decode(out["encoded"])
        assert record.body == body
        assert out["state"] == "MessageState.SendComplete"  # the hub's accepted, relayed
        decoded = Message()
        decoded.decode(record.raw)
        assert decoded.properties == {"temperature": "21.5", "seq": str(out["index"]),
                                      "ünicode": "wert"}  # fmt: skip
    statuses = [c.status for c in stack.hub.recorder.cbs if c.device_id == "uamqp-d2c"]
    assert statuses and set(statuses) == {200}
    assert "SASL negotiation failed" not in stack.gateway.log()


def test_c2d_accept_reject_release(sdk_py: Path, stack: SdkStack) -> None:
    hub = stack.hub
    device = run_uamqp(sdk_py, stack, "uamqp-c2d", scenario="c2d", count=3)
    try:
        device.expect("ready")
        sent = {}
        for action in ("accept", "reject", "release"):
            body = f"{action} body \x00\xff".encode("latin-1")
            mid = hub.send_c2d(
                "uamqp-c2d", body,
                properties={"message_id": f"{action}-1", "correlation_id": f"corr-{action}",
                            "content_type": "application/json"},
                app_properties={"kind": action, "n": "1"},
            )  # fmt: skip
            sent[mid] = body
        got = [device.expect("c2d") for _ in range(4)]  # the released one comes back
        device.expect("settled")
        # The hub's word: completed, dead-lettered, released then redelivered and completed.
        hub.recorder.wait_for(lambda: len(hub.recorder.feedback) >= 3, timeout=60)
        device.send({"command": "close"})
        device.finish()
    finally:
        device.close()
    by_id = {g["message_id"]: g for g in got if g["action"] != "release"}
    for mid, body in sent.items():
        assert base64.b64decode(by_id[mid]["body"]) == body
        assert by_id[mid]["app"] == {"kind": mid.split("-")[0], "n": "1"}
        assert by_id[mid]["correlation_id"] == f"corr-{mid.split('-')[0]}"
        assert by_id[mid]["content_type"] == "application/json"
    released = [g for g in got if g["message_id"] == "release-1"]
    assert [(g["action"], g["delivery_count"]) for g in released] == [("release", 0), ("accept", 1)]
    outcomes = [(d.message_id, d.outcome) for d in hub.recorder.dispositions
                if d.device_id == "uamqp-c2d"]  # fmt: skip
    assert outcomes == [("accept-1", "accepted"), ("reject-1", "rejected"),
                        ("release-1", "released"), ("release-1", "accepted")]  # fmt: skip
    feedback = {(f.message_id, f.status) for f in hub.recorder.feedback if f.device_id == "uamqp-c2d"}
    assert feedback == {("accept-1", "Success"), ("reject-1", "Rejected"), ("release-1", "Success")}


def _sasl_exchange(stack: SdkStack, mechanism: str) -> list:
    """A TLS client that asks the gateway for `mechanism`; returns the SASL frames it got."""
    ctx = ssl.create_default_context(cafile=str(stack.ca_file))
    with socket.create_connection((stack.address, AMQPS_PORT), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname=stack.address) as tls:
            tls.sendall(SASL_HEADER)
            tls.sendall(sasl_frame(0x41, [symbol(mechanism), b"", None]))
            data = b""
            while True:  # until the gateway closes: header, mechanisms, outcome
                chunk = tls.recv(4096)
                if not chunk:
                    break
                data += chunk
    return decode_sasl_frames(data)


def test_unknown_mechanism_is_refused_with_outcome_auth_and_one_log_line(
    sdk_py: Path, stack: SdkStack
) -> None:
    before = stack.gateway.metric_sum("iotgw_device_connections_refused_total", reason="sasl")
    frames = _sasl_exchange(stack, "SCRAM-SHA-1")
    assert frames[0] == ("header", SASL_HEADER)
    assert list(frames[1][2][0]) == ["MSSBCBS", "ANONYMOUS", "PLAIN"]  # offered, in this order
    assert (frames[2][1], frames[2][2][0]) == (0x44, 1)  # sasl-outcome, code auth
    lines = wait_until(
        lambda: [ln for ln in stack.gateway.log().splitlines() if "SCRAM-SHA-1" in ln],
        timeout=30, what="the SASL failure log line",
    )  # fmt: skip
    assert len(lines) == 1
    assert "SASL negotiation failed" in lines[0]
    assert "offered MSSBCBS, ANONYMOUS, PLAIN" in lines[0]
    stack.gateway.wait_metric(
        "iotgw_device_connections_refused_total", lambda v: v == before + 1, timeout=30,
        reason="sasl",
    )  # fmt: skip
    # Other devices carry on: uamqp logs in and delivers right after.
    device = run_uamqp(sdk_py, stack, "uamqp-refused", scenario="d2c",
                       messages=[{"body": base64.b64encode(b"after").decode()}])  # fmt: skip
    try:
        device.expect("sent")
        device.finish()
    finally:
        device.close()
    assert [r.body for r in stack.hub.recorder.d2c_for("uamqp-refused")] == [b"after"]


@pytest.fixture(scope="module")
def stack_without_mssbcbs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdkStack]:
    yield from start_stack(tmp_path_factory.mktemp("sdk-uamqp-nocbs"), ["uamqp-nocbs"],
                           amqp_listener_extra=", sasl: [anonymous, plain]")  # fmt: skip


def test_listener_without_mssbcbs_says_why_uamqp_left(
    sdk_py: Path, stack_without_mssbcbs: SdkStack
) -> None:
    # The failure this feature fixes, kept visible: uamqp-c finds no MSSBCBS and
    # closes without a sasl-init; the gateway now says so in one line.
    stack = stack_without_mssbcbs
    device = run_uamqp(sdk_py, stack, "uamqp-nocbs", scenario="d2c",
                       messages=[{"body": base64.b64encode(b"never").decode()}])  # fmt: skip
    try:
        with pytest.raises(AssertionError, match="uamqp uamqp-nocbs: "):
            device.expect("sent")
    finally:
        device.close()
    lines = wait_until(
        lambda: [ln for ln in stack.gateway.log().splitlines() if "SASL negotiation failed" in ln],
        timeout=30, what="the SASL failure log line",
    )  # fmt: skip
    assert "without choosing a mechanism" in lines[0]
    assert "offered ANONYMOUS, PLAIN" in lines[0]
    assert stack.hub.recorder.d2c_for("uamqp-nocbs") == []


@pytest.fixture(scope="module")
def stack_reply_first(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdkStack]:
    for stack in start_stack(tmp_path_factory.mktemp("sdk-uamqp-replyfirst"), ["uamqp-rf"]):
        stack.hub.amqp_reply_before_settle = True
        yield stack


def test_cbs_reply_before_settlement_still_reaches_uamqp_after_it(
    sdk_py: Path, stack_reply_first: SdkStack
) -> None:
    # A hub that writes the put-token reply before the request's disposition (as
    # proton-based servers do): uamqp-c would fail the put-token if the reply came
    # first, so the gateway relays the outcome before the reply. Several connections
    # in a row, since the order on the wire is a race without that.
    stack = stack_reply_first
    for attempt in range(4):
        device = run_uamqp(sdk_py, stack, "uamqp-rf", scenario="d2c",
                           messages=[{"body": base64.b64encode(b"rf%d" % attempt).decode()}])  # fmt: skip
        try:
            device.expect("sent")
            device.finish()
        finally:
            device.close()
    assert [r.body for r in stack.hub.recorder.d2c_for("uamqp-rf")] == [b"rf0", b"rf1", b"rf2", b"rf3"]
    assert {c.status for c in stack.hub.recorder.cbs if c.device_id == "uamqp-rf"} == {200}
