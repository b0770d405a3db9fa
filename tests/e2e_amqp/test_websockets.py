"""AMQP over WebSockets, through Debian's tinyproxy with Basic auth, to hubsim's
``/$iothub/websocket`` (subprotocol AMQPWSB10): proton devices on the LAN side
speak plain AMQP to the gateway and see nothing different; the hub receives
every message bit for bit; the pool shares connections as over TCP; a hub that
closes the WebSocket is a lost connection, reconnected."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from gw_helpers import (
    HUB_HOST,
    Device,
    data_message,
    gateway_config,
    in_thread,
    running_gateway,
)

from gateway.hubsim import HubSim

sys.path.insert(0, str(Path(__file__).parents[1]))

from net.proxies import needs_tinyproxy, tinyproxy  # noqa: E402

pytestmark = [needs_tinyproxy, pytest.mark.timeout(600)]


@pytest.fixture
def ws_hub(keys: dict[str, str]) -> Iterator[HubSim]:
    sim = HubSim(keys, hub_host=HUB_HOST, mqtt_port=None, ws_port=0)
    with sim:
        yield sim
    sim.close()


def ws_config(
    hub: HubSim, tmp_path: Path, proxy_url: str, secret: Path, *, on_demand: bool = True
) -> object:
    config = gateway_config(
        hub,
        tmp_path,
        max_connections=1,
        connector_extra=(
            "    transport: websockets\n"
            f"    proxy: {{url: '{proxy_url}', username: gw, password_file: '{secret}'}}\n"
            f"    on_demand: {'true' if on_demand else 'false'}\n"
        ),
    )
    # gateway_config names the TCP port; over WebSockets the hub listens elsewhere.
    connector = config.connectors[0]  # type: ignore[attr-defined]
    connector.port = hub.ws_port
    return config


def send_telemetry(url: str, device_id: str, key: str, bodies: list[bytes]) -> list[bytes]:
    with Device(url) as dev:
        reply = dev.authenticate(device_id, key)
        assert reply.properties["status-code"] == 200
        sender = dev.conn.create_sender(f"amqps://{HUB_HOST}/devices/{device_id}/messages/events")
        messages = [data_message(body, id=f"{device_id}-{i}") for i, body in enumerate(bodies)]
        for message in messages:
            sender.send(message)
        return [m.encode() for m in messages]


async def test_devices_over_websockets_through_an_authenticating_proxy(
    ws_hub: HubSim, keys: dict[str, str], tmp_path: Path
) -> None:
    secret = tmp_path / "proxy-password"
    secret.write_text("s3cret\n")
    async with tinyproxy(tmp_path, connect_ports=[ws_hub.ws_port], auth=("gw", "s3cret")) as p:
        config = ws_config(ws_hub, tmp_path, p.url, secret)
        async with running_gateway(config) as gw:
            sent: list[bytes] = []
            for device_id in ("dev1", "dev2"):
                sent += await in_thread(
                    send_telemetry, gw.url, device_id, keys[device_id], [b"a", b"b" * 70000]
                )
            # Pooled: both devices shared one hub connection, which is a WebSocket.
            assert ws_hub.open_connections("amqp") == 1
        tunnels = [line for line in p.log if f"CONNECT 127.0.0.1:{ws_hub.ws_port}" in line]
        assert len(tunnels) == 1
    assert [r.raw for r in ws_hub.recorder.d2c] == sent


async def test_hub_closing_the_websocket_is_a_lost_connection(
    ws_hub: HubSim, keys: dict[str, str], tmp_path: Path
) -> None:
    secret = tmp_path / "proxy-password"
    secret.write_text("s3cret")
    async with tinyproxy(tmp_path, connect_ports=[ws_hub.ws_port], auth=("gw", "s3cret")) as p:
        config = ws_config(ws_hub, tmp_path, p.url, secret, on_demand=False)
        async with running_gateway(config) as gw:
            first = await in_thread(send_telemetry, gw.url, "dev1", keys["dev1"], [b"before"])
            opened = ws_hub.recorder.connections["amqp"].opened
            ws_hub.disconnect_all()  # AMQP close, then a WebSocket close from the hub
            # The pool (always on) reconnects by itself, through the proxy again.
            await trio.to_thread.run_sync(
                ws_hub.recorder.wait_for,
                lambda: ws_hub.recorder.connections["amqp"].opened > opened
                and ws_hub.recorder.connections["amqp"].open == 1,
                30,
            )
            second = await in_thread(send_telemetry, gw.url, "dev3", keys["dev3"], [b"after"])
        tunnels = [line for line in p.log if f"CONNECT 127.0.0.1:{ws_hub.ws_port}" in line]
        assert len(tunnels) >= 2
    raws = [r.raw for r in ws_hub.recorder.d2c]
    assert first[0] in raws and second[0] in raws
