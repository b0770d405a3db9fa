"""Failover over WebSockets through an HTTP proxy (Debian's tinyproxy) to hubsim.

With a proxy the gateway resolves nothing itself: each endpoint goes to the
proxy by name. The first names a host that does not exist, so the proxy
refuses the tunnel; the second reaches hubsim's WebSocket port. The hub
records what the device sent; the dial report says why the first was skipped.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from gw_helpers import HUB_HOST, Device, data_message, in_thread, running_gateway

from gateway.config import parse_config_text
from gateway.hubsim import HubSim
from gateway.net import hooks
from gateway.net.dial import DialReport, Endpoint

sys.path.insert(0, str(Path(__file__).parents[1]))

from net.proxies import needs_tinyproxy, tinyproxy  # noqa: E402

pytestmark = [needs_tinyproxy, pytest.mark.timeout(600)]

DEAD = "no-such-hub.invalid"


@pytest.fixture
def ws_hub(keys: dict[str, str]) -> Iterator[HubSim]:
    sim = HubSim(keys, hub_host=HUB_HOST, mqtt_port=None, ws_port=0)
    with sim:
        yield sim
    sim.close()


class NoLookups(trio.abc.HostnameResolver):
    """trio's getaddrinfo seam: the gateway must not resolve endpoint names itself."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def getaddrinfo(self, host: Any, port: Any, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> list[Any]:  # fmt: skip
        self.asked.append(host.decode() if isinstance(host, bytes) else str(host))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:
        raise NotImplementedError


async def test_endpoints_handed_to_the_proxy_by_name_first_refused_second_used(
    ws_hub: HubSim, keys: dict[str, str], tmp_path: Path
) -> None:
    resolver = NoLookups()
    trio.socket.set_custom_hostname_resolver(resolver)
    reports: list[DialReport] = []
    hooks.set_dial_hook(reports.append)
    async with tinyproxy(tmp_path) as proxy:
        text = f"""
gateway: {{id: gw-test}}
admin: {{enabled: false}}
tls_profiles:
  hub: {{ca_file: "{ws_hub.ca_file}", server_name: {HUB_HOST}}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "127.0.0.1:0"}}
connectors:
  - name: iothub
    protocol: amqp
    hosts: ["{DEAD}", "localhost:{ws_hub.ws_port}"]
    tls_profile: hub
    transport: websockets
    proxy: {{url: "{proxy.url}"}}
    connect_timeout: 10s
    reconnect: {{initial: 0.2s, max: 1s}}
link_routes:
  - {{prefix: "$cbs", connector: iothub}}
  - {{prefix: "devices/", connector: iothub}}
"""
        config = parse_config_text(text, str(tmp_path / "gateway.yaml"))

        def send() -> None:
            with Device(gw.url) as dev:
                assert dev.authenticate("dev1", keys["dev1"]).properties["status-code"] == 200
                sender = dev.conn.create_sender(f"amqps://{HUB_HOST}/devices/dev1/messages/events")
                sender.send(data_message(b"through the second endpoint"))

        async with running_gateway(config) as gw:
            await in_thread(send)
        tunnels = [line for line in proxy.log if "CONNECT" in line]
    assert [r.body for r in ws_hub.recorder.d2c] == [b"through the second endpoint"]
    assert resolver.asked == []  # the proxy resolved both names
    assert any(DEAD in line for line in tunnels)
    [report] = reports
    assert report.endpoint == Endpoint("localhost", ws_hub.ws_port)
    assert report.address is not None and report.address.startswith("proxy ")
    [skipped] = report.skipped
    assert skipped.endpoint == Endpoint(DEAD, 443)  # WebSockets: port 443 by default
    assert DEAD in skipped.detail
