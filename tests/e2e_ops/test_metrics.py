"""/metrics over HTTP after known runs, counted against what the hub recorded.

The daemon runs in-process (`gateway.daemon.serve`) between a proton device,
a paho device and hubsim; every count asserted exactly is one hubsim can
confirm independently (messages, bytes, outcomes, connections).
"""

from __future__ import annotations

from collections import Counter

import trio
import trustme
from proton.utils import LinkDetached

from tests.e2e_amqp.gw_helpers import (
    HUB_HOST,
    TIMEOUT,
    Device,
    data_message,
    in_thread,
    send_all,
)
from tests.mqtt.paho_device import PahoDevice
from tests.mqtt.test_relay_hubsim import sas_token as mqtt_sas_token
from tests.mqtt.test_relay_hubsim import username

from .helpers import (
    DEVICEBOUND,
    EVENTS,
    MQTT_EVENTS,
    admin_url,
    gateway_yaml,
    metric,
    port_of,
    scrape,
    start_daemon,
    write_config,
)

D2C = 25  # AMQP telemetry messages
MQTT_D2C = 7  # MQTT QoS 1 publishes


def amqp_run(port: int, hub, key: str) -> list:
    """N telemetry messages, a refused attach, and C2D accepted / rejected / released+accepted."""
    dev = Device(f"amqp://127.0.0.1:{port}")
    try:
        dev.authenticate("dev1", key)
        sender = dev.conn.create_sender(EVENTS % "dev1")
        messages = [data_message(f"reading {i}".encode() * (i + 1), id=i) for i in range(D2C)]
        states = send_all(sender, dev.conn, messages)
        try:
            dev.conn.create_sender("nowhere/at/all")
        except LinkDetached:
            pass
        rx = dev.conn.create_receiver(DEVICEBOUND % "dev1", credit=1)
        hub.send_c2d("dev1", b"one")
        rx.receive(timeout=TIMEOUT)
        rx.accept()
        hub.send_c2d("dev1", b"two")
        rx.receive(timeout=TIMEOUT)
        rx.reject()
        hub.send_c2d("dev1", b"three")
        rx.receive(timeout=TIMEOUT)
        rx.release(delivered=False)
        rx.receive(timeout=TIMEOUT)
        rx.accept()
        dev.sync()
        hub.recorder.wait_for(lambda: len(hub.recorder.dispositions) == 4, TIMEOUT)
        return states
    finally:
        dev.close()


async def mqtt_run(port: int, hub, key: str) -> None:
    """CONNECT, SUBSCRIBE, MQTT_D2C QoS 1 publishes, one C2D, DISCONNECT."""
    dev = PahoDevice("dev2", username=username("dev2"), password=mqtt_sas_token("dev2", key))
    try:
        assert await dev.connect(port) == 0
        await dev.subscribe("devices/dev2/messages/devicebound/#", qos=1)
        for i in range(MQTT_D2C):
            await dev.publish(MQTT_EVENTS.format("dev2"), b"m" * (10 + i), qos=1)
        await trio.to_thread.run_sync(hub.send_c2d, "dev2", b"to the device")
        assert (await dev.receive()).payload == b"to the device"
        await trio.to_thread.run_sync(hub.recorder.wait_for, lambda: hub.recorder.feedback, TIMEOUT)
        await dev.disconnect()
    finally:
        await trio.to_thread.run_sync(dev.close)


async def scrape_until(url: str, name: str, expected: float, **labels: str):
    """Scrape until `name{labels}` reaches `expected` (bounded); returns the samples."""
    with trio.fail_after(TIMEOUT):
        while True:
            samples = await scrape(url)
            if metric(samples, name, **labels) == expected:
                return samples
            await trio.sleep(0.05)


async def test_known_amqp_and_mqtt_runs_give_exact_counts(nursery, hub, keys, tmp_path) -> None:
    config = write_config(tmp_path / "gateway.yaml", gateway_yaml(hub))
    daemon = await start_daemon(nursery, config)
    url = admin_url(daemon)

    states = await in_thread(amqp_run, port_of(daemon, "amqp"), hub, keys["dev1"])
    await mqtt_run(port_of(daemon, "mqtt"), hub, keys["dev2"])
    samples = await scrape_until(url, "iotgw_mqtt_sessions_closed_total", 1,
                                 reason="device_disconnect")  # fmt: skip

    rec = hub.recorder
    amqp_d2c = [r for r in rec.d2c if r.protocol == "amqp"]
    mqtt_d2c = [r for r in rec.d2c if r.protocol == "mqtt"]
    assert len(amqp_d2c) == len(states) == D2C and len(mqtt_d2c) == MQTT_D2C

    def m(name: str, **labels: str) -> float:
        return metric(samples, name, **labels)

    # Messages and bytes, AMQP: every transfer the hub recorded, byte for byte.
    assert m("iotgw_messages_total", route="devices/", direction="in") == len(amqp_d2c)
    assert m("iotgw_message_bytes_total", route="devices/", direction="in") == sum(
        len(r.raw) for r in amqp_d2c
    )
    amqp_c2d = [d for d in rec.dispositions if d.protocol == "amqp"]
    assert m("iotgw_messages_total", route="devices/", direction="out") == len(amqp_c2d) == 4
    # Outcomes: the hub's for telemetry (all accepted), the device's for C2D, as the hub saw them.
    assert m("iotgw_dispositions_total", direction="in") == len(amqp_d2c)
    assert m("iotgw_dispositions_total", outcome="accepted", direction="in") == len(amqp_d2c)
    device_outcomes = Counter(d.outcome for d in amqp_c2d)
    assert device_outcomes == {"accepted": 2, "rejected": 1, "released": 1}
    for outcome, count in device_outcomes.items():
        assert m("iotgw_dispositions_total", outcome=outcome, direction="out") == count, outcome
    assert m("iotgw_dispositions_total", direction="out") == len(amqp_c2d)

    # MQTT: PUBLISH packets count as messages on route "mqtt".
    assert m("iotgw_messages_total", route="mqtt", direction="in") == len(mqtt_d2c)
    assert m("iotgw_messages_total", route="mqtt", direction="out") == 1
    packets = {
        ("CONNECT", "in"): 1, ("CONNACK", "out"): 1, ("SUBSCRIBE", "in"): 1,
        ("SUBACK", "out"): 1, ("PUBLISH", "in"): MQTT_D2C, ("PUBACK", "out"): MQTT_D2C,
        ("PUBLISH", "out"): 1, ("PUBACK", "in"): 1, ("DISCONNECT", "in"): 1,
    }  # fmt: skip
    for (kind, direction), count in packets.items():
        assert m("iotgw_mqtt_packets_total", type=kind, direction=direction) == count, kind
    assert m("iotgw_mqtt_packets_total") == sum(packets.values())

    # Links, refusals, connections.
    assert m("iotgw_links_total", route="devices/", direction="in") == 1
    assert m("iotgw_links_total", route="devices/", direction="out") == 1
    assert m("iotgw_attach_refusals_total", reason="amqp:not-found") == 1
    assert m("iotgw_device_connections_total", listener="amqp", protocol="amqp") == 1
    assert m("iotgw_device_connections_total", listener="mqtt", protocol="mqtt") == 1
    assert m("iotgw_upstream_connections_opened_total", connector="iothub") == (
        rec.connections["amqp"].opened
    )
    assert m("iotgw_upstream_connections", connector="iothub", state="open") == (
        await trio.to_thread.run_sync(hub.open_connections, "amqp")
    )
    assert m("iotgw_tls_handshake_failures_total") == 0
    # Each MQTT device's own hub connection, where the relay reports it (on_upstream_open).
    if m("iotgw_upstream_connections_opened_total", connector="iothub-mqtt"):
        assert m("iotgw_upstream_connections_opened_total", connector="iothub-mqtt") == (
            rec.connections["mqtt"].opened
        )
        assert m("iotgw_upstream_connections", connector="iothub-mqtt", state="open") == 0

    # No device id and nothing secret in any label value by default.
    for name, labels, _ in samples:
        for value in labels.values():
            assert "dev1" not in value and "dev2" not in value, (name, labels)
            assert "SharedAccessSignature" not in value and "sig=" not in value, (name, labels)
    assert not any(name.startswith("iotgw_device_messages") for name, _, _ in samples)


async def test_device_labels_only_when_configured(nursery, hub, keys, tmp_path) -> None:
    text = gateway_yaml(hub, mqtt=False, gateway=", metrics_device_labels: true")
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", text))

    def run() -> None:
        dev = Device(f"amqp://127.0.0.1:{port_of(daemon, 'amqp')}")
        try:
            dev.authenticate("dev3", keys["dev3"])
            sender = dev.conn.create_sender(EVENTS % "dev3")
            send_all(sender, dev.conn, [data_message(b"x" * 10) for _ in range(3)])
        finally:
            dev.close()

    await in_thread(run)
    samples = await scrape(admin_url(daemon))
    assert len([r for r in hub.recorder.d2c if r.device_id == "dev3"]) == 3
    assert metric(samples, "iotgw_device_messages_total", device="dev3", direction="in") == 3
    assert metric(samples, "iotgw_device_message_bytes_total", device="dev3", direction="in") == (
        sum(len(r.raw) for r in hub.recorder.d2c)
    )
    # Route-level series still carry no device id.
    assert all(
        "dev3" not in v
        for name, labels, _ in samples
        if not name.startswith("iotgw_device_")
        for v in labels.values()
    )


async def test_tls_handshake_failures_by_connector_and_reason(nursery, hub, keys, tmp_path) -> None:
    # The hub's certificate is not for this name: both connectors fail the handshake.
    text = gateway_yaml(hub, server_name="not-the-hub.example")
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", text))
    url = admin_url(daemon)

    def amqp_attach() -> None:
        dev = Device(f"amqp://127.0.0.1:{port_of(daemon, 'amqp')}")
        try:
            dev.conn.create_sender(EVENTS % "dev1")
        except LinkDetached as exc:
            assert "amqp:connection:forced" in str(exc) or "unavailable" in str(exc), exc
        finally:
            dev.close()

    await in_thread(amqp_attach)
    samples = await scrape(url)
    assert metric(samples, "iotgw_tls_handshake_failures_total", connector="iothub",
                  reason="hostname_mismatch") >= 1  # fmt: skip

    dev = PahoDevice(
        "dev2", username=username("dev2"), password=mqtt_sas_token("dev2", keys["dev2"])
    )
    try:
        assert str(await dev.connect(port_of(daemon, "mqtt"))) == "Server unavailable"
    finally:
        await trio.to_thread.run_sync(dev.close)
    samples = await scrape(url)
    assert metric(samples, "iotgw_tls_handshake_failures_total", connector="iothub-mqtt",
                  reason="hostname_mismatch") == 1  # fmt: skip
    assert hub.recorder.connections["mqtt"].devices == {}


async def test_wrong_ca_is_a_certificate_verify_failure(nursery, hub, tmp_path) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    text = gateway_yaml(hub, mqtt=False, ca_file=str(other), connector="    on_demand: false\n")
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", text))
    samples = await scrape_until(admin_url(daemon), "iotgw_tls_handshake_failures_total", 1,
                                 connector="iothub", reason="certificate_verify_failed")  # fmt: skip
    assert metric(samples, "iotgw_upstream_connections_opened_total") == 0
    assert HUB_HOST not in "".join(v for _, lab, _ in samples for v in lab.values())
