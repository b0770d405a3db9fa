"""uamqp (PyPI), i.e. uamqp-c, the Azure IoT C SDK's AMQP stack, through the gateway.

uamqp authenticates with SASL MSSBCBS and a CBS put-token; before the listeners
offered MSSBCBS it could not log in through the gateway at all.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from proton import Message

from .harness import SDK_DIR, DeviceProcess, SdkStack, start_stack

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
