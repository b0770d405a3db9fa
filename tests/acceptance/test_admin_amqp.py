"""The admin endpoint after a known AMQP run: /metrics counts against what our hub received,
/healthz, /readyz, the JSON API and `iot-gateway status`."""

from __future__ import annotations

import json

import pytest
from proton import Delivery
from proton.utils import LinkDetached

from .amqp_devices import ProtonDevice, sample_messages
from .conftest import AmqpStack
from .gateway_proc import (
    Contains,
    Snapshot,
    metric_delta,
    run_cli,
    settled_delta,
    snapshot,
)

pytestmark = pytest.mark.timeout(600)

DEVICES_ROUTE = Contains("devices/")


def delta(after: Snapshot, before: Snapshot, name: str, **labels: str) -> float:
    return metric_delta(after, before, name, **labels)


@pytest.fixture(scope="module")
def known_run(amqp_stack: AmqpStack) -> dict:
    """Three devices: D2C (some rejected by the hub), C2D with each outcome, two refusals."""
    hub, gw = amqp_stack.hub, amqp_stack.gateway
    before = snapshot(gw)
    hub.d2c_policy = lambda rec: (
        ("reject", "amqp:resource-limit-exceeded", "quota")
        if rec.data.endswith(b"REJECT")
        else "accept"
    )
    hub_before = len(hub.received)
    c2d_outcomes = [Delivery.ACCEPTED, Delivery.REJECTED, Delivery.RELEASED, Delivery.ACCEPTED]
    try:
        for n, device_id in enumerate(("m1", "m2", "m3")):
            with ProtonDevice(amqp_stack.port, device_id) as dev:
                dev.put_token()
                snd = dev.sender(f"devices/{device_id}/messages/events", name="telemetry")
                payloads = sample_messages(10 + n)
                payloads.append(b"\x00Sw\xa1\x06REJECT")
                deliveries = [dev.send_raw(snd, p) for p in payloads]
                dev.wait_settled(deliveries)
                if device_id == "m1":
                    _rcv, collector = dev.receiver(
                        f"devices/{device_id}/messages/devicebound", name="c2d"
                    )
                    tags = [hub.send_c2d(device_id, p) for p in sample_messages(len(c2d_outcomes))]
                    dev.wait_incoming(collector, len(tags))
                    for item, outcome in zip(list(collector.incoming), c2d_outcomes, strict=True):
                        dev.settle_incoming(item, outcome)
                    dev.wait(
                        lambda tags=tags: len([o for o in hub.outcomes if o.tag in tags]) == 4,
                        what="outcomes",
                    )
                    for address in ("queues/unrouted", "devices/not-mine/messages/events"):
                        try:
                            dev.sender(address, name="refused")
                        except LinkDetached:
                            pass
    finally:
        hub.d2c_policy = lambda rec: "accept"
    d2c = [r for r in hub.received[hub_before:] if r.address.startswith("devices/")]
    cbs = [r for r in hub.received[hub_before:] if r.address == "$cbs"]
    return {
        "before": before,
        "d2c": d2c,
        "cbs": cbs,
        "d2c_rejected": sum(1 for r in d2c if r.data.endswith(b"REJECT")),
        "c2d_outcomes": c2d_outcomes,
        "c2d_bytes": sum(len(p) for p in sample_messages(len(c2d_outcomes))),
    }


def test_messages_and_bytes_by_route_and_direction(amqp_stack: AmqpStack, known_run: dict) -> None:
    gw = amqp_stack.gateway
    before = known_run["before"]
    d2c = known_run["d2c"]
    expected = {
        ("iotgw_messages_total", "in"): len(d2c),
        ("iotgw_messages_total", "out"): 4,
        ("iotgw_message_bytes_total", "in"): sum(len(r.data) for r in d2c),
        ("iotgw_message_bytes_total", "out"): known_run["c2d_bytes"],
    }
    for (name, direction), want in expected.items():
        got = settled_delta(gw, before, name, want, route=DEVICES_ROUTE, direction=direction)
        assert got == want, f"{name} {direction}: metric {got}, hub/device saw {want}"


def test_device_connections_and_links(amqp_stack: AmqpStack, known_run: dict) -> None:
    gw = amqp_stack.gateway
    gw.wait_metric("iotgw_device_connections_open", lambda v: v == 0, protocol="amqp")
    gw.wait_metric("iotgw_links_open", lambda v: v == 0)
    after = snapshot(gw)
    before = known_run["before"]
    assert delta(after, before, "iotgw_device_connections_total", protocol="amqp") == 3
    # m1..m3 telemetry senders + m1's C2D receiver.
    assert delta(after, before, "iotgw_links_total", route=DEVICES_ROUTE, direction="in") == 3
    assert delta(after, before, "iotgw_links_total", route=DEVICES_ROUTE, direction="out") == 1


def test_dispositions_by_outcome(amqp_stack: AmqpStack, known_run: dict) -> None:
    before = known_run["before"]
    d2c_total = len(known_run["d2c"])
    rejected = known_run["d2c_rejected"]
    outcomes = known_run["c2d_outcomes"]
    total = {
        "accepted": d2c_total - rejected + outcomes.count(Delivery.ACCEPTED),
        "rejected": rejected + outcomes.count(Delivery.REJECTED),
        "released": outcomes.count(Delivery.RELEASED),
    }
    for outcome, expected in total.items():
        # CBS put-tokens are answered by the hub too; count only relayed message outcomes.
        got = settled_delta(
            amqp_stack.gateway, before, "iotgw_dispositions_total", expected, outcome=outcome
        )
        assert got == expected, f"dispositions {outcome}: metric {got}, hub/device saw {expected}"


def test_attach_refusals_by_reason(amqp_stack: AmqpStack, known_run: dict) -> None:
    after = snapshot(amqp_stack.gateway)
    before = known_run["before"]
    assert delta(after, before, "iotgw_attach_refusals_total", reason="amqp:not-found") == 1
    assert (
        delta(after, before, "iotgw_attach_refusals_total", reason="amqp:unauthorized-access") == 1
    )


def test_relay_latency_histogram_moves(amqp_stack: AmqpStack, known_run: dict) -> None:
    after = snapshot(amqp_stack.gateway)
    count = delta(after, known_run["before"], "iotgw_relay_latency_seconds_count")
    assert count >= len(known_run["d2c"])


def test_no_device_ids_or_tokens_in_metric_labels(amqp_stack: AmqpStack, known_run: dict) -> None:
    for sample in amqp_stack.gateway.metrics():
        for value in sample.labels.values():
            assert "SharedAccessSignature" not in value
            assert value not in {"m1", "m2", "m3"}, f"device id in {sample.name}{sample.labels}"


def test_health_and_readiness(amqp_stack: AmqpStack) -> None:
    status, body, _ = amqp_stack.gateway.http_get("/healthz")
    assert status == 200, body
    status, body, _ = amqp_stack.gateway.http_get("/readyz")
    assert status == 200, body


def test_status_command_prints_tables(amqp_stack: AmqpStack, known_run: dict) -> None:
    with ProtonDevice(amqp_stack.port, "status1") as dev:
        dev.put_token()
        dev.sender("devices/status1/messages/events", name="telemetry")
        result = run_cli("status", "--admin", amqp_stack.gateway.admin_url, "--all")
        assert result.returncode == 0, result.stderr
        out = result.stdout
        for heading in ("Connections", "Links", "Routes", "Connectors"):
            assert heading in out.splitlines()
        assert "devices/status1/messages/events" in out
        assert "$cbs" in out and "devices/" in out and "iothub" in out
        # No section: the one-screen summary.
        summary = run_cli("status", "--admin", amqp_stack.gateway.admin_url, "--rate-window", "0")
        assert summary.returncode == 0, summary.stderr
        rows = dict(line.strip().split("  ", 1) for line in summary.stdout.splitlines()[3:]
                    if "  " in line.strip())  # fmt: skip
        assert rows["Device connections"].strip().startswith("1 (amqp 1)")
        assert rows["Links"].strip() == "1"
        as_json = run_cli("status", "--admin", amqp_stack.gateway.admin_url, "--json")
        assert as_json.returncode == 0, as_json.stderr
        json.loads(as_json.stdout)


def test_status_against_nothing_fails_cleanly(amqp_stack: AmqpStack) -> None:
    result = run_cli("status", "--admin", "http://127.0.0.1:9", "--timeout", "2")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr


def test_api_links_counts_deliveries_and_credit(amqp_stack: AmqpStack, known_run: dict) -> None:
    with ProtonDevice(amqp_stack.port, "linkstats") as dev:
        dev.put_token()
        snd = dev.sender("devices/linkstats/messages/events", name="telemetry")
        deliveries = [dev.send_raw(snd, m) for m in sample_messages(5)]
        dev.wait_settled(deliveries)
        status, body, _ = amqp_stack.gateway.http_get("/api/links")
        assert status == 200
        link = next(
            x for x in json.loads(body) if x.get("address") == "devices/linkstats/messages/events"
        )
        assert link["deliveries"] == 5, link
        assert link["credit"] > 0, link
