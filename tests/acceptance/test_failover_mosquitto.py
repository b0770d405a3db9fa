"""Failover through `iot-gateway run`: an MQTT connector with two mosquitto endpoints.

The first broker is stopped under a connected device: the device sees its
connection closed, and its next connection goes to the second broker. Each
broker has its own subscriber (TLS, verified chain) observing what arrived.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.waiting import FAILSAFE

from .conftest import Pki
from .gateway_proc import GatewayProcess, run_cli, start_gateway, wait_until, write_config
from .mqtt_peers import MOSQUITTO, Mosquitto, PahoClient, start_mosquitto

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto is not installed"),
]

HUB = "myhub.azure-devices.net"
TOKEN = "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev&sig=abc%3D&se=4102444800"
TOPIC = "devices/dev1/messages/events/"


def gateway_yaml(pki: Pki, first: int, second: int) -> str:
    return f"""\
gateway:
  id: acceptance-gw-failover
admin:
  listen: 127.0.0.1:0
log: {{level: info, format: text}}
tls_profiles:
  upstream:
    ca_file: {pki.ca_file}
    server_name: {pki.server_name}
listeners:
  - {{name: mqtt, protocol: mqtt, bind: "127.0.0.1:0"}}
connectors:
  - name: broker
    protocol: mqtt
    hosts: ["127.0.0.1:{first}", "127.0.0.1:{second}"]
    tls_profile: upstream
mqtt_routes:
  - {{hub: "*", connector: broker}}
"""


def observer(broker: Mosquitto, pki: Pki, name: str) -> PahoClient:
    client = PahoClient(name)
    assert client.connect_tls(broker.port, pki.ca_file, pki.server_name) == 0
    assert client.subscribe("#", qos=1) == [1]
    return client


def device(gw: GatewayProcess) -> PahoClient:
    dev = PahoClient("dev1", username=f"{HUB}/dev1/?api-version=2021-04-12", password=TOKEN)
    assert dev.connect_plain(gw.port("mqtt")) == 0
    return dev


@pytest.fixture
def brokers(tmp_path: Path, pki: Pki) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    started: list[Mosquitto] = []
    try:
        for name in ("first", "second"):
            (tmp_path / name).mkdir()
            started.append(start_mosquitto(tmp_path / name, pki.cert_file, pki.key_file))
        yield started[0], started[1]
    finally:
        for broker in started:
            broker.stop()


def test_first_broker_stops_under_a_device_the_next_connection_goes_to_the_second(
    tmp_path: Path, pki: Pki, brokers: tuple[Mosquitto, Mosquitto]
) -> None:
    first, second = brokers
    gw = start_gateway(
        write_config(tmp_path, gateway_yaml(pki, first.port, second.port)), listeners=("mqtt",)
    )
    watch_first, watch_second = observer(first, pki, "watch-1"), observer(second, pki, "watch-2")
    try:
        dev = device(gw)
        dev.publish(TOPIC, b"before", qos=1)
        assert watch_first.receive().payload == b"before"

        first.stop()  # the endpoint in use dies
        dev.disconnects.get(timeout=FAILSAFE)  # the device sees its connection go, as with one host
        dev.close()

        again = device(gw)  # refused at the first endpoint, relayed to the second
        again.publish(TOPIC, b"after", qos=1)
        received = watch_second.receive()
        assert (received.topic, received.payload) == (TOPIC, b"after")
        again.close()
        assert watch_first.messages.empty()

        status, body, _ = gw.http_get("/api/connectors")
        assert status == 200
        [state] = json.loads(body)
        assert state["endpoints"] == [f"127.0.0.1:{first.port}", f"127.0.0.1:{second.port}"]
        assert state["endpoint"] == f"127.0.0.1:{second.port}"
        assert state["skipped"] == [
            {
                "endpoint": f"127.0.0.1:{first.port}",
                "reason": "refused",
                "detail": "connect refused (127.0.0.1)",
            }
        ]
        line = f"connector broker: endpoint 127.0.0.1:{first.port} failed: connect refused"
        wait_until(lambda: line in gw.log(), what="the failed endpoint's log line")
        log = gw.log()
        assert TOKEN not in log and "sig=abc" not in log

        shown = run_cli("status", "--admin", gw.admin_url)
        assert shown.returncode == 0, shown.stderr
        assert f"skipped: 127.0.0.1:{first.port}: connect refused (127.0.0.1)" in shown.stdout
        assert f"127.0.0.1:{second.port} (127.0.0.1)" in shown.stdout
    finally:
        watch_first.close()
        watch_second.close()
        assert gw.stop() == 0
