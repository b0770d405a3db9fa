"""Link-routing semantics where link routers break: credit, detach errors, refusals,
address forms, frame sizes, SASL PLAIN devices, device loss.

Same setup as test_amqp_relay: `iot-gateway run`, our proton devices, our proton TLS hub.
"""

from __future__ import annotations

import pytest
from proton import Condition, Delivery, Link, symbol
from proton.utils import LinkDetached

from tests.waiting import FAILSAFE

from .amqp_devices import HUB_HOST, ProtonDevice, sample_messages
from .conftest import AmqpStack
from .gateway_proc import wait_until

pytestmark = pytest.mark.timeout(600)


def test_device_sender_never_gets_more_credit_than_the_hub_granted(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub
    hub.credit_limits["devices/credit1/"] = 3
    hub.d2c_policy = lambda rec: "hold" if rec.address.startswith("devices/credit1/") else "accept"
    try:
        with ProtonDevice(amqp_stack.port, "credit1") as dev:
            dev.put_token()
            snd = dev.sender("devices/credit1/messages/events", name="credit")
            dev.pump(0.3)
            assert 0 < snd.link.credit <= 3, f"device credit {snd.link.credit}, hub granted 3"
            deliveries = [dev.send_raw(snd, m) for m in sample_messages(10)]
            dev.wait(lambda: len(hub.messages_on("devices/credit1/")) == 3, what="3 at the hub")
            dev.pump(0.5)
            assert len(hub.messages_on("devices/credit1/")) == 3, (
                "transfers beyond the hub's credit"
            )
            hub.grant("devices/credit1/messages/events", 7)
            dev.wait(lambda: len(hub.messages_on("devices/credit1/")) == 10, what="10 at the hub")
            assert hub.settle_held(Delivery.ACCEPTED) == 10
            dev.wait_settled(deliveries)
    finally:
        hub.credit_limits.clear()
        hub.d2c_policy = lambda rec: "accept"


def test_hub_refusal_is_mirrored_with_the_hubs_error(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub
    hub.attach_policy = lambda address: (
        ("com.microsoft:device-container-throttled", "slow down")
        if address.startswith("devices/refused1/")
        else None
    )
    try:
        with ProtonDevice(amqp_stack.port, "refused1") as dev:
            dev.put_token()
            with pytest.raises(LinkDetached) as info:
                dev.sender("devices/refused1/messages/events", name="refused")
            assert info.value.condition == "com.microsoft:device-container-throttled"
            assert "slow down" in str(info.value)
    finally:
        hub.attach_policy = lambda address: None


def test_hub_detach_error_reaches_the_device(amqp_stack: AmqpStack) -> None:
    with ProtonDevice(amqp_stack.port, "hubdetach1") as dev:
        dev.put_token()
        _rcv, collector = dev.receiver("devices/hubdetach1/messages/devicebound", name="c2d")
        assert (
            amqp_stack.hub.detach(
                "devices/hubdetach1/messages/devicebound", "amqp:link:stolen", "taken over"
            )
            == 1
        )
        dev.wait(lambda: collector.detached_seen, what="detach from the hub")
        assert collector.detached is not None, "detached without the hub's error"
        assert collector.detached.name == "amqp:link:stolen"
        assert collector.detached.description == "taken over"
        # Only the link went: the device connection is still usable.
        reply, _ = dev.put_token(message_id=2)
        assert reply.properties["status-code"] == 200


def test_device_detach_error_reaches_the_hub(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub
    with ProtonDevice(amqp_stack.port, "devdetach1") as dev:
        dev.put_token()
        snd = dev.sender("devices/devdetach1/messages/events", name="to-close")
        snd.link.condition = Condition("amqp:internal-error", "device shutting down")
        snd.link.close()
        dev.wait(
            lambda: any(d.address.startswith("devices/devdetach1/") for d in hub.detaches),
            what="the hub saw the detach",
        )
    detach = next(d for d in hub.detaches if d.address.startswith("devices/devdetach1/"))
    assert detach.condition == "amqp:internal-error"


@pytest.mark.parametrize(
    "form",
    [
        "amqps://{host}/devices/{id}/messages/events",
        "/devices/{id}/messages/events",
        "amqps://{host}:5671/devices/{id}/messages/events",
    ],
)
def test_sdk_address_forms_are_routed_and_passed_unchanged(
    amqp_stack: AmqpStack, form: str
) -> None:
    hub = amqp_stack.hub
    device_id = f"form{abs(hash(form)) % 10000}"
    address = form.format(host=HUB_HOST, id=device_id)
    with ProtonDevice(amqp_stack.port, device_id) as dev:
        dev.put_token()
        snd = dev.sender(address, name="telemetry")
        dlv = dev.send_raw(snd, sample_messages(1)[0])
        dev.wait_settled([dlv])
        assert dlv.remote_state == Delivery.ACCEPTED
    attach = [a for a in hub.attaches if a.target and device_id in a.target][-1]
    assert attach.target == address, "the gateway rewrote the link's target address"


def test_large_messages_cross_a_small_device_frame_size(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub
    big = [bytes([i]) * 200_000 for i in range(3)]
    from proton import Message

    encoded = []
    for payload in big:
        msg = Message(body=payload, properties={"size": len(payload)})
        msg.inferred = True
        encoded.append(msg.encode())
    with ProtonDevice(amqp_stack.port, "frames1", max_frame_size=512) as dev:
        dev.put_token()
        snd = dev.sender("devices/frames1/messages/events", name="big")
        deliveries = [dev.send_raw(snd, m) for m in encoded]
        dev.wait_settled(deliveries, timeout=FAILSAFE)
        assert [r.data for r in hub.messages_on("devices/frames1/")] == encoded
        _rcv, collector = dev.receiver("devices/frames1/messages/devicebound", name="c2d-big")
        tag = hub.send_c2d("frames1", encoded[0])
        dev.wait_incoming(collector, 1, timeout=FAILSAFE)
        assert collector.incoming[0].data == encoded[0]
        assert collector.incoming[0].tag == tag


def test_sasl_plain_device_gets_its_token_put_over_cbs(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub
    token = "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fplain1&sig=c2ln%3D&se=4102444800"
    with ProtonDevice(amqp_stack.port, "plain1", plain=("plain1@sas.myhub", token)) as dev:
        snd = dev.sender("devices/plain1/messages/events", name="telemetry")
        dlv = dev.send_raw(snd, sample_messages(1)[0])
        dev.wait_settled([dlv])
        assert dlv.remote_state == Delivery.ACCEPTED
    requests = [r.message for r in hub.cbs_requests if r.message.body == token]
    assert requests, "the device's SASL PLAIN token was never put over CBS"
    assert requests[-1].properties["name"] == f"{HUB_HOST}/devices/plain1"
    assert requests[-1].properties["operation"] == "put-token"


def test_device_loss_detaches_its_upstream_links(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub

    for i in range(20):
        device_id = f"churn{i}"
        dev = ProtonDevice(amqp_stack.port, device_id)
        dev.put_token()
        dev.sender(f"devices/{device_id}/messages/events", name="telemetry")
        dev.receiver(f"devices/{device_id}/messages/devicebound", name="c2d")
        dev.drop()  # no detach, end or close: the socket just goes away
    attached = [a for a in hub.attaches if "devices/churn" in ((a.target or "") + (a.source or ""))]
    assert len(attached) == 40
    wait_until(
        lambda: len([d for d in hub.detaches if d.address.startswith("devices/churn")]) == 40,
        timeout=FAILSAFE,
        what="every churned device link detached at the hub",
    )
    status, body, _ = amqp_stack.gateway.http_get("/api/links")
    assert status == 200
    assert "churn" not in body, "links left behind in /api/links"


def test_presettled_d2c_arrives_presettled(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub
    with ProtonDevice(amqp_stack.port, "settled1") as dev:
        dev.put_token()
        snd = dev.sender(
            "devices/settled1/messages/events",
            name="fire-and-forget",
            snd_settle_mode=Link.SND_SETTLED,
        )
        messages = sample_messages(5)
        for m in messages:
            dlv = dev.send_raw(snd, m)
            dlv.settle()
        dev.wait(lambda: len(hub.messages_on("devices/settled1/")) == 5, what="5 at the hub")
    received = hub.messages_on("devices/settled1/")
    assert [r.data for r in received] == messages
    assert all(r.remote_settled for r in received), "a pre-settled delivery arrived unsettled"
    attach = [a for a in hub.attaches if (a.target or "").startswith("devices/settled1/")][-1]
    assert attach.snd_settle_mode == Link.SND_SETTLED


def test_drain_crosses_the_routed_pair(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub
    with ProtonDevice(amqp_stack.port, "drain2") as dev:
        dev.put_token()
        rcv, _collector = dev.receiver("devices/drain2/messages/devicebound", name="c2d", credit=0)
        drains = hub.drains
        rcv.link.drain(5)
        dev.wait(lambda: rcv.link.credit == 0 and not rcv.link.draining(), what="drain answered")
        assert hub.drains > drains, "the hub never saw the drain"


def test_modified_outcome_fields_reach_the_hub(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub
    with ProtonDevice(amqp_stack.port, "modified1") as dev:
        dev.put_token()
        _rcv, collector = dev.receiver("devices/modified1/messages/devicebound", name="c2d")
        tag = hub.send_c2d("modified1", sample_messages(1)[0])
        dev.wait_incoming(collector, 1)
        item = collector.incoming[0]
        item.delivery.local.failed = True
        item.delivery.local.undeliverable = True
        item.delivery.local.annotations = {symbol("x-opt-reason"): "busy"}
        dev.settle_incoming(item, Delivery.MODIFIED)
        dev.wait(lambda: any(o.tag == tag for o in hub.outcomes), what="outcome at the hub")
    outcome = next(o for o in hub.outcomes if o.tag == tag)
    assert outcome.state == Delivery.MODIFIED
    assert outcome.failed and outcome.undeliverable
    assert outcome.annotations == {symbol("x-opt-reason"): "busy"}


def test_hub_attach_properties_and_max_message_size_are_mirrored(amqp_stack: AmqpStack) -> None:
    hub = amqp_stack.hub
    with ProtonDevice(amqp_stack.port, "mirror1") as dev:
        dev.put_token()
        snd = dev.sender("devices/mirror1/messages/events", name="telemetry")
        rcv, _ = dev.receiver(
            "devices/mirror1/messages/devicebound", name="c2d", rcv_settle_mode=Link.RCV_SECOND
        )
        for link in (snd.link, rcv.link):
            assert link.remote_properties == hub.link_properties
            assert link.remote_max_message_size == hub.max_message_size
        assert rcv.link.remote_rcv_settle_mode == Link.RCV_SECOND
    attach = [a for a in hub.attaches if (a.source or "").startswith("devices/mirror1/")][-1]
    assert attach.rcv_settle_mode == Link.RCV_SECOND


def test_c2d_unsettled_when_the_device_drops_is_never_accepted_for_it(
    amqp_stack: AmqpStack,
) -> None:
    hub = amqp_stack.hub
    dev = ProtonDevice(amqp_stack.port, "c2ddrop1")
    dev.put_token()
    _rcv, collector = dev.receiver("devices/c2ddrop1/messages/devicebound", name="c2d")
    tag = hub.send_c2d("c2ddrop1", sample_messages(1)[0])
    dev.wait_incoming(collector, 1)
    dev.drop()  # the device had the message but never settled it
    hub.wait_for(
        lambda: any(d.address == "devices/c2ddrop1/messages/devicebound" for d in hub.detaches),
        what="the C2D link detached at the hub",
    )
    assert not [o for o in hub.outcomes if o.tag == tag], "an outcome was invented for the device"
