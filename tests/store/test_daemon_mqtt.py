"""MQTT store-and-forward in the real daemon (`python -m gateway run`): a paho device,
hubsim stopped and started, and what /metrics says about it."""

from __future__ import annotations

import base64
import os
import random
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from gateway.hubsim import HubSim
from tests.acceptance.gateway_proc import start_gateway, wait_until, write_config

HUB = "myhub.azure-devices.net"
WAIT = 30.0


def loopback() -> str:
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


def test_daemon_stores_replays_and_counts(tmp_path: Path) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    hub = HubSim({"dev1": key}, hub_host=HUB, amqp_port=None, host=loopback())
    hub.start()
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text(f"dev1-key: {key}\n")
    secrets.chmod(0o600)
    host = loopback()
    path = write_config(
        tmp_path,
        f"""
admin: {{listen: "127.0.0.1:0"}}
tls_profiles:
  hubsim: {{ca_file: {hub.ca_file}, server_name: {HUB}}}
listeners:
  - {{name: mqtt, protocol: mqtt, bind: "{host}:0"}}
connectors:
  - {{name: iothub-mqtt, protocol: mqtt, host: {hub.host}, port: {hub.mqtt_port},
     tls_profile: hubsim}}
mqtt_routes:
  - {{hub: {HUB}, connector: iothub-mqtt}}
store_and_forward: {{path: store.db}}
credentials:
  secrets_file: {secrets}
  devices:
    - {{id: dev1, key: dev1-key, trust: network, store_and_forward: true}}
""",
    )
    gw = None
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev1",
                         reconnect_on_failure=False)  # fmt: skip
    try:
        hub.stop()
        gw = start_gateway(path, listeners=("mqtt",), timeout=60)
        client.username_pw_set(f"{HUB}/dev1/?api-version=2021-04-12")
        client.connect(host, gw.port("mqtt"))
        client.loop_start()
        infos = [
            client.publish(f"devices/dev1/messages/events/n={i}", b"%d" % i, qos=1)
            for i in range(5)
        ]
        client.publish("devices/dev1/messages/events/", b"qos0", qos=0)
        for info in infos:
            info.wait_for_publish(WAIT)  # returns at the PUBACK (fail-safe timeout)
            assert info.is_published()
        gw.wait_metric("iotgw_store_appended_total", lambda v: v == 5, connector="iothub-mqtt")
        gw.wait_metric("iotgw_mqtt_store_dropped_total", lambda v: v == 1, reason="qos0")
        assert gw.metric_sum("iotgw_store_backlog_messages", connector="iothub-mqtt") == 5
        assert hub.recorder.d2c == []

        hub.start()
        records = hub.recorder.wait_for(lambda: len(hub.recorder.d2c) >= 5 and hub.recorder.d2c,
                                        WAIT)  # fmt: skip
        assert [(r.topic, r.body) for r in records] == [
            (f"devices/dev1/messages/events/n={i}", b"%d" % i) for i in range(5)
        ]
        gw.wait_metric("iotgw_store_replayed_total", lambda v: v == 5, connector="iothub-mqtt")
        gw.wait_metric("iotgw_mqtt_sessions_closed_total", lambda v: v == 1,
                       reason="hub_reachable")  # fmt: skip
        assert gw.metric_sum("iotgw_store_backlog_messages", connector="iothub-mqtt") == 0
        wait_until(lambda: "backlog delivered (5 message(s)" in gw.log(), WAIT, "the log line")
    finally:
        client.loop_stop()
        if gw is not None:
            gw.stop()
        hub.close()
