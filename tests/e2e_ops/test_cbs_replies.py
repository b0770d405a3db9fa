"""CBS replies a device gets from the gateway, read by python-qpid-proton.

- A put-token the gateway cannot forward (hub unreachable, pool full) is
  rejected if sent unsettled and, either way, answered with a CBS status reply
  (503 / 500, correlation-id = the request's message-id) on the device's CBS
  receiver, so SDKs waiting for a status get one.
- A hub reply whose `to` names the gateway's reply link reaches the device with
  the device's own reply-to there, every other byte as the hub encoded it.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest
from proton import Delivery, Message
from proton.reactor import AtMostOnce

from gateway.amqp.types import ULong
from gateway.router.cbs import parse_reply, restore_reply
from tests.e2e_amqp.gw_helpers import (
    CBS_TYPE,
    TIMEOUT,
    Device,
    device_uri,
    gateway_config,
    in_thread,
    running_gateway,
    sas_token,
)

REPLY_TO = "cbs-reply-dev"


class _Hub:
    """Where a connector points when the hub is unreachable: a closed port."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.amqp_port = s.getsockname()[1]
        self.ca_file = Path(__file__)  # never read: no TLS connection gets that far


def put_token_unanswered_by_hub(url: str, device_id: str, key: str, *,
                                settled: bool) -> tuple[Message, object, str]:  # fmt: skip
    """Send one put-token without waiting for its settlement; return the reply, the
    request's remote state (None when sent settled) and its message-id."""
    dev = Device(url)
    try:
        dev.cbs_rx = dev.conn.create_receiver("$cbs", options=None, name="$cbs-receiver")
        dev.cbs_rx.link.target.address = REPLY_TO
        options = AtMostOnce() if settled else None
        dev.cbs_tx = dev.conn.create_sender("$cbs", name="$cbs-sender", options=options)
        message_id = str(uuid.uuid4())
        audience = device_uri(device_id)
        request = Message(
            id=message_id,
            reply_to=REPLY_TO,
            properties={"operation": "put-token", "type": CBS_TYPE, "name": audience},
            body=sas_token(audience, key),
        )
        delivery = dev.cbs_tx.link.send(request)
        reply = dev.cbs_rx.receive(timeout=TIMEOUT)
        if not settled:
            dev.conn.wait(lambda: delivery.remote_state is not None, timeout=TIMEOUT,
                          msg="waiting for the request's outcome")  # fmt: skip
        return reply, (None if settled else delivery.remote_state), message_id
    finally:
        dev.close()


@pytest.mark.parametrize("settled", [False, True], ids=["unsettled", "settled"])
async def test_hub_unreachable_put_token_gets_a_503_reply(tmp_path, settled: bool) -> None:
    config = gateway_config(_Hub(), tmp_path)
    async with running_gateway(config) as gw:
        reply, state, message_id = await in_thread(
            put_token_unanswered_by_hub, gw.url, "dev1", "a2V5" * 11, settled=settled
        )
    assert reply.correlation_id == message_id
    assert reply.address == REPLY_TO
    assert reply.properties["status-code"] == 503
    assert "iothub" in reply.properties["status-description"]
    assert state == (None if settled else Delivery.REJECTED)


async def test_pool_full_put_token_gets_a_500_reply(hub, keys, tmp_path) -> None:
    # One upstream connection for two devices: the third device finds the pool full.
    config = gateway_config(hub, tmp_path, max_connections=1, max_devices=2)
    async with running_gateway(config) as gw:
        first = await in_thread(Device, gw.url)
        second = await in_thread(Device, gw.url)
        try:
            for dev, name in ((first, "dev1"), (second, "dev2")):
                reply = await in_thread(dev.authenticate, name, keys[name])
                assert reply.properties["status-code"] == 200
            reply, state, message_id = await in_thread(
                put_token_unanswered_by_hub, gw.url, "dev3", keys["dev3"], settled=False
            )
        finally:
            await in_thread(first.close)
            await in_thread(second.close)
    assert reply.correlation_id == message_id
    assert reply.properties["status-code"] == 500
    assert "full" in reply.properties["status-description"]
    assert state == Delivery.REJECTED
    assert len(hub.recorder.cbs) == 2  # the third request never reached the hub


def test_a_reply_addressed_to_the_gateway_gets_the_device_reply_to_back() -> None:
    gateway_reply_to = "cbs-gw-test-1"
    hub_reply = Message(
        address=gateway_reply_to,
        correlation_id="gw-test:1:7",
        subject="kept",
        properties={"status-code": 200, "status-description": "OK"},
    )
    raw = hub_reply.encode()
    restored = restore_reply(parse_reply(raw), "device-msg-1", REPLY_TO, gateway_reply_to)
    got = Message()
    got.decode(restored)
    assert (got.address, got.correlation_id, got.subject) == (REPLY_TO, "device-msg-1", "kept")
    assert got.properties == {"status-code": 200, "status-description": "OK"}
    # The application-properties section (everything after properties) is the hub's bytes.
    assert restored.endswith(raw[raw.index(b"\x00\x53\x74") :])


def test_a_reply_addressed_elsewhere_keeps_its_to() -> None:
    hub_reply = Message(address="somewhere-else", correlation_id="gw-test:1:8",
                        properties={"status-code": 200})  # fmt: skip
    # A ulong message-id, as the C SDK counts them (decoded by the gateway as ULong).
    restored = restore_reply(parse_reply(hub_reply.encode()), ULong(5), REPLY_TO, "cbs-gw-test-1")
    got = Message()
    got.decode(restored)
    assert (got.address, got.correlation_id) == ("somewhere-else", 5)
