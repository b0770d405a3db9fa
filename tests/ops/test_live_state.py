"""Live state for the admin API and metrics: listener-level connection records,
the MQTT relay's hooks (connector state, device ids, latency), gateway-held
token expiry and renewal failures, and the AMQP relay latency timer."""

from __future__ import annotations

import math

import trio

from gateway.net.listeners import ListenerSettings, serve_listener
from gateway.ops.connections import ListenerConnections
from gateway.ops.metrics import Metrics
from gateway.ops.registry import ConnectionInfo, LinkInfo, Registry, connection_id
from gateway.ops.router_observer import OpsObserver
from gateway.router.linkpair import _relayed, timed_handler
from tests.waiting import FAILSAFE


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


async def test_listener_records_mqtt_connections_until_they_close() -> None:
    registry = Registry()
    metrics = Metrics(process_metrics=False)
    observer = ListenerConnections(metrics, registry)
    relay = metrics.mqtt_observer("mqtt", registry=registry)
    seen: list[tuple[str, int]] = []
    release = trio.Event()

    async def handler(stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        seen.append(peer)
        relay.on_device_identified(peer, "dev7")  # what the relay does after CONNECT
        await release.wait()

    settings = ListenerSettings(name="mqtt", host="127.0.0.1", port=0, protocol="mqtt")
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(lambda task_status: serve_listener(
            settings, handler, observer=observer, task_status=task_status))  # fmt: skip
        stream = await trio.open_tcp_stream(*bound[0])
        with trio.fail_after(FAILSAFE):
            while not seen:
                await trio.sleep(0.01)
        rows = registry.connections()
        assert len(rows) == 1
        row = rows[0]
        assert row["id"] == connection_id("mqtt", seen[0])
        assert (row["kind"], row["endpoint"], row["protocol"]) == ("device", "mqtt", "mqtt")
        assert row["remote"] == f"127.0.0.1:{seen[0][1]}" and row["device_ids"] == ["dev7"]
        assert value(metrics, "iotgw_device_connections_open", listener="mqtt",
                     protocol="mqtt") == 1  # fmt: skip
        release.set()
        with trio.fail_after(FAILSAFE):
            while registry.connections():
                await trio.sleep(0.01)
        assert value(metrics, "iotgw_device_connections_open", listener="mqtt",
                     protocol="mqtt") == 0  # fmt: skip
        await stream.aclose()
        nursery.cancel_scope.cancel()


def test_amqp_connections_are_left_to_the_router() -> None:
    registry = Registry()
    observer = ListenerConnections(None, registry)
    assert observer.on_connection_open("amqp", "amqp", ("10.0.0.1", 5000)) is None
    observer.on_connection_close(None)
    assert registry.connections() == []


def test_mqtt_connector_is_connected_while_sessions_are_relayed() -> None:
    registry = Registry()
    registry.register_connector("iothub-mqtt", protocol="mqtt", target="hub:8883")
    metrics = Metrics(process_metrics=False)
    relay = metrics.mqtt_observer("mqtt", registry=registry)

    def state() -> tuple[str, int]:
        row = registry.connectors()[0]
        return row["state"], row["connections"]

    assert state() == ("idle", 0)
    relay.on_upstream_open("iothub-mqtt")
    relay.on_upstream_open("iothub-mqtt")
    assert state() == ("connected", 2)
    relay.on_upstream_close("iothub-mqtt")
    assert state() == ("connected", 1)
    relay.on_upstream_close("iothub-mqtt")
    assert state() == ("idle", 0)
    relay.on_relay_latency(0.0002)
    assert value(metrics, "iotgw_relay_latency_seconds_count", protocol="mqtt") == 1


def test_upstream_connections_show_their_links_and_devices() -> None:
    registry = Registry()
    registry.add_connection(ConnectionInfo(id="d1", kind="device", endpoint="amqp",
                                           protocol="amqp", remote="10.0.0.5:4000"))  # fmt: skip
    registry.add_connection(ConnectionInfo(id="iothub/0", kind="upstream", endpoint="iothub",
                                           protocol="amqp", remote="hub:5671"))  # fmt: skip
    for n, device in enumerate(("dev1", "dev2")):
        registry.add_link(LinkInfo(id=f"d1/{n}", connection_id="d1", name="telemetry",
                                   role="sender", address=f"devices/{device}/messages/events",
                                   upstream_link_id="iothub/0", device_id=device))  # fmt: skip
    rows = {row["id"]: row for row in registry.connections()}
    assert (rows["iothub/0"]["links"], rows["iothub/0"]["device_ids"]) == (2, ["dev1", "dev2"])
    assert (rows["d1"]["links"], rows["d1"]["device_ids"]) == (2, ["dev1", "dev2"])


def test_router_and_mqtt_token_expiries_make_one_soonest_gauge() -> None:
    metrics = Metrics(process_metrics=False)
    router_side = OpsObserver(metrics, Registry())
    mqtt_side = metrics.mqtt_observer("mqtt")
    assert math.isnan(value(metrics, "iotgw_token_expiry_seconds"))
    router_side.on_token_expiry(3600)
    mqtt_side.on_token_expiry("dev2", 600)
    assert 590 < value(metrics, "iotgw_token_expiry_seconds") <= 600
    mqtt_side.on_token_expiry("dev2", None)  # that session ended
    assert 3590 < value(metrics, "iotgw_token_expiry_seconds") <= 3600
    router_side.on_token_expiry(None)
    assert math.isnan(value(metrics, "iotgw_token_expiry_seconds"))


def test_renewal_failures_carry_the_identity_only_with_device_labels() -> None:
    plain = Metrics(process_metrics=False)
    OpsObserver(plain).on_token_renewal_failure("dev1/modules/m1")
    plain.mqtt_observer("mqtt").on_token_renewal_failure("dev2")
    assert value(plain, "iotgw_token_renewal_failures_total") == 2
    for family in plain.registry.collect():
        for sample in family.samples:
            assert "dev1/modules/m1" not in sample.labels.values()
            assert "dev2" not in sample.labels.values()

    labelled = Metrics(process_metrics=False, device_labels=True)
    OpsObserver(labelled).on_token_renewal_failure("dev1/modules/m1")
    assert value(labelled, "iotgw_device_token_renewal_failures_total",
                 device="dev1/modules/m1") == 1  # fmt: skip
    labelled.forget_device("dev1/modules/m1")
    assert value(labelled, "iotgw_device_token_renewal_failures_total",
                 device="dev1/modules/m1") is None  # fmt: skip


def test_timed_handler_reports_once_per_chunk_for_each_relayed_transfer() -> None:
    reports: list[tuple[float, int]] = []

    def handler(events: list[int]) -> None:
        for _ in events:
            _relayed.count += 1  # what LinkPair does per relayed transfer

    timed = timed_handler(handler, lambda seconds, n: reports.append((seconds, n)))
    timed([1, 2, 3])
    timed([])  # a chunk that relayed nothing (a flow, a heartbeat): no report
    timed([4])
    assert [n for _, n in reports] == [3, 1]
    assert all(0 <= seconds < 1 for seconds, _ in reports)

    metrics = Metrics(process_metrics=False)
    OpsObserver(metrics).on_relay_latency(0.00003, 3)
    assert value(metrics, "iotgw_relay_latency_seconds_count", protocol="amqp") == 3
