"""hubsim's AMQP side against python-qpid-proton devices (no gateway in between)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from hubsim_clients import HUB_HOST, TIMEOUT, AmqpDevice, device_uri, new_key, sas_token
from proton import Condition, Endpoint, Message, symbol
from proton.utils import LinkDetached, SendException

from gateway.hubsim import HubSim


def data_message(body: bytes, **props: object) -> Message:
    msg = Message(body=body, **props)  # type: ignore[arg-type]
    msg.inferred = True  # a data section, as the SDKs send telemetry
    return msg


def test_cbs_put_token_then_d2c_recorded_byte_for_byte(hub: HubSim, keys: dict[str, str]) -> None:
    dev = AmqpDevice(hub)
    try:
        reply = dev.put_token(device_uri("dev1"), sas_token(device_uri("dev1"), keys["dev1"]))
        assert reply.properties["status-code"] == 200
        assert reply.correlation_id == 0
        sender = dev.conn.create_sender(f"amqps://{HUB_HOST}/devices/dev1/messages/events")
        small = data_message(
            b'{"t": 21.5}', id="m-1", content_type="application/json", properties={"p": "a b"}
        )
        # Over the 64 KiB max-frame-size: arrives in several transfer frames.
        large = data_message(bytes(range(256)) * 800, id=uuid.uuid4())
        sender.send(small)
        sender.send(large)
        first, second = hub.recorder.wait_for(lambda: len(hub.recorder.d2c) == 2 and hub.recorder.d2c)
    finally:
        dev.close()
    assert first.raw == small.encode()
    assert second.raw == large.encode()
    assert first.body == b'{"t": 21.5}' and second.body == bytes(range(256)) * 800
    assert first.device_id == "dev1" and first.protocol == "amqp"
    assert first.properties == {"message-id": "m-1", "content-type": "application/json", "p": "a b"}
    assert (first.delivery_tag, second.delivery_tag) == (b"1", b"2")
    assert first.message_format == 0 and not first.settled
    cbs = hub.recorder.cbs[0]
    assert (cbs.device_id, cbs.status, cbs.audience) == ("dev1", 200, device_uri("dev1"))
    assert hub.recorder.connections["amqp"].devices == {"dev1": 1}


def test_c2d_accept_reject_release_as_the_hub_does(hub: HubSim, keys: dict[str, str]) -> None:
    dev = AmqpDevice(hub)
    try:
        dev.put_token(device_uri("dev1"), sas_token(device_uri("dev1"), keys["dev1"]))
        receiver = dev.conn.create_receiver("/devices/dev1/messages/devicebound", credit=1)
        accepted = hub.send_c2d("dev1", b"one", {"content_type": "text/plain"}, {"k": "v"})
        msg = receiver.receive(timeout=TIMEOUT)
        assert (bytes(msg.body), msg.id, msg.properties, msg.delivery_count) == (b"one", accepted, {"k": "v"}, 0)
        assert msg.address == "/devices/dev1/messages/deviceBound"
        receiver.accept()

        rejected = hub.send_c2d("dev1", b"two")
        assert receiver.receive(timeout=TIMEOUT).id == rejected
        receiver.reject()

        released = hub.send_c2d("dev1", b"three")
        assert receiver.receive(timeout=TIMEOUT).delivery_count == 0
        receiver.release(delivered=False)
        again = receiver.receive(timeout=TIMEOUT)
        assert (again.id, again.delivery_count) == (released, 1)
        receiver.accept()
        dev.sync()
    finally:
        dev.close()
    outcomes = [(d.message_id, d.outcome, d.delivery_count) for d in hub.recorder.dispositions]
    assert outcomes == [
        (accepted, "accepted", 0),
        (rejected, "rejected", 0),
        (released, "released", 0),
        (released, "accepted", 1),
    ]
    # Every delivery attempt had its own 16-byte lock token.
    tokens = [d.lock_token for d in hub.recorder.dispositions]
    assert all(t is not None and len(t) == 16 for t in tokens) and len(set(tokens)) == 4
    assert [(f.message_id, f.status) for f in hub.recorder.feedback] == [
        (accepted, "Success"),
        (rejected, "Rejected"),
        (released, "Success"),
    ]


def test_two_devices_share_a_connection_each_with_its_own_token(hub: HubSim, keys: dict[str, str]) -> None:
    dev = AmqpDevice(hub)
    try:
        for identity in ("dev1", "dev2"):
            reply = dev.put_token(device_uri(identity), sas_token(device_uri(identity), keys[identity]))
            assert reply.properties["status-code"] == 200
        for identity in ("dev1", "dev2"):
            dev.conn.create_sender(f"/devices/{identity}/messages/events").send(data_message(identity.encode()))
        attached = {(link.device_id, link.role) for link in hub.open_amqp_links()}
        assert {("dev1", "receiver"), ("dev2", "receiver"), (None, "sender"), (None, "receiver")} == attached
        # dev3 put no token on this connection: its attach is refused like the hub refuses it.
        with pytest.raises(LinkDetached) as refused:
            dev.conn.create_sender("/devices/dev3/messages/events")
        assert refused.value.link.remote_condition.name == "amqp:unauthorized-access"
        assert refused.value.link.remote_target.address is None
    finally:
        dev.close()
    assert [(r.device_id, r.body) for r in hub.recorder.d2c] == [("dev1", b"dev1"), ("dev2", b"dev2")]
    refusal = [link for link in hub.recorder.links if not link.accepted]
    assert [(link.device_id, link.error) for link in refusal] == [("dev3", "amqp:unauthorized-access")]
    hub.recorder.wait_for(lambda: hub.recorder.connections["amqp"].open == 0)
    assert hub.recorder.connections["amqp"].devices == {"dev1": 1, "dev2": 1}


def test_cbs_reply_goes_to_the_link_named_by_reply_to(hub: HubSim, keys: dict[str, str]) -> None:
    dev = AmqpDevice(hub)
    try:
        from hubsim_clients import TargetAddress

        rx_a = dev.conn.create_receiver("$cbs", name="cbs-a", options=[TargetAddress("reply-a")])
        rx_b = dev.conn.create_receiver("$cbs", name="cbs-b", options=[TargetAddress("reply-b")])
        tx = dev.conn.create_sender("$cbs")
        for n, (identity, reply_to, rx) in enumerate((("dev1", "reply-a", rx_a), ("dev2", "reply-b", rx_b))):
            tx.send(
                Message(
                    id=f"req-{n}",
                    reply_to=reply_to,
                    properties={
                        "operation": "put-token",
                        "type": "azure-devices.net:sastoken",
                        "name": device_uri(identity),
                    },
                    body=sas_token(device_uri(identity), keys[identity]),
                )
            )
            reply = rx.receive(timeout=TIMEOUT)
            assert (reply.correlation_id, reply.properties["status-code"]) == (f"req-{n}", 200)
        # No reply-to (the C SDK): the answer goes on the last attached CBS sender link.
        tx.send(
            Message(
                id=7,
                properties={"operation": "put-token", "type": "servicebus.windows.net:sastoken",
                            "name": device_uri("dev3")},
                body=sas_token(device_uri("dev3"), keys["dev3"]),
            )
        )
        assert rx_b.receive(timeout=TIMEOUT).correlation_id == 7
    finally:
        dev.close()


def test_bad_tokens_are_refused_with_cbs_status(hub: HubSim, keys: dict[str, str]) -> None:
    now = int(time.time())
    cases = [
        (device_uri("dev1"), sas_token(device_uri("dev1"), new_key()), 401),  # forged: wrong key
        (device_uri("dev1"), sas_token(device_uri("dev1"), keys["dev1"], now - 3600), 401),  # expired
        (device_uri("dev2"), sas_token(device_uri("dev1"), keys["dev1"]), 401),  # sr does not cover
        (device_uri("ghost"), sas_token(device_uri("ghost"), keys["dev1"]), 404),
        ("myhub.azure-devices.net/nodes/x", sas_token(device_uri("dev1"), keys["dev1"]), 400),
    ]
    dev = AmqpDevice(hub)
    try:
        for audience, token, status in cases:
            reply = dev.put_token(audience, token)
            assert reply.properties["status-code"] == status, audience
            assert reply.properties["status-description"]
        assert dev.put_token(device_uri("dev1"), "x", token_type="jwt").properties["status-code"] == 400
        with pytest.raises(LinkDetached):
            dev.conn.create_sender("/devices/dev1/messages/events")
    finally:
        dev.close()
    assert [r.status for r in hub.recorder.cbs] == [401, 401, 401, 404, 400, 400]
    assert not hub.recorder.d2c


def test_sasl_plain_identity_and_refusal(hub: HubSim, keys: dict[str, str]) -> None:
    hub_name = HUB_HOST.split(".")[0]
    dev = AmqpDevice(
        hub, mechs="PLAIN", user=f"dev1@sas.{hub_name}",
        password=sas_token(device_uri("dev1"), keys["dev1"]),
    )
    try:
        dev.conn.create_sender("/devices/dev1/messages/events").send(data_message(b"plain"))
        with pytest.raises(LinkDetached):
            dev.conn.create_sender("/devices/dev2/messages/events")
    finally:
        dev.close()
    assert [(r.device_id, r.body) for r in hub.recorder.d2c] == [("dev1", b"plain")]
    with pytest.raises(Exception, match="(?i)auth|sasl|connection"):
        AmqpDevice(
            hub, mechs="PLAIN", user=f"dev1@sas.{hub_name}",
            password=sas_token(device_uri("dev1"), new_key()),
        )
    assert [(a.mechanism, a.ok) for a in hub.recorder.auth] == [("PLAIN", True), ("PLAIN", False)]


def test_module_plain_user(hub: HubSim, keys: dict[str, str]) -> None:
    hub_name = HUB_HOST.split(".")[0]
    dev = AmqpDevice(
        hub, mechs="PLAIN", user=f"dev1/modules/mod1@sas.{hub_name}",
        password=sas_token(device_uri("dev1/mod1"), keys["dev1/mod1"]),
    )
    try:
        dev.conn.create_sender("/devices/dev1/modules/mod1/messages/events").send(data_message(b"m"))
    finally:
        dev.close()
    assert hub.recorder.d2c[0].device_id == "dev1/mod1"


def test_x509_device_with_sasl_external(hub: HubSim, tmp_path: object) -> None:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    cert_pem, key_pem = hub.issue_device_cert("dev2")
    (tmp_path / "dev2.pem").write_bytes(cert_pem)
    (tmp_path / "dev2.key").write_bytes(key_pem)
    dev = AmqpDevice(hub, mechs="EXTERNAL", cert=(str(tmp_path / "dev2.pem"), str(tmp_path / "dev2.key")))
    try:
        dev.conn.create_sender("/devices/dev2/messages/events").send(data_message(b"x509"))
    finally:
        dev.close()
    assert (hub.recorder.d2c[0].device_id, hub.recorder.auth[0].mechanism) == ("dev2", "EXTERNAL")


def test_twin_and_direct_method_round_trips(hub: HubSim, keys: dict[str, str]) -> None:
    dev = AmqpDevice(hub)
    try:
        dev.put_token(device_uri("dev1"), sas_token(device_uri("dev1"), keys["dev1"]))
        twin_rx = dev.conn.create_receiver("/devices/dev1/twin", name="twin-rx")
        twin_tx = dev.conn.create_sender("/devices/dev1/twin", name="twin-tx")

        def twin_request(operation: str, resource: str | None, body: bytes | None, cid: str) -> Message:
            annotations = {symbol("operation"): operation}
            if resource:
                annotations[symbol("resource")] = resource
            msg = Message(correlation_id=cid, annotations=annotations, body=body)
            msg.inferred = body is not None
            twin_tx.send(msg)
            reply = twin_rx.receive(timeout=TIMEOUT)
            assert reply.correlation_id == cid
            return reply

        hub.update_desired("dev1", {"interval": 5})
        got = twin_request("GET", None, None, "c1")
        assert got.annotations["status"] == 200
        assert json.loads(bytes(got.body))["desired"] == {"interval": 5, "$version": 2}
        patched = twin_request("PATCH", "/properties/reported", b'{"fw": "1.2"}', "c2")
        assert (patched.annotations["status"], patched.annotations["version"]) == (204, 2)
        assert hub.twin("dev1")["reported"] == {"fw": "1.2", "$version": 2}
        subscribed = twin_request("PUT", "/notifications/twin/properties/desired", None, "c3")
        assert subscribed.annotations["status"] == 200
        assert hub.update_desired("dev1", {"interval": 10}) == 3
        pushed = twin_rx.receive(timeout=TIMEOUT)
        assert json.loads(bytes(pushed.body)) == {"interval": 10, "$version": 3}

        methods_rx = dev.conn.create_receiver("/devices/dev1/methods/devicebound", name="methods-rx")
        methods_tx = dev.conn.create_sender("/devices/dev1/methods/devicebound", name="methods-tx")
        result: list[tuple[int, bytes]] = []
        caller = threading.Thread(
            target=lambda: result.append(hub.invoke_method("dev1", "reboot", {"delay": 1}, timeout=TIMEOUT))
        )
        caller.start()
        request = methods_rx.receive(timeout=TIMEOUT)
        assert request.properties["IoThub-methodname"] == "reboot"
        assert json.loads(bytes(request.body)) == {"delay": 1}
        response = Message(correlation_id=request.correlation_id, properties={"IoThub-status": 200}, body=b'"ok"')
        response.inferred = True
        methods_tx.send(response)
        caller.join(TIMEOUT)
    finally:
        dev.close()
    assert result == [(200, b'"ok"')]
    hub.recorder.wait_for(lambda: hub.recorder.connections["amqp"].open == 0)
    assert hub.invoke_method("dev1", "reboot", None, timeout=1)[0] == 404  # no longer connected


def test_oversized_d2c_is_rejected(keys: dict[str, str]) -> None:
    with HubSim(keys, hub_host=HUB_HOST, mqtt_port=None, amqp_max_message_size=4096) as hub:
        dev = AmqpDevice(hub)
        try:
            dev.put_token(device_uri("dev1"), sas_token(device_uri("dev1"), keys["dev1"]))
            sender = dev.conn.create_sender("/devices/dev1/messages/events")
            with pytest.raises(SendException):
                sender.send(data_message(b"x" * 100_000))
            sender.send(data_message(b"fits"))
        finally:
            dev.close()
        assert [r.body for r in hub.recorder.d2c] == [b"fits"]


def test_token_expiry_detaches_the_device_links(keys: dict[str, str]) -> None:
    with HubSim(keys, hub_host=HUB_HOST, mqtt_port=None, token_skew=0) as hub:
        dev = AmqpDevice(hub)
        try:
            expiry = int(time.time()) + 2
            dev.put_token(device_uri("dev1"), sas_token(device_uri("dev1"), keys["dev1"], expiry))
            sender = dev.conn.create_sender("/devices/dev1/messages/events")
            with pytest.raises(LinkDetached) as detached:
                dev.conn.wait(lambda: bool(sender.link.state & Endpoint.REMOTE_CLOSED), timeout=TIMEOUT)
            assert detached.value.link.remote_condition.name == "amqp:unauthorized-access"
            assert time.time() >= expiry
        finally:
            dev.close()


def test_service_feedback_link(hub: HubSim, keys: dict[str, str]) -> None:
    service = AmqpDevice(hub)
    dev = AmqpDevice(hub)
    try:
        policy_token = sas_token(HUB_HOST, hub.state.policies["service"], policy="service")
        assert service.put_token(HUB_HOST, policy_token).properties["status-code"] == 200
        feedback = service.conn.create_receiver("/messages/serviceBound/feedback")
        dev.put_token(device_uri("dev1"), sas_token(device_uri("dev1"), keys["dev1"]))
        receiver = dev.conn.create_receiver("/devices/dev1/messages/devicebound")
        message_id = hub.send_c2d("dev1", b"cmd", {"ack": "full"})
        receiver.receive(timeout=TIMEOUT)
        receiver.accept()
        dev.sync()
        report = feedback.receive(timeout=TIMEOUT)  # keep it alive: body is a view into it
        record = json.loads(bytes(report.body))
        assert record[0]["originalMessageId"] == message_id
        assert (record[0]["statusCode"], record[0]["deviceId"]) == ("Success", "dev1")
    finally:
        dev.close()
        service.close()


def test_hub_loss_and_restart_on_the_same_port(hub: HubSim, keys: dict[str, str]) -> None:
    dev = AmqpDevice(hub)
    dev.put_token(device_uri("dev1"), sas_token(device_uri("dev1"), keys["dev1"]))
    dev.conn.create_sender("/devices/dev1/messages/events")
    hub.disconnect_all()
    with pytest.raises(Exception):  # noqa: B017 - the connection is gone, however proton says it
        dev.conn.wait(lambda: False, timeout=TIMEOUT)
    assert dev.conn.conn.remote_condition == Condition("amqp:connection:forced", "hub is closing the connection")
    port = hub.amqp_port
    hub.stop()
    hub.stop()  # idempotent
    hub.start()
    assert hub.amqp_port == port
    again = AmqpDevice(hub)
    try:
        again.put_token(device_uri("dev1"), sas_token(device_uri("dev1"), keys["dev1"]))
        again.conn.create_sender("/devices/dev1/messages/events").send(data_message(b"back"))
    finally:
        again.close()
    assert hub.recorder.d2c[-1].body == b"back"
