"""The admin API's live state after known runs through the in-process daemon:
MQTT sessions and the MQTT connector's state, AMQP link counters, the route
table with MQTT routes, and the relay latency histogram.

Counts asserted are ones the independent peers confirm: messages the hub
recorded, deliveries proton saw settled.
"""

from __future__ import annotations

import io
import json

import trio

from gateway.ops.status import main as status_main
from tests.e2e_amqp.gw_helpers import TIMEOUT, Device, data_message, in_thread, send_all
from tests.mqtt.paho_device import PahoDevice
from tests.mqtt.test_relay_hubsim import sas_token as mqtt_sas_token
from tests.mqtt.test_relay_hubsim import username

from .helpers import (
    DEVICEBOUND,
    EVENTS,
    MQTT_EVENTS,
    admin_url,
    gateway_yaml,
    http_get,
    metric,
    port_of,
    scrape,
    start_daemon,
    write_config,
)


async def api(url: str, path: str) -> list[dict]:
    status, body = await trio.to_thread.run_sync(http_get, url + path)
    assert status == 200, body
    return json.loads(body)


async def wait_api(url: str, path: str, predicate) -> list[dict]:
    """Poll an /api/ path until `predicate(rows)` holds (bounded)."""
    with trio.fail_after(TIMEOUT):
        while True:
            rows = await api(url, path)
            if predicate(rows):
                return rows
            await trio.sleep(0.05)


def connector(rows: list[dict], name: str) -> dict:
    return next(r for r in rows if r["name"] == name)


async def test_mqtt_session_listed_and_connector_connected_while_up(
    nursery, hub, keys, tmp_path
) -> None:
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", gateway_yaml(hub)))
    url = admin_url(daemon)
    assert connector(await api(url, "/api/connectors"), "iothub-mqtt")["state"] == "idle"

    dev = PahoDevice(
        "dev2", username=username("dev2"), password=mqtt_sas_token("dev2", keys["dev2"])
    )
    try:
        assert await dev.connect(port_of(daemon, "mqtt")) == 0
        await dev.publish(MQTT_EVENTS.format("dev2"), b"hello", qos=1)  # PUBACK: the hub has it
        rows = await api(url, "/api/connections")
        mqtt = [r for r in rows if r["protocol"] == "mqtt" and r["kind"] == "device"]
        assert len(mqtt) == 1, rows
        assert (mqtt[0]["kind"], mqtt[0]["endpoint"]) == ("device", "mqtt")
        assert mqtt[0]["remote"].startswith("127.0.0.1:")
        # The hub counts one MQTT connection; the connector says so too.
        assert hub.recorder.connections["mqtt"].opened == 1
        state = connector(await api(url, "/api/connectors"), "iothub-mqtt")
        assert (state["state"], state["connections"]) == ("connected", 1)
        await dev.disconnect()
    finally:
        await trio.to_thread.run_sync(dev.close)
    rows = await wait_api(url, "/api/connectors",
                          lambda rs: connector(rs, "iothub-mqtt")["state"] == "idle")  # fmt: skip
    assert connector(rows, "iothub-mqtt")["connections"] == 0
    await wait_api(url, "/api/connections", lambda rs: not any(r["protocol"] == "mqtt" for r in rs))

    routes = await api(url, "/api/routes")
    assert {"kind": "mqtt", "hub": "*", "connector": "iothub-mqtt"} in routes
    assert any(r.get("kind") == "link" and r.get("prefix") == "devices/" for r in routes)


async def test_amqp_link_counters_upstream_links_and_relay_latency(
    nursery, hub, keys, tmp_path
) -> None:
    text = gateway_yaml(hub, mqtt=False)
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", text))
    url = admin_url(daemon)
    sent = 12
    dev = await in_thread(Device, f"amqp://127.0.0.1:{port_of(daemon, 'amqp')}")
    try:
        await in_thread(dev.authenticate, "dev1", keys["dev1"])
        sender = await in_thread(dev.conn.create_sender, EVENTS % "dev1")
        messages = [data_message(f"reading {i}".encode()) for i in range(sent)]
        states = await in_thread(send_all, sender, dev.conn, messages)
        assert len(states) == sent
        assert len([r for r in hub.recorder.d2c if r.device_id == "dev1"]) == sent

        links = await api(url, "/api/links")
        link = next(x for x in links if x["address"] == "devices/dev1/messages/events")
        assert link["deliveries"] == sent
        assert link["credit"] > 0 and link["unsettled"] == 0
        assert link["device_id"] == "dev1"
        conns = await api(url, "/api/connections")
        upstream = next(c for c in conns if c["kind"] == "upstream")
        assert upstream["links"] == 1 and upstream["device_ids"] == ["dev1"]
        device = next(c for c in conns if c["kind"] == "device")
        assert device["device_ids"] == ["dev1"]
    finally:
        await in_thread(dev.close)

    samples = await scrape(url)
    assert metric(samples, "iotgw_relay_latency_seconds_count", protocol="amqp") >= sent
    assert metric(samples, "iotgw_relay_latency_seconds_sum", protocol="amqp") > 0


def status_rows(url: str) -> dict[str, list[str]]:
    """`iot-gateway status --all`'s Connections table: row cells by connection id."""
    out = io.StringIO()
    assert status_main(["--admin", url, "--all"], out=out) == 0
    lines = out.getvalue().splitlines()
    start = lines.index("Connections")
    header = lines[start + 1].split()
    rows = {}
    for line in lines[start + 2:]:
        cells = line.split()
        if not cells:
            break
        if len(cells) == len(header):
            rows[cells[0]] = cells
    return {key: dict(zip(header, cells, strict=True)) for key, cells in rows.items()}


async def test_amqp_upstream_connection_counts_messages_both_ways(
    nursery, hub, keys, tmp_path
) -> None:
    text = gateway_yaml(hub, mqtt=False)
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", text))
    url = admin_url(daemon)
    sent, c2d = 25, 3
    dev = await in_thread(Device, f"amqp://127.0.0.1:{port_of(daemon, 'amqp')}")
    try:
        await in_thread(dev.authenticate, "dev1", keys["dev1"])
        sender = await in_thread(dev.conn.create_sender, EVENTS % "dev1")
        messages = [data_message(f"reading {i}".encode()) for i in range(sent)]
        assert len(await in_thread(send_all, sender, dev.conn, messages)) == sent
        rx = await in_thread(dev.conn.create_receiver, DEVICEBOUND % "dev1", credit=c2d)
        for i in range(c2d):
            await in_thread(hub.send_c2d, "dev1", b"cmd %d" % i)
            await in_thread(rx.receive, TIMEOUT)
        await in_thread(rx.accept)
        conns = await api(url, "/api/connections")
        up = next(c for c in conns if c["kind"] == "upstream")
        device = next(c for c in conns if c["kind"] == "device")
        # What the device sent went out on the hub connection, what it got came in on it.
        assert (up["messages_out"], up["messages_in"]) == (sent, c2d)
        assert (device["messages_in"], device["messages_out"]) == (sent, c2d)
        assert up["bytes_out"] == device["bytes_in"] > 0
        assert up["bytes_in"] == device["bytes_out"] > 0
        shown = (await in_thread(status_rows, url))[up["id"]]
        assert (shown["msg-out"], shown["msg-in"]) == (str(sent), str(c2d))
        assert (shown["bytes-out"], shown["bytes-in"]) == (str(up["bytes_out"]), str(up["bytes_in"]))
    finally:
        await in_thread(dev.close)


async def test_mqtt_upstream_connection_listed_with_counts(nursery, hub, keys, tmp_path) -> None:
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", gateway_yaml(hub)))
    url = admin_url(daemon)
    sent = 7
    dev = PahoDevice(
        "dev2", username=username("dev2"), password=mqtt_sas_token("dev2", keys["dev2"])
    )
    try:
        assert await dev.connect(port_of(daemon, "mqtt")) == 0
        await dev.subscribe("devices/dev2/messages/devicebound/#", qos=1)
        for i in range(sent):
            await dev.publish(MQTT_EVENTS.format("dev2"), b"reading %d" % i, qos=1)
        await in_thread(hub.send_c2d, "dev2", b"cmd")
        await dev.receive()
        assert len([r for r in hub.recorder.d2c if r.device_id == "dev2"]) == sent
        rows = await api(url, "/api/connections")
        up = next(r for r in rows if r["protocol"] == "mqtt" and r["kind"] == "upstream")
        device = next(r for r in rows if r["protocol"] == "mqtt" and r["kind"] == "device")
        assert up["endpoint"] == "iothub-mqtt" and up["device_ids"] == ["dev2"]
        # Messages are PUBLISH packets; bytes every packet relayed (CONNECT, PUBACKs...).
        assert (up["messages_out"], up["messages_in"]) == (sent, 1)
        assert (device["messages_in"], device["messages_out"]) == (sent, 1)
        assert up["bytes_out"] == device["bytes_in"] > 0
        assert up["bytes_in"] == device["bytes_out"] > 0
        shown = (await in_thread(status_rows, url))[up["id"]]
        assert (shown["msg-out"], shown["msg-in"]) == (str(sent), "1")
        await dev.disconnect()
    finally:
        await trio.to_thread.run_sync(dev.close)
    await wait_api(url, "/api/connections", lambda rs: not any(r["protocol"] == "mqtt" for r in rs))


async def test_mqtt_hub_restarts_leave_no_upstream_behind(nursery, hub, keys, tmp_path) -> None:
    """Each MQTT session has its own hub connection: after the hub restarted under
    it 5 times (each time a new session, one refused while the hub was down) exactly
    the live session's is listed and counted, and none once it has gone."""
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", gateway_yaml(hub)))
    url = admin_url(daemon)
    port = port_of(daemon, "mqtt")

    def new_device() -> PahoDevice:
        return PahoDevice(
            "dev2", username=username("dev2"), password=mqtt_sas_token("dev2", keys["dev2"])
        )

    def upstreams(rows: list[dict]) -> list[dict]:
        return [r for r in rows if r["protocol"] == "mqtt" and r["kind"] == "upstream"]

    for _ in range(5):
        dev = new_device()
        try:
            assert await dev.connect(port) == 0
            await dev.publish(MQTT_EVENTS.format("dev2"), b"before", qos=1)
            await in_thread(hub.stop)
            assert await dev.wait_disconnected()  # its session ended with the hub's connection
        finally:
            await trio.to_thread.run_sync(dev.close)
        down = new_device()
        try:
            assert await down.connect(port) != 0  # hub unavailable: refused
        finally:
            await trio.to_thread.run_sync(down.close)
        await in_thread(hub.start)
    dev = new_device()
    try:
        assert await dev.connect(port) == 0
        await dev.publish(MQTT_EVENTS.format("dev2"), b"after", qos=1)
        rows = await wait_api(url, "/api/connections", lambda rs: len(upstreams(rs)) == 1)
        assert len(upstreams(rows)) == 1
        assert connector(await api(url, "/api/connectors"), "iothub-mqtt")["connections"] == 1
        await dev.disconnect()
    finally:
        await trio.to_thread.run_sync(dev.close)
    await wait_api(url, "/api/connections", lambda rs: not upstreams(rs))
    rows = await wait_api(url, "/api/connectors",
                          lambda rs: connector(rs, "iothub-mqtt")["state"] == "idle")  # fmt: skip
    assert connector(rows, "iothub-mqtt")["connections"] == 0
    await in_thread(hub.recorder.wait_for, lambda: hub.recorder.connections["mqtt"].open == 0, 30)
