"""Failover endpoints (`hosts:`) through the in-process daemon, hubsim as the hub.

Endpoints are loopback addresses: a "dead" one is a bound but not listening
port (connects are refused at once), a "dying" one a TCP relay on 127.0.0.2
in front of hubsim that the test kills (listener closed, connections reset).
Deliveries are asserted at the hub's recorder; what the gateway says about
its endpoints is read from /api/connectors and `iot-gateway status`.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from proton import Endpoint
from proton.utils import LinkDetached

from gateway.ops import status
from tests.e2e_amqp.gw_helpers import (
    TIMEOUT,
    Device,
    authenticated_device,
    data_message,
    in_thread,
)
from tests.mqtt.paho_device import PahoDevice
from tests.mqtt.test_relay_hubsim import sas_token as mqtt_sas_token
from tests.mqtt.test_relay_hubsim import username

from .helpers import (
    EVENTS,
    MQTT_EVENTS,
    admin_url,
    http_get,
    metric,
    port_of,
    scrape,
    start_daemon,
    write_config,
)
from .test_admin_state import connector, wait_api


class Relay:
    """A TCP relay on `host` to hubsim's port on 127.0.0.1: an endpoint that can die."""

    def __init__(self, target_port: int, host: str = "127.0.0.2", port: int = 0) -> None:
        self.target_port = target_port
        self.host = host
        self.port = port
        self.accepted = 0
        self._streams: list[trio.SocketStream] = []
        self._scope: trio.CancelScope | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async def handler(client: trio.SocketStream) -> None:
            self.accepted += 1
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            self._streams += [client, upstream]

            async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
                try:
                    while data := await a.receive_some(65536):
                        await b.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                await trio.aclose_forcefully(b)

            async with trio.open_nursery() as n:
                n.start_soon(pump, client, upstream)
                n.start_soon(pump, upstream, client)

        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as n:
                await n.start(trio.serve_listeners, handler, listeners)
                task_status.started(self)

    async def kill(self) -> None:
        """The endpoint dies: no more connects (refused), every connection reset."""
        assert self._scope is not None
        self._scope.cancel()
        for s in self._streams:
            try:
                s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            await trio.aclose_forcefully(s)
        self._streams.clear()


@pytest.fixture
def dead() -> Iterator[Any]:
    """dead("127.0.0.3") -> "127.0.0.3:port": bound, not listening, so refused."""
    held: list[socket.socket] = []

    def make(host: str) -> str:
        sock = socket.socket()
        sock.bind((host, 0))
        held.append(sock)
        return f"{host}:{sock.getsockname()[1]}"

    yield make
    for sock in held:
        sock.close()


def failover_yaml(hub: Any, amqp_hosts: list[str], mqtt_hosts: list[str], extra_connectors: str = "",
                  extra_routes: str = "", mqtt_routes: str = "") -> str:  # fmt: skip
    return f"""
gateway: {{id: gw-failover}}
admin: {{listen: "127.0.0.1:0"}}
log: {{level: info}}
tls_profiles:
  hub: {{ca_file: "{hub.ca_file}", server_name: {hub.hub_host}}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "127.0.0.1:0"}}
  - {{name: mqtt, protocol: mqtt, bind: "127.0.0.1:0"}}
connectors:
  - name: iothub
    protocol: amqp
    hosts: {json.dumps(amqp_hosts)}
    tls_profile: hub
    connect_timeout: 5s
    reconnect: {{initial: 0.2s, max: 0.5s}}
    pool: {{max_connections: 1}}
  - name: iothub-mqtt
    protocol: mqtt
    hosts: {json.dumps(mqtt_hosts)}
    tls_profile: hub
    connect_timeout: 5s
{extra_connectors}
link_routes:
  - {{prefix: "$cbs", connector: iothub}}
  - {{prefix: "devices/", connector: iothub}}
{extra_routes}
mqtt_routes:
{mqtt_routes}  - {{hub: "*", connector: iothub-mqtt}}
"""


async def api(url: str, path: str) -> Any:
    code, body = await trio.to_thread.run_sync(http_get, url + path)
    assert code == 200, body
    return json.loads(body)


async def run_status(argv: list[str]) -> str:
    out = io.StringIO()
    with trio.fail_after(TIMEOUT):
        code = await trio.to_thread.run_sync(lambda: status.main(argv, out=out))
    assert code == 0
    return out.getvalue()


def d2c_bodies(hub: Any, device_id: str) -> list[bytes]:
    return [r.body for r in hub.recorder.d2c if r.device_id == device_id]


def mqtt_device(keys: dict[str, str], device_id: str) -> PahoDevice:
    return PahoDevice(
        device_id, username=username(device_id), password=mqtt_sas_token(device_id, keys[device_id])
    )


def send_until_delivered(url: str, key: str, body: bytes) -> None:
    """A device that came back after losing its links: reconnect and send once,
    retrying (bounded) while the gateway is still finding the next endpoint."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        dev = Device(url)
        try:
            dev.authenticate("dev1", key)
            dev.conn.create_sender(EVENTS % "dev1").send(data_message(body))
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        finally:
            dev.close()


def wait_detached(dev: Device, link: Any) -> str | None:
    """Block until the gateway detaches `link`; its detach's error condition."""
    try:
        dev.conn.wait(lambda: link.link.state & Endpoint.REMOTE_CLOSED, timeout=TIMEOUT,
                      msg="waiting for the gateway to detach the link")  # fmt: skip
    except LinkDetached as exc:
        return str(exc.condition)
    cond = link.link.remote_condition
    return cond.name if cond is not None else None


# ------------------------------------------------------------------------------ tests


async def test_dead_first_endpoint_skipped_amqp_and_mqtt_deliver(nursery, hub, keys, tmp_path,
                                                                 dead) -> None:  # fmt: skip
    dead_amqp, dead_mqtt = dead("127.0.0.3"), dead("127.0.0.3")
    live_amqp, live_mqtt = f"127.0.0.1:{hub.amqp_port}", f"127.0.0.1:{hub.mqtt_port}"
    text = failover_yaml(hub, [dead_amqp, live_amqp], [dead_mqtt, live_mqtt])
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", text))
    url = admin_url(daemon)

    def amqp_device() -> None:
        with authenticated_device(f"amqp://127.0.0.1:{port_of(daemon, 'amqp')}", "dev1",
                                  keys["dev1"]) as dev:  # fmt: skip
            sender = dev.conn.create_sender(EVENTS % "dev1")
            for i in range(5):
                sender.send(data_message(b"amqp %d" % i))

    await in_thread(amqp_device)
    assert d2c_bodies(hub, "dev1") == [b"amqp %d" % i for i in range(5)]

    dev = mqtt_device(keys, "dev2")
    try:
        assert await dev.connect(port_of(daemon, "mqtt")) == 0
        await dev.publish(MQTT_EVENTS.format("dev2"), b"mqtt 0", qos=1)  # PUBACK: the hub has it
        assert d2c_bodies(hub, "dev2") == [b"mqtt 0"]
        rows = await api(url, "/api/connectors")
    finally:
        await trio.to_thread.run_sync(dev.close)

    amqp, mqtt = connector(rows, "iothub"), connector(rows, "iothub-mqtt")
    assert amqp["endpoints"] == [dead_amqp, live_amqp]
    assert (amqp["endpoint"], amqp["address"]) == (live_amqp, "127.0.0.1")
    assert amqp["skipped"] == [
        {"endpoint": dead_amqp, "reason": "refused", "detail": "connect refused (127.0.0.3)"}
    ]
    assert (mqtt["endpoint"], mqtt["state"]) == (live_mqtt, "connected")
    assert [s["endpoint"] for s in mqtt["skipped"]] == [dead_mqtt]
    upstream = [c for c in await api(url, "/api/connections") if c["kind"] == "upstream"]
    assert [c["remote"] for c in upstream] == [live_amqp]

    text = await run_status(["--admin", url, "--connectors"])
    row = next(line for line in text.splitlines() if line.strip().startswith("iothub "))
    assert row.split()[6] == live_amqp  # in-use
    assert "Skipped endpoints" in text
    summary = (await run_status(["--admin", url])).splitlines()  # the one-screen summary
    assert any(line.rstrip().endswith(f"in use: {live_amqp} (127.0.0.1)") for line in summary)
    assert any(line.rstrip().endswith(f"skipped: {dead_amqp}: connect refused (127.0.0.3)")
               for line in summary)  # fmt: skip
    assert any(line.split()[:2] == ["iothub", dead_amqp] and
               line.endswith("connect refused (127.0.0.3)") for line in text.splitlines())  # fmt: skip


async def test_first_endpoint_dies_in_use_next_connect_goes_to_second(nursery, hub, keys,
                                                                      tmp_path, caplog) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="gateway")
    amqp_relay = await nursery.start(Relay(hub.amqp_port).run)
    mqtt_relay = await nursery.start(Relay(hub.mqtt_port).run)
    first_amqp, first_mqtt = f"127.0.0.2:{amqp_relay.port}", f"127.0.0.2:{mqtt_relay.port}"
    live_amqp, live_mqtt = f"127.0.0.1:{hub.amqp_port}", f"127.0.0.1:{hub.mqtt_port}"
    text = failover_yaml(hub, [first_amqp, live_amqp], [first_mqtt, live_mqtt])
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", text))
    url = admin_url(daemon)
    amqp_url = f"amqp://127.0.0.1:{port_of(daemon, 'amqp')}"

    # AMQP: a device sending over the first endpoint loses its links when it dies,
    # as it would on any hub connection loss (amqp:connection:forced) ...
    def before_and_cut() -> str | None:
        with authenticated_device(amqp_url, "dev1", keys["dev1"]) as dev:
            sender = dev.conn.create_sender(EVENTS % "dev1")
            sender.send(data_message(b"before"))
            trio.from_thread.run(amqp_relay.kill)
            return wait_detached(dev, sender)

    mqtt_dev = mqtt_device(keys, "dev2")
    try:
        assert await mqtt_dev.connect(port_of(daemon, "mqtt")) == 0
        await mqtt_dev.publish(MQTT_EVENTS.format("dev2"), b"before", qos=1)
        rows = await api(url, "/api/connectors")
        assert connector(rows, "iothub-mqtt")["endpoint"] == first_mqtt
        assert await in_thread(before_and_cut) == "amqp:connection:forced"
        # ... and an MQTT device sees its connection closed.
        await mqtt_relay.kill()
        assert await mqtt_dev.wait_disconnected(TIMEOUT)
    finally:
        await trio.to_thread.run_sync(mqtt_dev.close)
    assert amqp_relay.accepted == 1 and mqtt_relay.accepted == 1

    # The next connects go to the second endpoint.
    await in_thread(send_until_delivered, amqp_url, keys["dev1"], b"after")
    again = mqtt_device(keys, "dev2")
    try:
        assert await again.connect(port_of(daemon, "mqtt")) == 0
        await again.publish(MQTT_EVENTS.format("dev2"), b"after", qos=1)
    finally:
        await trio.to_thread.run_sync(again.close)
    assert d2c_bodies(hub, "dev1") == [b"before", b"after"]
    assert d2c_bodies(hub, "dev2") == [b"before", b"after"]

    rows = await api(url, "/api/connectors")
    amqp, mqtt = connector(rows, "iothub"), connector(rows, "iothub-mqtt")
    assert amqp["endpoint"] == live_amqp and mqtt["endpoint"] == live_mqtt
    assert amqp["skipped"] == [
        {"endpoint": first_amqp, "reason": "refused", "detail": "connect refused (127.0.0.2)"}
    ]
    assert [s["detail"] for s in mqtt["skipped"]] == ["connect refused (127.0.0.2)"]
    # Each relayed MQTT session names the endpoint it went to.
    sessions = [
        r.getMessage() for r in caplog.records if "-> connector iothub-mqtt" in r.getMessage()
    ]
    assert [f"({first_mqtt})" in m for m in sessions] == [True, False]
    assert f"({live_mqtt})" in sessions[1]


async def test_both_endpoints_down_connector_backs_off_others_carry_on(
    nursery, hub, keys, tmp_path, dead, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    spare = [dead("127.0.0.3"), dead("127.0.0.4")]
    extra_connectors = f"""\
  - name: spare
    protocol: amqp
    hosts: {json.dumps(spare)}
    tls_profile: hub
    on_demand: false
    reconnect: {{initial: 0.05s, max: 0.1s}}
  - name: spare-mqtt
    protocol: mqtt
    hosts: {json.dumps(spare)}
    tls_profile: hub
"""
    text = failover_yaml(
        hub,
        [f"127.0.0.1:{hub.amqp_port}"],
        [f"127.0.0.1:{hub.mqtt_port}"],
        extra_connectors,
        '  - {prefix: "spare/", connector: spare}\n',
        "  - {hub: spare.example, connector: spare-mqtt}\n",
    )
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", text))
    url = admin_url(daemon)

    # The spare connector fails round after round, backing off between them.
    with trio.fail_after(TIMEOUT):
        while metric(await scrape(url), "iotgw_reconnects_total", connector="spare") < 2:
            await trio.sleep(0.05)
    rows = await wait_api(url, "/api/connectors",
                          lambda rs: connector(rs, "spare")["state"] == "backoff")  # fmt: skip
    state = connector(rows, "spare")
    assert state["endpoint"] is None and state["connections"] == 0
    assert [(s["endpoint"], s["detail"]) for s in state["skipped"]] == [
        (spare[0], "connect refused (127.0.0.3)"),
        (spare[1], "connect refused (127.0.0.4)"),
    ]

    # One line per failed endpoint, then the connector error; nothing secret.
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("gateway")]
    assert f"connector spare: endpoint {spare[0]} failed: connect refused (127.0.0.3)" in lines
    assert f"connector spare: endpoint {spare[1]} failed: connect refused (127.0.0.4)" in lines
    assert any(line.startswith("connector spare: connect failed: ") and "every endpoint failed"
               in line for line in lines)  # fmt: skip

    # Meanwhile the other connectors carry devices as usual.
    def amqp_device() -> None:
        with authenticated_device(f"amqp://127.0.0.1:{port_of(daemon, 'amqp')}", "dev1",
                                  keys["dev1"]) as dev:  # fmt: skip
            dev.conn.create_sender(EVENTS % "dev1").send(data_message(b"fine"))

    await in_thread(amqp_device)
    assert d2c_bodies(hub, "dev1") == [b"fine"]
    dev = mqtt_device(keys, "dev2")
    try:
        assert await dev.connect(port_of(daemon, "mqtt")) == 0
        await dev.publish(MQTT_EVENTS.format("dev2"), b"fine", qos=1)
    finally:
        await trio.to_thread.run_sync(dev.close)
    assert d2c_bodies(hub, "dev2") == [b"fine"]

    # An MQTT device routed to the dead connector is told "server unavailable".
    refused = PahoDevice("dev3", username="spare.example/dev3/?api-version=2021-04-12",
                         password="not-a-real-token")  # fmt: skip
    try:
        assert await refused.connect(port_of(daemon, "mqtt")) == "Server unavailable"  # CONNACK 3
    finally:
        await trio.to_thread.run_sync(refused.close)
    assert not any("not-a-real-token" in r.getMessage() for r in caplog.records)
    rows = await api(url, "/api/connectors")
    assert len(connector(rows, "spare-mqtt")["skipped"]) == 2
    assert connector(rows, "iothub")["state"] == "connected"


class Resolver(trio.abc.HostnameResolver):
    """The hub's name -> its current address; counts lookups (trio's getaddrinfo seam)."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.lookups = 0

    async def getaddrinfo(self, host: Any, port: Any, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> list[Any]:  # fmt: skip
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        self.lookups += 1
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (self.names[name], int(port)))]

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:
        raise NotImplementedError


async def test_hub_name_resolved_again_on_every_connect(nursery, hub, keys, tmp_path) -> None:
    """The hub's address changes (a failover moved it): the next connect follows the name."""
    old_address = await nursery.start(Relay(hub.amqp_port, "127.0.0.2", hub.amqp_port).run)
    resolver = Resolver({"hub.failover.test": "127.0.0.2"})
    trio.socket.set_custom_hostname_resolver(resolver)
    text = failover_yaml(hub, [f"hub.failover.test:{hub.amqp_port}"],
                         [f"127.0.0.1:{hub.mqtt_port}"])  # fmt: skip
    daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", text))
    url = admin_url(daemon)
    amqp_url = f"amqp://127.0.0.1:{port_of(daemon, 'amqp')}"

    def before_and_cut() -> str | None:
        with authenticated_device(amqp_url, "dev1", keys["dev1"]) as dev:
            sender = dev.conn.create_sender(EVENTS % "dev1")
            sender.send(data_message(b"old address"))
            resolver.names["hub.failover.test"] = "127.0.0.1"
            trio.from_thread.run(old_address.kill)
            return wait_detached(dev, sender)

    assert await in_thread(before_and_cut) == "amqp:connection:forced"
    await in_thread(send_until_delivered, amqp_url, keys["dev1"], b"new address")
    assert d2c_bodies(hub, "dev1") == [b"old address", b"new address"]
    assert old_address.accepted == 1
    assert resolver.lookups >= 2
    state = connector(await api(url, "/api/connectors"), "iothub")
    assert (state["endpoint"], state["address"]) == (
        f"hub.failover.test:{hub.amqp_port}",
        "127.0.0.1",
    )
    assert state["skipped"] == []
