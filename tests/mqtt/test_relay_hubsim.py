"""End to end with IoT Hub semantics: paho devices -> relay (plaintext) -> hubsim (TLS).

hubsim's MQTT side runs on amqtt's codec, not ours; the assertions read its
recorder (what the hub received), never the gateway's word. SAS tokens are
computed here with hmac, independently of gateway.auth and hubsim.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
from urllib.parse import quote_plus

import pytest
import trio

from gateway.config import parse_config_text
from gateway.daemon import serve_mqtt_listener
from gateway.hubsim import HubSim
from gateway.mqtt import encode
from gateway.mqtt_relay import CloseReason
from gateway.net.listeners import ListenerStats
from tests.net.forced_waits import ForcedWaits
from tests.waiting import FAILSAFE

from .paho_device import PahoDevice

HUB = "myhub.azure-devices.net"
EVENTS = "devices/{}/messages/events/"
WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def sas_token(device_id: str, key_b64: str, expiry: int | None = None) -> str:
    expiry = int(time.time()) + 3600 if expiry is None else expiry
    sr = quote_plus(f"{HUB}/devices/{device_id}")
    sig = hmac.new(base64.b64decode(key_b64), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    return f"SharedAccessSignature sr={sr}&sig={quote_plus(base64.b64encode(sig).decode())}&se={expiry}"


def username(device_id: str) -> str:
    return f"{HUB}/{device_id}/?api-version=2021-04-12"


class Observer:
    def __init__(self) -> None:
        self.closed: list[str] = []
        self.changed = trio.Event()

    def on_packet(self, direction, packet_type, nbytes):
        pass

    def on_close(self, reason):
        self.closed.append(reason)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_closed(self, *reasons: str) -> str:
        """The first close with one of `reasons`."""
        with trio.fail_after(WAIT):
            while True:
                for reason in self.closed:
                    if reason in reasons:
                        return reason
                await self.changed.wait()


@pytest.fixture
def keys() -> dict[str, str]:
    return {f"dev{i}": new_key() for i in range(1, 4)}


@pytest.fixture
def hub(keys):
    sim = HubSim(keys, hub_host=HUB, amqp_port=None)
    with sim:
        yield sim
    sim.close()


def gateway_config(hub: HubSim, **listener):
    extra = "".join(f"    {k}: {v}\n" for k, v in listener.items())
    return parse_config_text(
        f"""
admin: {{enabled: false}}
tls_profiles:
  hubsim: {{ca_file: {hub.ca_file}, server_name: {HUB}}}
listeners:
  - name: mqtt
    protocol: mqtt
    bind: "127.0.0.1:0"
{extra}connectors:
  - {{name: iothub-mqtt, protocol: mqtt, host: 127.0.0.1, port: {hub.mqtt_port}, tls_profile: hubsim}}
mqtt_routes:
  - {{hub: {HUB}, connector: iothub-mqtt}}
""",
        "gateway.yaml",
    )


@pytest.fixture
async def relay(nursery, hub):
    """(port, observer, stats) of a relay in front of the hub."""
    config = gateway_config(hub)
    observer, stats = Observer(), ListenerStats()

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        await serve_mqtt_listener(
            config.listeners[0], config, task_status=task_status, observer=observer, stats=stats
        )

    bound = await nursery.start(serve)
    return bound[0][1], observer, stats


@pytest.fixture
async def devices():
    made: list[PahoDevice] = []

    def make(
        device_id: str, key: str | None, *, password: str | None = None, **kwargs
    ) -> PahoDevice:
        token = password if password is not None else sas_token(device_id, key)
        device = PahoDevice(
            device_id, username=username(device_id), password=token, clean_session=False, **kwargs
        )
        made.append(device)
        return device

    yield make
    for device in made:
        await trio.to_thread.run_sync(device.close)


async def wait_for(hub: HubSim, predicate):
    return await trio.to_thread.run_sync(hub.recorder.wait_for, predicate, WAIT)


async def test_sas_connect_and_d2c_with_property_bags(relay, hub, keys, devices):
    port, _, _ = relay
    device = devices("dev1", keys["dev1"])
    assert await device.connect(port) == 0
    topic1 = EVENTS.format("dev1") + "%24.ct=application%2Fjson&%24.ce=utf-8&p=a%20b&flag"
    body1 = b'{"temperature": 21.5}'
    body0 = bytes(range(256))
    await device.publish(topic1, body1, qos=1)
    await device.publish(EVENTS.format("dev1") + "n=0", body0, qos=0)
    await wait_for(hub, lambda: len(hub.recorder.d2c) == 2)
    first, second = hub.recorder.d2c
    assert (first.device_id, first.qos, first.raw, first.topic) == ("dev1", 1, body1, topic1)
    assert first.properties == {
        "$.ct": "application/json",
        "$.ce": "utf-8",
        "p": "a b",
        "flag": None,
    }
    assert (second.qos, second.raw, second.properties) == (0, body0, {"n": "0"})
    auth = hub.recorder.auth[0]
    assert (auth.device_id, auth.mechanism, auth.ok) == ("dev1", "sas", True)


async def test_c2d_delivery_and_completion(relay, hub, keys, devices):
    port, _, _ = relay
    device = devices("dev1", keys["dev1"])
    assert await device.connect(port) == 0
    await device.subscribe("devices/dev1/messages/devicebound/#", qos=1)
    message_id = await trio.to_thread.run_sync(
        lambda: hub.send_c2d(
            "dev1", b"\x01open-valve", {"content_type": "application/octet-stream"}
        )
    )
    msg = await device.receive()
    assert msg.payload == b"\x01open-valve" and msg.qos == 1
    assert msg.topic.startswith("devices/dev1/messages/devicebound/")
    assert "%24.mid=" + quote_plus(message_id) in msg.topic or message_id in msg.topic
    await wait_for(hub, lambda: hub.recorder.feedback)
    assert [(f.message_id, f.status) for f in hub.recorder.feedback] == [(message_id, "Success")]


async def test_twin_desired_and_direct_method(relay, hub, keys, devices):
    port, _, _ = relay
    device = devices("dev1", keys["dev1"])
    assert await device.connect(port) == 0
    for topic in (
        "$iothub/twin/res/#",
        "$iothub/twin/PATCH/properties/desired/#",
        "$iothub/methods/POST/#",
    ):
        await device.subscribe(topic, qos=0)
    await device.publish("$iothub/twin/GET/?$rid=1", b"", qos=0)
    msg = await device.receive()
    assert msg.topic == "$iothub/twin/res/200/?$rid=1"
    assert set(json.loads(msg.payload)) == {"desired", "reported"}
    await device.publish("$iothub/twin/PATCH/properties/reported/?$rid=2", b'{"fw":"1.2"}', qos=0)
    msg = await device.receive()
    assert msg.topic.startswith("$iothub/twin/res/204/?$rid=2&$version=")
    assert (await trio.to_thread.run_sync(hub.twin, "dev1"))["reported"]["fw"] == "1.2"

    version = await trio.to_thread.run_sync(hub.update_desired, "dev1", {"interval": 5})
    msg = await device.receive()
    assert msg.topic == f"$iothub/twin/PATCH/properties/desired/?$version={version}"
    assert json.loads(msg.payload)["interval"] == 5

    result: list = []
    caller = threading.Thread(
        target=lambda: result.append(
            hub.invoke_method("dev1", "reboot", {"delay": 1}, timeout=WAIT)
        )
    )
    caller.start()
    msg = await device.receive()
    assert msg.topic.startswith("$iothub/methods/POST/reboot/?$rid=")
    assert json.loads(msg.payload) == {"delay": 1}
    rid = msg.topic.split("$rid=")[1]
    await device.publish(f"$iothub/methods/res/200/?$rid={rid}", b'{"rebooting":true}', qos=0)
    await trio.to_thread.run_sync(caller.join, WAIT)
    assert result == [(200, b'{"rebooting":true}')]


async def test_will_on_abrupt_device_loss(relay, hub, keys, devices):
    port, observer, _ = relay
    device = devices("dev2", keys["dev2"])
    assert await device.connect(port, will=(EVENTS.format("dev2") + "state=lost", b"gone", 0)) == 0
    await trio.to_thread.run_sync(device.close)  # socket closed, no DISCONNECT
    record = await wait_for(hub, lambda: hub.recorder.d2c and hub.recorder.d2c[0])
    assert (record.body, record.properties) == (
        b"gone",
        {"state": "lost", "iothub-MessageType": "Will"},
    )
    await observer.wait_closed(CloseReason.DEVICE_CLOSED)


@pytest.mark.parametrize("password", ["forged", "expired"])
async def test_bad_password_sees_the_hubs_refusal(relay, hub, keys, devices, password):
    port, observer, _ = relay
    token = {
        "forged": sas_token("dev1", new_key()),
        "expired": sas_token("dev1", keys["dev1"], int(time.time()) - 3600),
    }[password]
    device = devices("dev1", None, password=token)
    assert await device.connect(port) == "Not authorized"  # the hub's CONNACK 5
    await observer.wait_closed(CloseReason.UPSTREAM_REFUSED)
    auth = await wait_for(hub, lambda: hub.recorder.auth and hub.recorder.auth[0])
    assert (auth.ok, auth.code) == (False, 5)


async def test_qos2_is_closed_by_the_hub_and_the_device_with_it(relay, hub, keys, devices):
    port, observer, _ = relay
    device = devices("dev1", keys["dev1"])
    assert await device.connect(port) == 0
    device.client.publish(EVENTS.format("dev1"), b"x", qos=2)
    assert await device.wait_disconnected()
    await observer.wait_closed(CloseReason.UPSTREAM_CLOSED)
    assert not hub.recorder.d2c


async def test_second_connection_kicks_the_first(relay, hub, keys, devices):
    port, observer, _ = relay
    first = devices("dev1", keys["dev1"])
    assert await first.connect(port) == 0
    second = devices("dev1", keys["dev1"])
    assert await second.connect(port) == 0
    assert await first.wait_disconnected()
    await observer.wait_closed(CloseReason.UPSTREAM_CLOSED)
    await second.publish(EVENTS.format("dev1"), b"from the second", qos=1)
    await wait_for(hub, lambda: hub.recorder.d2c)
    assert [r.body for r in hub.recorder.d2c] == [b"from the second"]
    assert hub.recorder.connections["mqtt"].devices == {"dev1": 2}


async def test_hub_restart_mid_session(relay, hub, keys, devices):
    port, observer, _ = relay
    device = devices("dev1", keys["dev1"])
    assert await device.connect(port) == 0
    await trio.to_thread.run_sync(hub.stop)
    assert await device.wait_disconnected()
    # hubsim resets its connections on stop; a hub may also close them cleanly.
    await observer.wait_closed(CloseReason.UPSTREAM_ERROR, CloseReason.UPSTREAM_CLOSED)
    down = devices("dev2", keys["dev2"])
    assert await down.connect(port) == "Server unavailable"  # the gateway's CONNACK 3
    await trio.to_thread.run_sync(hub.start)
    again = devices("dev1", keys["dev1"])
    assert await again.connect(port) == 0
    await again.publish(EVENTS.format("dev1"), b"back", qos=1)
    await wait_for(hub, lambda: hub.recorder.d2c)
    assert hub.recorder.d2c[-1].body == b"back"


async def test_oversize_and_malformed_devices_close_alone(relay, hub, keys, devices):
    port, observer, _ = relay
    good = devices("dev3", keys["dev3"])
    assert await good.connect(port) == 0
    for bad in (encode.publish(EVENTS.format("dev1"), b"x" * 300_000, qos=0), b"\x30\x02\x00\x05"):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            connect = encode.connect(
                "dev1", username=username("dev1"), password=sas_token("dev1", keys["dev1"]).encode()
            )
            await stream.send_all(connect)
            with trio.fail_after(WAIT):
                assert await stream.receive_some() == b"\x20\x02\x00\x00"
                try:
                    await stream.send_all(bad)
                    while await stream.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass  # the relay closed on us mid-send: that is the point
    await observer.wait_closed(CloseReason.PACKET_TOO_LARGE)
    await observer.wait_closed(CloseReason.DEVICE_PROTOCOL_ERROR)
    await good.publish(EVENTS.format("dev3"), b"unaffected", qos=1)
    await wait_for(hub, lambda: any(r.body == b"unaffected" for r in hub.recorder.d2c))
    assert all(r.device_id == "dev3" for r in hub.recorder.d2c)


async def test_many_devices_each_with_its_own_upstream(nursery):
    count = 500
    keys = {f"d{i}": new_key() for i in range(count)}
    with HubSim(keys, hub_host=HUB, amqp_port=None) as hub:
        config = gateway_config(hub)
        stats = ListenerStats()

        async def serve(task_status=trio.TASK_STATUS_IGNORED):
            await serve_mqtt_listener(
                config.listeners[0], config, task_status=task_status, stats=stats
            )

        port = (await nursery.start(serve))[0][1]
        all_connected = trio.Event()
        connected = 0
        peak_open = 0

        async def device(i: int) -> None:
            nonlocal connected, peak_open
            device_id = f"d{i}"
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                token = sas_token(device_id, keys[device_id]).encode()
                await stream.send_all(
                    encode.connect(device_id, username=username(device_id), password=token)
                )
                assert await stream.receive_some() == b"\x20\x02\x00\x00"
                connected += 1
                if connected == count:
                    peak_open = hub.recorder.connections["mqtt"].open
                    all_connected.set()
                await all_connected.wait()
                await stream.send_all(
                    encode.publish(EVENTS.format(device_id), device_id.encode(), qos=1, packet_id=1)
                )
                assert await stream.receive_some() == b"\x40\x02\x00\x01"
                await stream.send_all(encode.disconnect())

        with trio.fail_after(60):
            async with trio.open_nursery() as devices_nursery:
                for i in range(count):
                    devices_nursery.start_soon(device, i)
        assert peak_open == count  # one hub connection per device, all open at once
        await trio.to_thread.run_sync(
            hub.recorder.wait_for, lambda: len(hub.recorder.d2c) == count, WAIT
        )
        assert sorted(r.device_id for r in hub.recorder.d2c) == sorted(keys)
        assert all(r.body == r.device_id.encode() for r in hub.recorder.d2c)


async def test_held_hub_answers_all_reach_the_device(relay, hub, keys, devices, monkeypatch):
    """With the hub's PUBACKs held before every read (ack_batching's wait, forced),
    every PUBLISH still reaches the hub, in order, and every PUBACK the device;
    the relay counted each PUBLISH in flight and each PUBACK as its answer."""
    forced = ForcedWaits(monkeypatch)
    port, _, _ = relay
    device = devices("dev1", keys["dev1"])
    assert await device.connect(port) == 0
    bodies = [b"m%03d" % i for i in range(300)]

    def publish_all() -> list[bool]:
        infos = [device.client.publish(EVENTS.format("dev1"), body, qos=1) for body in bodies]
        for info in infos:
            info.wait_for_publish(timeout=WAIT)
        # After them (paho holds QoS 1 beyond its window, not QoS 0): never answered.
        infos.append(device.client.publish(EVENTS.format("dev1"), b"qos0", qos=0))
        infos[-1].wait_for_publish(timeout=WAIT)
        return [info.is_published() for info in infos]

    assert all(await trio.to_thread.run_sync(publish_all))
    await wait_for(hub, lambda: len(hub.recorder.d2c) == len(bodies) + 1)
    assert [m.raw for m in hub.recorder.d2c] == [*bodies, b"qos0"]
    assert forced.waits > 0
    assert forced.answers == len(bodies)
    assert 0 < forced.max_in_flight <= len(bodies)
