"""`max_devices_per_connection: 1`: one TLS connection per device, `$cbs` link-routed verbatim."""

from __future__ import annotations

import pytest
from proton import Delivery, ulong

from .amqp_devices import ProtonDevice, sample_messages
from .conftest import AmqpStack

pytestmark = pytest.mark.timeout(600)


def test_cbs_is_routed_verbatim_on_its_own_connection(amqp_stack_isolated: AmqpStack) -> None:
    hub = amqp_stack_isolated.hub
    opened_before = hub.connections_opened
    devices = [ProtonDevice(amqp_stack_isolated.port, d) for d in ("iso1", "iso2")]
    try:
        encoded = {}
        for dev in devices:
            # Same link names, reply-to and message-id on both devices, as SDKs do.
            dev.open_cbs(sender_name="$cbs-sender", receiver_name="$cbs-receiver", reply_to="cbs")
            reply, encoded[dev.device_id] = dev.put_token(message_id=0)
            assert reply.correlation_id == ulong(0)
            assert reply.properties["status-code"] == 200
        cbs = [r for r in hub.received if r.address == "$cbs"][-2:]
        assert [r.data for r in cbs] == [encoded["iso1"], encoded["iso2"]], "put-token not verbatim"
        assert cbs[0].conn != cbs[1].conn, "two devices shared one upstream connection"
        assert hub.connections_opened - opened_before == 2
        # The device's own CBS termini reach the hub (reply-to address included).
        receivers = [
            a for a in hub.attaches if a.source == "$cbs" and a.conn in {r.conn for r in cbs}
        ]
        assert sorted(a.target for a in receivers) == ["cbs", "cbs"]
        for dev in devices:
            snd = dev.sender(f"devices/{dev.device_id}/messages/events", name="telemetry")
            deliveries = [dev.send_raw(snd, m) for m in sample_messages(20)]
            dev.wait_settled(deliveries)
            assert {d.remote_state for d in deliveries} == {Delivery.ACCEPTED}
            assert [
                r.data for r in hub.messages_on(f"devices/{dev.device_id}/")
            ] == sample_messages(20)
    finally:
        for dev in devices:
            dev.close()


def test_device_close_ends_its_upstream_links(amqp_stack_isolated: AmqpStack) -> None:
    hub = amqp_stack_isolated.hub
    with ProtonDevice(amqp_stack_isolated.port, "iso3") as dev:
        dev.put_token()
        dev.sender("devices/iso3/messages/events", name="telemetry")
    conn = [r.conn for r in hub.received if r.address == "$cbs"][-1]
    names = {a.name for a in hub.attaches if a.conn == conn}
    hub.wait_for(
        lambda: names <= {d.name for d in hub.detaches if d.conn == conn},
        what="all links of the closed device detached at the hub",
    )
