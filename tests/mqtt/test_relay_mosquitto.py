"""End to end: devices -> relay (plaintext, port 0) -> mosquitto (TLS upstream).

Devices are paho-mqtt clients, or raw sockets speaking bytes amqtt encodes.
What the devices see comes from mosquitto; a second client connected to
mosquitto directly (TLS, verified) proves what crossed the relay.
"""

from __future__ import annotations

import time

import paho.mqtt.client as paho
import pytest
import trio
import trustme
from amqtt.mqtt.connect import ConnectPacket, ConnectPayload, ConnectVariableHeader
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.subscribe import SubscribePacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.daemon import serve_mqtt_listener
from gateway.mqtt_relay import CloseReason
from gateway.net.listeners import ListenerStats
from tests.waiting import FAILSAFE, Progress, fail_without_progress

from .paho_device import PahoDevice

pytestmark = pytest.mark.mosquitto

WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)


class Observer:
    def __init__(self) -> None:
        self.closed: list[str] = []
        self.connect_failures: list[tuple[str, str]] = []
        self.changed = trio.Event()

    def on_packet(self, direction, packet_type, nbytes):
        pass

    def on_close(self, reason):
        self.closed.append(reason)
        self.changed.set()
        self.changed = trio.Event()

    def on_upstream_connect_failure(self, connector, reason):
        self.connect_failures.append((connector, reason))

    async def wait_closed(self, reason: str) -> None:
        with trio.fail_after(WAIT):
            while reason not in self.closed:
                await self.changed.wait()


async def start_relay(nursery, config, *, observer=None, stats=None) -> int:
    listener = config.listeners[0]

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        await serve_mqtt_listener(
            listener, config, task_status=task_status, observer=observer, stats=stats
        )

    bound = await nursery.start(serve)
    return bound[0][1]


@pytest.fixture
async def devices():
    """Make paho devices; all are torn down after the test."""
    made: list[PahoDevice] = []

    def make(*args, **kwargs) -> PahoDevice:
        device = PahoDevice(*args, **kwargs)
        made.append(device)
        return device

    yield make
    for device in made:
        await trio.to_thread.run_sync(device.close)


def amqtt_connect(client_id: str, keep_alive: int = 60, clean: bool = True) -> bytes:
    header = ConnectVariableHeader(0, keep_alive, "MQTT", 4)
    header.clean_session_flag = clean
    return ConnectPacket(
        variable_header=header, payload=ConnectPayload(client_id=client_id)
    ).to_bytes()


async def recv_exact(stream, n: int, wait: float = WAIT) -> bytes:
    data = b""
    with trio.fail_after(wait):
        while len(data) < n:
            chunk = await stream.receive_some(n - len(data))
            assert chunk, f"connection closed after {data!r}"
            data += chunk
    return data


async def recv_until_closed(stream, wait: float = WAIT) -> bytes:
    data = b""
    with trio.fail_after(wait):
        while chunk := await stream.receive_some():
            data += chunk
    return data


# -- traffic -------------------------------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_publish_subscribe_round_trip(nursery, mosquitto, make_config, certs, devices, qos):
    port = await start_relay(nursery, make_config(mosquitto.port))
    device = devices(f"relayed-{qos}")
    watcher = devices(f"direct-{qos}", ca_file=str(certs.ca_file))
    assert await watcher.connect(mosquitto.port) == 0
    await watcher.subscribe(f"t/{qos}/#", qos=2)
    assert await device.connect(port) == 0
    await device.subscribe(f"t/{qos}/#", qos=2)
    payload = bytes(range(256)) * 4
    await device.publish(f"t/{qos}/x", payload, qos=qos)
    for client in (device, watcher):
        msg = await client.receive()
        assert (msg.topic, msg.payload, msg.qos) == (f"t/{qos}/x", payload, qos)
    # And the other way: published directly at the broker, delivered through the relay.
    await watcher.publish(f"t/{qos}/down", b"\x00c2d\xff", qos=qos)
    msg = await device.receive()
    assert (msg.topic, msg.payload, msg.qos) == (f"t/{qos}/down", b"\x00c2d\xff", qos)
    await device.disconnect()


async def test_large_payload_bytes_identical(nursery, mosquitto, make_config, certs, devices):
    port = await start_relay(nursery, make_config(mosquitto.port))
    watcher = devices("direct-large", ca_file=str(certs.ca_file))
    assert await watcher.connect(mosquitto.port) == 0
    await watcher.subscribe("big/#", qos=1)
    device = devices("relayed-large")
    assert await device.connect(port) == 0
    payload = bytes((i * 7 + 3) % 256 for i in range(250_000))
    await device.publish("big/one", payload, qos=1, retain=False)
    msg = await watcher.receive()
    assert msg.payload == payload and msg.qos == 1


async def test_device_side_tls(nursery, mosquitto, make_config, certs, devices):
    """A device that does TLS but cannot reach the internet: TLS on both hops."""
    port = await start_relay(nursery, make_config(mosquitto.port, device_tls=True))
    device = devices("tls-device", ca_file=str(certs.ca_file))
    assert await device.connect(port) == 0
    await device.subscribe("tls/#", qos=1)
    await device.publish("tls/x", b"both hops encrypted", qos=1)
    assert (await device.receive()).payload == b"both hops encrypted"


async def test_retained_message(nursery, mosquitto, make_config, devices):
    port = await start_relay(nursery, make_config(mosquitto.port))
    publisher = devices("retain-pub")
    assert await publisher.connect(port) == 0
    await publisher.publish("retained/x", b"kept", qos=1, retain=True)
    late = devices("retain-sub")
    assert await late.connect(port) == 0
    await late.subscribe("retained/#", qos=1)
    msg = await late.receive()
    assert (msg.payload, msg.retain) == (b"kept", True)
    await publisher.publish("retained/x", b"", qos=1, retain=True)  # clear it


async def test_mqtt5_session_relayed_unchanged(nursery, mosquitto, make_config, devices):
    port = await start_relay(nursery, make_config(mosquitto.port))
    device = devices("v5-device", protocol=paho.MQTTv5)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    props.UserProperty = ("gw", "test")
    rc = await device.connect(port, properties=props)
    assert rc == 0
    await device.subscribe("v5/#", qos=paho.SubscribeOptions(qos=1, noLocal=False))
    pub = Properties(PacketTypes.PUBLISH)
    pub.UserProperty = [("a", "1"), ("b", "ü")]
    pub.ContentType = "application/json"
    pub.CorrelationData = b"\x00\x01"
    await device.publish("v5/t", b'{"v":5}', qos=1, properties=pub)
    msg = await device.receive()
    assert msg.payload == b'{"v":5}'
    assert msg.properties.UserProperty == [("a", "1"), ("b", "ü")]
    assert msg.properties.ContentType == "application/json"
    assert msg.properties.CorrelationData == b"\x00\x01"


async def test_will_published_on_abrupt_device_loss(
    nursery, mosquitto, make_config, certs, devices
):
    observer = Observer()
    port = await start_relay(nursery, make_config(mosquitto.port), observer=observer)
    watcher = devices("will-watcher", ca_file=str(certs.ca_file))
    assert await watcher.connect(mosquitto.port) == 0
    await watcher.subscribe("wills/#", qos=1)
    device = devices("will-device")
    assert await device.connect(port, will=("wills/dev", b"gone", 1)) == 0
    await trio.to_thread.run_sync(device.close)  # no DISCONNECT: the socket just goes away
    msg = await watcher.receive()
    assert (msg.topic, msg.payload) == ("wills/dev", b"gone")
    await observer.wait_closed(CloseReason.DEVICE_CLOSED)


async def test_clean_disconnect_sends_no_will(nursery, mosquitto, make_config, certs, devices):
    observer = Observer()
    port = await start_relay(nursery, make_config(mosquitto.port), observer=observer)
    watcher = devices("clean-watcher", ca_file=str(certs.ca_file))
    assert await watcher.connect(mosquitto.port) == 0
    await watcher.subscribe("cleanwills/#", qos=1)
    device = devices("clean-device")
    assert await device.connect(port, will=("cleanwills/dev", b"gone", 1)) == 0
    await device.disconnect()
    await observer.wait_closed(CloseReason.DEVICE_DISCONNECT)
    # A message published after the (non-)Will proves ordering: the watcher sees it first.
    await watcher.publish("cleanwills/marker", b"m", qos=1)
    assert (await watcher.receive()).topic == "cleanwills/marker"


async def test_broker_refusal_reaches_the_device(nursery, mosquitto, make_config):
    """An empty client id with a persistent session: mosquitto answers CONNACK 2."""
    observer = Observer()
    port = await start_relay(nursery, make_config(mosquitto.port), observer=observer)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(amqtt_connect("", clean=False))
    assert await recv_until_closed(stream) == b"\x20\x02\x00\x02"  # identifier rejected
    await observer.wait_closed(CloseReason.UPSTREAM_REFUSED)


# -- timers --------------------------------------------------------------------------------


async def test_connect_timeout(nursery, mosquitto, make_config):
    observer = Observer()
    port = await start_relay(
        nursery, make_config(mosquitto.port, handshake_timeout="300ms"), observer=observer
    )
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    started = time.monotonic()
    assert await recv_until_closed(stream) == b""
    assert 0.25 <= time.monotonic() - started < 3.0
    await observer.wait_closed(CloseReason.CONNECT_TIMEOUT)


# -- bad devices only hurt themselves -----------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"\x30\x02\x00\x05", CloseReason.DEVICE_PROTOCOL_ERROR),  # topic longer than the packet
        (b"\x82\x02\x00\x01", CloseReason.DEVICE_PROTOCOL_ERROR),  # SUBSCRIBE without filters
        (b"\x3f\x00", CloseReason.DEVICE_PROTOCOL_ERROR),  # PUBLISH QoS 3
        (
            PublishPacket.build("big", b"x" * 5000, None, False, 0, False).to_bytes(),
            CloseReason.PACKET_TOO_LARGE,
        ),
    ],
)
async def test_bad_packet_closes_only_that_device(
    nursery, mosquitto, make_config, devices, bad, reason
):
    observer = Observer()
    port = await start_relay(
        nursery, make_config(mosquitto.port, max_packet_size=4096), observer=observer
    )
    good = devices(f"good-{reason}-{bad[0]}")
    assert await good.connect(port) == 0
    await good.subscribe("fine/#", qos=1)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(amqtt_connect(f"bad-{bad[0]}"))
    assert await recv_exact(stream, 4) == b"\x20\x02\x00\x00"
    await stream.send_all(bad)
    assert await recv_until_closed(stream) == b""
    await observer.wait_closed(reason)
    await good.publish("fine/x", b"still here", qos=1)
    assert (await good.receive()).payload == b"still here"


# -- upstream failures -----------------------------------------------------------------------


async def test_wrong_server_name_refused_with_server_unavailable(
    nursery, mosquitto, make_config, devices
):
    observer = Observer()
    config = make_config(mosquitto.port, server_name="not-the-broker.example")
    port = await start_relay(nursery, config, observer=observer)
    device = devices("tls-name")
    # The gateway answers CONNACK 3; paho reports it by its MQTT 5 name.
    assert await device.connect(port) == "Server unavailable"
    await observer.wait_closed(CloseReason.UPSTREAM_UNAVAILABLE)
    assert observer.connect_failures == [("broker", "hostname_mismatch")]


async def test_untrusted_broker_refused(nursery, mosquitto, make_config, devices, tmp_path):
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    observer = Observer()
    port = await start_relay(
        nursery, make_config(mosquitto.port, ca_file=other_ca), observer=observer
    )
    device = devices("tls-ca")
    assert await device.connect(port) == "Server unavailable"
    await observer.wait_closed(CloseReason.UPSTREAM_UNAVAILABLE)
    assert observer.connect_failures == [("broker", "certificate_verify_failed")]


async def test_broker_restart_mid_session(nursery, mosquitto_factory, make_config, devices):
    broker = mosquitto_factory()
    broker.start()
    observer = Observer()
    port = await start_relay(nursery, make_config(broker.port), observer=observer)
    device = devices("restart")
    assert await device.connect(port) == 0
    await trio.to_thread.run_sync(broker.stop)
    assert await device.wait_disconnected()
    await observer.wait_closed(CloseReason.UPSTREAM_CLOSED)
    # While the broker is down, a new device is told "server unavailable".
    down = devices("while-down")
    assert await down.connect(port) == "Server unavailable"
    await trio.to_thread.run_sync(broker.start)
    again = devices("restart-again")
    assert await again.connect(port) == 0
    await again.subscribe("back/#", qos=1)
    await again.publish("back/x", b"ok", qos=1)
    assert (await again.receive()).payload == b"ok"


# -- scale ----------------------------------------------------------------------------------


@pytest.mark.timeout(1800)  # bounded by progress below; this only stops a runaway
async def test_500_concurrent_devices(nursery, mosquitto, make_config):
    """Each device holds its own upstream TLS connection while all 500 are connected."""
    count = 500
    stats = ListenerStats()
    observer = Observer()
    port = await start_relay(nursery, make_config(mosquitto.port), stats=stats, observer=observer)
    connected = 0
    all_connected = trio.Event()
    peak = 0
    # However long 500 handshakes take on a busy machine, the run fails only if no device
    # makes a step for STALL seconds; single reads have no deadline of their own.
    unbounded = float("inf")

    async def device(i: int, progress: Progress) -> None:
        nonlocal connected, peak
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(amqtt_connect(f"many-{i}"))
            assert await recv_exact(stream, 4, unbounded) == b"\x20\x02\x00\x00"
            progress.tick()
            connected += 1
            if connected == count:
                peak = stats.open
                all_connected.set()
            await all_connected.wait()
            topic = f"many/{i}"
            await stream.send_all(SubscribePacket.build([(topic, 0)], 1).to_bytes())
            assert await recv_exact(stream, 5, unbounded) == b"\x90\x03\x00\x01\x00"
            progress.tick()
            payload = f"hello {i}".encode()
            publish = PublishPacket.build(topic, payload, 2, False, 1, False).to_bytes()
            await stream.send_all(publish)
            # PUBACK for ours, and our own message back at QoS 0 (in either order).
            delivered = PublishPacket.build(topic, payload, None, False, 0, False).to_bytes()
            got = await recv_exact(stream, 4 + len(delivered), unbounded)
            assert got in (b"\x40\x02\x00\x02" + delivered, delivered + b"\x40\x02\x00\x02")
            progress.tick()
            await stream.send_all(DisconnectPacket().to_bytes())
            assert await recv_until_closed(stream, unbounded) == b""
            progress.tick()

    started = time.monotonic()
    with fail_without_progress(what="device connecting, relaying or closing") as progress:
        async with trio.open_nursery() as devices_nursery:
            for i in range(count):
                devices_nursery.start_soon(device, i, progress)
    elapsed = time.monotonic() - started
    assert peak == count
    with fail_without_progress(what="session closing") as progress:
        while len(observer.closed) < count:
            await observer.changed.wait()
            progress.tick()
    assert observer.closed.count(CloseReason.DEVICE_DISCONNECT) == count
    print(f"\n500 devices connected, round-tripped and disconnected in {elapsed:.1f}s")
