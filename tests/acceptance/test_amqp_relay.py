"""AMQP through `iot-gateway run`, between our own proton devices and our own proton TLS hub.

The gateway runs with the documented config shape: a plaintext AMQP listener, a TLS
connector (ca_file + server_name), link routes `$cbs` and `devices/` in both directions,
default pool sizes (so upstream connections are shared and `$cbs` is served by the
gateway). Everything is asserted on what our hub recorded, not on the gateway's word.
"""

from __future__ import annotations

import uuid

import pytest
from proton import Condition, Delivery, Message, int32, symbol, timestamp, ulong
from proton.utils import LinkDetached

from tests.waiting import FAILSAFE

from .amqp_devices import (
    ProtonDevice,
    message_sections,
    put_token_request,
    sample_messages,
)
from .conftest import HUB_SERVER_NAME, AmqpStack
from .raw_amqp import ACCEPTED, BATCH_FORMAT, RawAmqpClient

pytestmark = pytest.mark.timeout(600)

CLIENT_PROPS = {
    symbol("com.microsoft:client-version"): "acceptance/1.0",
    symbol("com.microsoft:api-version"): "2020-09-30",
}


def test_upstream_open_uses_server_name_and_gateway_id(amqp_stack: AmqpStack) -> None:
    with ProtonDevice(amqp_stack.port, "open-check") as dev:
        dev.put_token()
    opens = amqp_stack.hub.opens
    assert opens, "the hub saw no AMQP open"
    assert opens[0]["hostname"] == HUB_SERVER_NAME
    assert opens[0]["container"] == "acceptance-gw"


def test_cbs_put_token_reply_reaches_the_device(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub
    token = (
        "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fcbs1&sig=abc%3D&se=4102444800"
    )
    request = put_token_request("cbs1", token, message_id=7)
    request.properties["expiration"] = timestamp(4102444800000)
    with ProtonDevice(amqp_stack.port, "cbs1") as dev:
        dev.open_cbs()
        reply, encoded = dev.send_cbs_request(request)
        assert reply.correlation_id == ulong(7)
        # The hub's reply application-properties reach the device with their AMQP types.
        assert message_sections(dev.last_reply_raw)[0x74] == {
            "status-code": int32(200),
            "status-description": "OK",
        }
        assert type(message_sections(dev.last_reply_raw)[0x74]["status-code"]) is int32
    at_hub = [r for r in hub.received if r.address == "$cbs" and token.encode() in r.data][-1]
    sent, got = message_sections(encoded), message_sections(at_hub.data)
    # Token, audience, type, operation and expiration pass unchanged, types included.
    assert got[0x74] == sent[0x74]
    assert {k: type(v) for k, v in got[0x74].items()} == {k: type(v) for k, v in sent[0x74].items()}
    assert got[0x77] == sent[0x77] == token


def test_d2c_1000_messages_arrive_byte_identical_in_order(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub
    messages = sample_messages(1000)
    with ProtonDevice(amqp_stack.port, "bulk1") as dev:
        dev.put_token()
        snd = dev.sender("devices/bulk1/messages/events", name="telemetry", properties=CLIENT_PROPS)
        tags = [b"tag-%d" % i for i in range(len(messages))]
        deliveries = [dev.send_raw(snd, m, tag) for m, tag in zip(messages, tags, strict=True)]
        dev.wait_settled(deliveries, timeout=60)
        assert {d.remote_state for d in deliveries} == {Delivery.ACCEPTED}
    received = hub.messages_on("devices/bulk1/")
    assert len(received) == len(messages)
    for i, (rec, sent) in enumerate(zip(received, messages, strict=True)):
        assert rec.data == sent, f"message {i} differs at the hub"
    assert [r.tag for r in received] == tags
    assert not any(r.remote_settled for r in received), "the gateway pre-settled a delivery"
    attach = next(
        a for a in hub.attaches if a.target and a.target.endswith("bulk1/messages/events")
    )
    assert attach.properties == CLIENT_PROPS
    assert attach.target == "devices/bulk1/messages/events"


def test_batch_message_format_and_footer_relayed_unchanged(amqp_stack: AmqpStack) -> None:
    """message-format 0x80013700 (SDK batches) and bytes the gateway must never parse."""
    hub = amqp_stack.hub
    from proton import Data, Described

    parts = []
    for i in range(3):
        inner = Message(body=f"part {i}".encode(), properties={"i": i})
        inner.inferred = True
        data = Data()
        data.put_object(Described(ulong(0x75), inner.encode()))
        parts.append(bytes(data.encode()))
    footer = Data()
    footer.put_object(Described(ulong(0x78), {symbol("x-opt-footer"): "f"}))
    payload = b"".join(parts) + bytes(footer.encode())
    before = len(hub.transfer_formats)
    client = RawAmqpClient(amqp_stack.port)
    try:
        client.handshake()
        reply = client.put_token("batch1")
        assert reply.properties["status-code"] == 200
        client.attach(
            2,
            "batch-sender",
            receiver=False,
            source="batch-src",
            target="/devices/batch1/messages/events",
        )
        client.wait_credit(2)
        tag = b"\xde\xad\xbe\xef\x00\x80\xff"
        client.transfer(2, 1, tag, payload, message_format=BATCH_FORMAT)
        disposition = client.wait_disposition(1)
        assert disposition.fields[3] is True
        assert int(disposition.fields[4].descriptor) == ACCEPTED
    finally:
        client.close()
    rec = hub.messages_on("devices/batch1/")[-1]
    assert rec.data == payload
    assert rec.tag == tag
    assert BATCH_FORMAT in hub.transfer_formats[before:]


def test_c2d_bytes_and_each_outcome_reach_the_hub(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub
    payloads = sample_messages(5)[:4]
    with ProtonDevice(amqp_stack.port, "c2d1") as dev:
        dev.put_token()
        _rcv, collector = dev.receiver("devices/c2d1/messages/devicebound", name="c2d", credit=10)
        tags = [hub.send_c2d("c2d1", p) for p in payloads]
        dev.wait_incoming(collector, 4)
        items = list(collector.incoming)
        assert [i.data for i in items] == payloads
        assert [i.tag for i in items] == tags
        assert not any(i.settled_by_sender for i in items)
        outcomes = [Delivery.ACCEPTED, Delivery.REJECTED, Delivery.RELEASED, Delivery.MODIFIED]
        for item, outcome in zip(items, outcomes, strict=True):
            condition = (
                Condition("amqp:precondition-failed", "bad command")
                if outcome == Delivery.REJECTED
                else None
            )
            dev.settle_incoming(item, outcome, condition)
        dev.wait(
            lambda: len([o for o in hub.outcomes if o.tag in tags]) == 4, what="hub saw 4 outcomes"
        )
    by_tag = {o.tag: o for o in hub.outcomes if o.tag in tags}
    assert [by_tag[t].state for t in tags] == outcomes
    assert by_tag[tags[1]].condition == "amqp:precondition-failed"
    assert all(o.settled for o in by_tag.values())


def test_two_devices_with_identical_link_names_reply_to_and_message_ids(
    amqp_stack: AmqpStack,
) -> None:
    hub = amqp_stack.hub
    payloads = {d: sample_messages(40)[i::2] for i, d in enumerate(("twin-a", "twin-b"))}
    devices = {d: ProtonDevice(amqp_stack.port, d) for d in payloads}
    try:
        for dev in devices.values():
            dev.open_cbs(sender_name="$cbs-sender", receiver_name="$cbs-receiver", reply_to="cbs")
        replies = {d: dev.put_token(message_id=0)[0] for d, dev in devices.items()}
        for reply in replies.values():
            assert reply.correlation_id == ulong(0)
            assert reply.properties["status-code"] == 200
        senders = {
            d: dev.sender(f"devices/{d}/messages/events", name="sender-link")
            for d, dev in devices.items()
        }
        deliveries = {d: [] for d in devices}
        for i in range(20):
            for d, dev in devices.items():
                deliveries[d].append(dev.send_raw(senders[d], payloads[d][i], b"same-tag-%d" % i))
        for d, dev in devices.items():
            dev.wait_settled(deliveries[d])
            # No CBS reply meant for the other device arrived here.
            assert not dev.cbs_replies.incoming
    finally:
        for dev in devices.values():
            dev.close()
    for d in devices:
        assert [r.data for r in hub.messages_on(f"devices/{d}/")] == payloads[d]
    names = [(a.conn, a.name) for a in hub.attaches if a.target and "/twin-" in a.target]
    assert len(set(names)) == len(names) == 2, f"upstream link names collide: {names}"


def test_device_settled_only_after_the_hub_settles(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub
    hub.d2c_policy = lambda rec: "hold" if rec.address.startswith("devices/held1/") else "accept"
    try:
        with ProtonDevice(amqp_stack.port, "held1") as dev:
            dev.put_token()
            snd = dev.sender("devices/held1/messages/events", name="held")
            deliveries = [dev.send_raw(snd, m) for m in sample_messages(3)]
            dev.wait(lambda: len(hub.messages_on("devices/held1/")) == 3, what="hub received 3")
            dev.pump(0.5)
            assert not any(d.settled for d in deliveries), "settled before the hub settled"
            assert all(d.remote_state == 0 for d in deliveries)
            condition = Condition("amqp:resource-limit-exceeded", "quota")
            assert hub.settle_held(Delivery.REJECTED, condition) == 3
            dev.wait_settled(deliveries)
            assert {d.remote_state for d in deliveries} == {Delivery.REJECTED}
            assert {d.remote.condition.name for d in deliveries} == {"amqp:resource-limit-exceeded"}
    finally:
        hub.d2c_policy = lambda rec: "accept"


def test_attach_for_an_identity_without_a_token_is_refused(amqp_stack: AmqpStack) -> None:
    with (
        ProtonDevice(amqp_stack.port, "ident1") as dev,
        ProtonDevice(amqp_stack.port, "ident2") as other,
    ):
        other.put_token()  # ident2 is authorised on (probably) the same upstream connection
        dev.put_token()
        with pytest.raises(LinkDetached) as info:
            dev.sender("devices/ident2/messages/events", name="steal")
        assert info.value.condition == "amqp:unauthorized-access"
        # The device's own identity still works after the refusal.
        snd = dev.sender("devices/ident1/messages/events", name="own")
        dlv = dev.send_raw(snd, sample_messages(1)[0])
        dev.wait_settled([dlv])
        assert dlv.remote_state == Delivery.ACCEPTED


def test_unrouted_address_is_refused_with_not_found(amqp_stack: AmqpStack) -> None:
    with ProtonDevice(amqp_stack.port, "unrouted") as dev:
        with pytest.raises(LinkDetached) as info:
            dev.sender("queues/elsewhere", name="nowhere")
        assert info.value.condition == "amqp:not-found"


def test_hub_connection_loss_detaches_device_links_and_leaves_deliveries_unsettled(
    amqp_stack: AmqpStack,
) -> None:
    hub = amqp_stack.hub
    hub.d2c_policy = lambda rec: "hold" if rec.address.startswith("devices/lost1/") else "accept"
    try:
        with ProtonDevice(amqp_stack.port, "lost1") as dev:
            dev.put_token()
            snd = dev.sender("devices/lost1/messages/events", name="lost")
            deliveries = [dev.send_raw(snd, m) for m in sample_messages(2)]
            dev.wait(lambda: len(hub.messages_on("devices/lost1/")) == 2, what="hub received 2")
            with hub.lock:
                hub.held.clear()
            hub.close_all_connections()
            with pytest.raises(LinkDetached) as info:
                dev.wait(lambda: False, timeout=FAILSAFE, what="link detached after hub loss")
            assert info.value.condition is not None, "link detached without an error"
            assert not any(d.settled for d in deliveries), "settled though the hub never settled"
    finally:
        hub.d2c_policy = lambda rec: "accept"
    # The gateway reconnects on demand for the next device.
    with ProtonDevice(amqp_stack.port, "after-loss") as dev:
        reply, _ = dev.put_token()
        assert reply.properties["status-code"] == 200
        snd = dev.sender("devices/after-loss/messages/events", name="again")
        dlv = dev.send_raw(snd, b"\x00Sw\xa1\x05again")
        dev.wait_settled([dlv], timeout=FAILSAFE)
        assert dlv.remote_state == Delivery.ACCEPTED


@pytest.mark.parametrize(
    "message_id",
    [uuid.UUID("12345678-1234-5678-1234-567812345678"), "string-id-1", ulong(0), b"binary-id"],
    ids=["uuid", "string", "ulong", "binary"],
)
def test_cbs_reply_correlation_id_keeps_the_devices_message_id(
    amqp_stack: AmqpStack, message_id: object
) -> None:
    device_id = f"corr-{type(message_id).__name__}"
    with ProtonDevice(amqp_stack.port, device_id) as dev:
        reply, _ = dev.put_token(message_id=message_id)
        assert reply.properties["status-code"] == 200
        # Same value and same AMQP type on the wire (proton's decoder keeps the type).
        correlation_id = message_sections(dev.last_reply_raw)[0x73][5]
        assert correlation_id == message_id
        assert type(correlation_id) is type(message_id)


def test_cbs_without_reply_to_like_the_c_sdk(amqp_stack: AmqpStack) -> None:
    """The C SDK sends put-token with no reply-to; its receiver has source = target = $cbs."""
    with ProtonDevice(amqp_stack.port, "csdk1") as dev:
        dev.open_cbs(
            sender_name="$cbs-sender",
            receiver_name="$cbs-receiver",
            reply_to=None,
            receiver_target="$cbs",
        )
        reply, _ = dev.put_token(message_id=0)
        assert reply.correlation_id == ulong(0)
        assert reply.properties["status-code"] == 200
        snd = dev.sender("devices/csdk1/messages/events", name="telemetry")
        dlv = dev.send_raw(snd, sample_messages(1)[0])
        dev.wait_settled([dlv])
        assert dlv.remote_state == Delivery.ACCEPTED


def test_refused_token_does_not_authorise_the_identity(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub
    hub.cbs_status = 401
    try:
        with ProtonDevice(amqp_stack.port, "denied1") as dev:
            reply, _ = dev.put_token()
            assert reply.properties["status-code"] == 401
            with pytest.raises(LinkDetached) as info:
                dev.sender("devices/denied1/messages/events", name="telemetry")
            assert info.value.condition == "amqp:unauthorized-access"
    finally:
        hub.cbs_status = 200


def test_many_devices_put_tokens_at_once_each_gets_its_own_reply(amqp_stack: AmqpStack) -> None:
    devices = [ProtonDevice(amqp_stack.port, f"crowd{i}") for i in range(30)]
    try:
        for dev in devices:
            dev.open_cbs(sender_name="cbs-sender", receiver_name="cbs-receiver", reply_to="cbs")
        sent = []
        for dev in devices:
            assert dev.cbs_sender is not None
            request = put_token_request(dev.device_id, f"token-for-{dev.device_id}", message_id=0)
            sent.append(dev.send_raw(dev.cbs_sender, request.encode()))
        for dev in devices:
            dev.wait_incoming(dev.cbs_replies, 1)
            reply = Message()
            reply.decode(dev.cbs_replies.incoming.popleft().data)
            assert reply.correlation_id == ulong(0)
            assert reply.properties["status-code"] == 200
        for dev in devices:
            dev.pump(0.01)
            assert not dev.cbs_replies.incoming, f"{dev.device_id} got a second reply"
        hub_tokens = {r.message.body for r in amqp_stack.hub.cbs_requests}
        assert {f"token-for-crowd{i}" for i in range(30)} <= hub_tokens
    finally:
        for dev in devices:
            dev.close()
