"""Metrics move with real traffic: paho device -> MQTT relay -> mosquitto (TLS), scraped over HTTP.

A known run (connect, subscribe, 5 QoS 1 publishes echoed back, disconnect)
must show exactly the packets, messages and bytes that crossed.
"""

from __future__ import annotations

import urllib.request

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gateway.daemon import serve_mqtt_listener
from gateway.ops.admin import serve_admin
from gateway.ops.health import Readiness
from gateway.ops.metrics import Metrics
from gateway.ops.registry import Registry
from tests.mqtt.conftest import certs, make_config, mosquitto  # noqa: F401 (fixtures)
from tests.mqtt.paho_device import PahoDevice
from tests.waiting import FAILSAFE

pytestmark = pytest.mark.mosquitto

TOPIC = "t/dev1"
PAYLOAD = bytes(range(100))
COUNT = 5
# Fixed header (2) + topic length (2) + topic + packet id (2) + payload, MQTT 3.1.1.
PUBLISH_SIZE = 2 + 2 + len(TOPIC) + 2 + len(PAYLOAD)


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=FAILSAFE) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(values: dict, name: str, **labels: str) -> float:
    return values.get((name, frozenset(labels.items())), 0.0)


async def test_known_mqtt_run_gives_exact_counts(nursery, mosquitto, make_config) -> None:  # noqa: F811
    config = make_config(mosquitto.port)
    metrics = Metrics(process_metrics=False)
    registry = Registry()
    admin = await nursery.start(
        lambda task_status: serve_admin(
            ("127.0.0.1", 0), registry, metrics, Readiness(registry), task_status=task_status
        )
    )
    url = f"http://127.0.0.1:{admin[0][1]}/metrics"
    listener = config.listeners[0]
    bound = await nursery.start(
        lambda task_status: serve_mqtt_listener(
            listener,
            config,
            task_status=task_status,
            observer=metrics.mqtt_observer(listener.name),
            listener_observer=metrics,
        )
    )
    device = PahoDevice("dev1")
    try:
        with trio.fail_after(FAILSAFE):
            assert await device.connect(bound[0][1]) == 0
            await device.subscribe(TOPIC, qos=1)
            for _ in range(COUNT):
                await device.publish(TOPIC, PAYLOAD, qos=1)
            for _ in range(COUNT):
                received = await device.receive()
                assert (received.topic, received.payload) == (TOPIC, PAYLOAD)
            await device.disconnect()
    finally:
        device.close()

    # The relay finishes its side of the close asynchronously: poll the
    # endpoint (with a deadline) until the session's end is accounted for.
    # Which side is seen closing first after DISCONNECT is a race, so the
    # close reason is not asserted.
    with trio.fail_after(FAILSAFE):
        while True:
            values = await trio.to_thread.run_sync(scrape, url)
            closed = sum(
                v for (name, _), v in values.items() if name == "iotgw_mqtt_sessions_closed_total"
            )
            if closed == 1:
                break
            await trio.sleep(0.02)

    lst = {"listener": listener.name, "protocol": "mqtt"}
    assert get(values, "iotgw_device_connections_total", **lst) == 1
    assert get(values, "iotgw_device_connections_open", **lst) == 0
    expected_packets = {
        ("CONNECT", "in"): 1,
        ("CONNACK", "out"): 1,
        ("SUBSCRIBE", "in"): 1,
        ("SUBACK", "out"): 1,
        ("PUBLISH", "in"): COUNT,
        ("PUBACK", "out"): COUNT,  # mosquitto acknowledging the device's publishes
        ("PUBLISH", "out"): COUNT,  # the echoes on the subscription
        ("PUBACK", "in"): COUNT,  # the device acknowledging them
        ("DISCONNECT", "in"): 1,
    }
    seen = {
        (dict(labels)["type"], dict(labels)["direction"]): v
        for (name, labels), v in values.items()
        if name == "iotgw_mqtt_packets_total" and v
    }
    assert seen == expected_packets
    for direction in ("in", "out"):
        assert get(values, "iotgw_messages_total", route="mqtt", direction=direction) == COUNT
        assert (
            get(values, "iotgw_message_bytes_total", route="mqtt", direction=direction)
            == COUNT * PUBLISH_SIZE
        )
    assert (
        get(
            values,
            "iotgw_protocol_errors_total",
            protocol="mqtt",
            side="device",
            kind="device_protocol_error",
        )
        == 0
    )
