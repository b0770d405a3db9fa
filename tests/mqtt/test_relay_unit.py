"""The relay between in-memory streams, on a mock clock (deterministic timing).

The "hub" here is the test itself: it reads the exact bytes the relay
forwards and writes the hub's answers. The end-to-end tests against mosquitto
(test_relay_mosquitto.py) prove the same paths against a real broker.
"""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import trio
import trio.testing

from gateway.mqtt import MQTT_5, encode
from gateway.mqtt.properties import Property
from gateway.mqtt_relay import CloseReason, Opened, UpstreamUnavailable, relay_mqtt_connection
from gateway.mqtt_relay.session import RECEIVE_SIZE
from gateway.net.ack_batching import AckBatching

CONNECT = encode.connect(
    "dev1",
    keep_alive=10,
    username="myhub.azure-devices.net/dev1/?api-version=2021-04-12",
    password=b"hunter2-secret",
)
CONNACK_OK = encode.connack(0)


class CountingStream(trio.abc.Stream):
    """Wraps a stream and counts the bytes the relay has read from it."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.received = 0

    async def receive_some(self, max_bytes=None):
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return data

    async def send_all(self, data):
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self):
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self):
        await self.inner.aclose()


class Observer:
    def __init__(self) -> None:
        self.packets: Counter[tuple[str, str]] = Counter()
        self.bytes: Counter[str] = Counter()
        self.closed: list[str] = []
        self.connect_failures: list[tuple[str, str]] = []

    def on_packet(self, direction, packet_type, nbytes):
        self.packets[(direction, packet_type)] += 1
        self.bytes[direction] += nbytes

    def on_close(self, reason):
        self.closed.append(reason)

    def on_upstream_connect_failure(self, connector, reason):
        self.connect_failures.append((connector, reason))


async def recv_exact(stream: trio.abc.Stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, f"EOF after {len(data)} of {n} bytes"
        data += chunk
    return data


async def recv_eof(stream: trio.abc.Stream) -> bytes:
    """Everything until EOF (the relay closed its end)."""
    data = b""
    while True:
        try:
            chunk = await stream.receive_some()
        except trio.BrokenResourceError:
            return data
        if not chunk:
            return data
        data += chunk


class Harness:
    """device <-> relay <-> hub, all in memory; the relay runs in the test's nursery."""

    def __init__(self, config, *, lockstep_upstream: bool = False, fail_connect: str | None = None):
        self.config = config
        self.device, relay_device = trio.testing.memory_stream_pair()
        self.relay_device = CountingStream(relay_device)
        if lockstep_upstream:
            self.hub, self.relay_upstream = trio.testing.lockstep_stream_pair()
        else:
            self.hub, self.relay_upstream = trio.testing.memory_stream_pair()
        self.fail_connect = fail_connect
        self.upstream_opened = trio.Event()
        self.observer = Observer()
        self.reason: str | None = None
        self.done = trio.Event()

    async def open_upstream(self, connector, profile):
        if self.fail_connect:
            raise UpstreamUnavailable(self.fail_connect, "test says no")
        self.upstream_opened.set()
        return Opened(self.relay_upstream)

    async def run(self, tracer=None):
        try:
            self.reason = await relay_mqtt_connection(
                self.relay_device,
                ("192.0.2.7", 40000),
                self.config.listeners[0],
                self.config,
                self.observer,
                open_upstream=self.open_upstream,
                ack_batching=AckBatching,
                tracer=tracer,
            )
        finally:
            self.done.set()

    async def result(self) -> str | None:
        """The close reason, once the relay has finished."""
        await self.done.wait()
        return self.reason

    async def connect(self, connect: bytes = CONNECT, connack: bytes = CONNACK_OK) -> None:
        await self.device.send_all(connect)
        assert await recv_exact(self.hub, len(connect)) == connect
        await self.hub.send_all(connack)
        assert await recv_exact(self.device, len(connack)) == connack


@pytest.fixture
def config(make_config):
    return make_config(1, handshake_timeout="5s")


async def start(nursery, harness: Harness) -> Harness:
    nursery.start_soon(harness.run)
    return harness


async def test_transparent_both_ways(nursery, config, caplog):
    caplog.set_level(logging.DEBUG)
    h = await start(nursery, Harness(config))
    await h.connect()
    d2c = encode.publish("devices/dev1/messages/events/a=1", b"\x00\xffpayload", qos=1, packet_id=1)
    sub = encode.subscribe(2, [("devices/dev1/messages/devicebound/#", 1)])
    await h.device.send_all(d2c + sub)
    assert await recv_exact(h.hub, len(d2c) + len(sub)) == d2c + sub
    answers = (
        encode.puback(1)
        + encode.suback(2, [1])
        + encode.publish("devices/dev1/messages/devicebound/x", b"c2d", qos=1, packet_id=9)
    )
    await h.hub.send_all(answers)
    assert await recv_exact(h.device, len(answers)) == answers
    await h.device.send_all(encode.puback(9) + encode.pingreq())
    assert await recv_exact(h.hub, 6) == encode.puback(9) + encode.pingreq()
    await h.device.send_all(encode.disconnect())
    await h.device.send_stream.aclose()
    assert await recv_eof(h.hub) == encode.disconnect()
    assert await h.result() == CloseReason.DEVICE_DISCONNECT
    assert h.observer.closed == [CloseReason.DEVICE_DISCONNECT]
    assert h.observer.packets == Counter(
        {
            ("in", "CONNECT"): 1,
            ("in", "PUBLISH"): 1,
            ("in", "SUBSCRIBE"): 1,
            ("in", "PUBACK"): 1,
            ("in", "PINGREQ"): 1,
            ("in", "DISCONNECT"): 1,
            ("out", "CONNACK"): 1,
            ("out", "PUBACK"): 1,
            ("out", "SUBACK"): 1,
            ("out", "PUBLISH"): 1,
        }
    )
    assert "hunter2" not in caplog.text
    assert "dev1" in caplog.text


async def test_connect_timeout(nursery, config, autojump_clock):
    h = await start(nursery, Harness(config))
    start_time = trio.current_time()
    assert await recv_eof(h.device) == b""
    assert await h.result() == CloseReason.CONNECT_TIMEOUT
    assert trio.current_time() - start_time == pytest.approx(5.0)
    assert not h.upstream_opened.is_set()


async def test_partial_connect_still_times_out(nursery, config, autojump_clock):
    h = await start(nursery, Harness(config))
    await h.device.send_all(CONNECT[:10])
    assert await recv_eof(h.device) == b""
    assert await h.result() == CloseReason.CONNECT_TIMEOUT


async def test_keep_alive_enforced_at_one_and_a_half(nursery, config, autojump_clock):
    h = await start(nursery, Harness(config))
    await h.connect()
    silent_since = trio.current_time()
    assert await recv_eof(h.hub) == b""  # upstream closed without a DISCONNECT
    assert trio.current_time() - silent_since == pytest.approx(15.0, abs=0.01)
    assert await recv_eof(h.device) == b""
    assert await h.result() == CloseReason.KEEPALIVE_TIMEOUT


async def test_pings_keep_the_device_alive(nursery, config, autojump_clock):
    h = await start(nursery, Harness(config))
    await h.connect()
    for _ in range(5):
        await trio.sleep(14)  # just inside 1.5 x 10 s each time
        await h.device.send_all(encode.pingreq())
        assert await recv_exact(h.hub, 2) == encode.pingreq()
        await h.hub.send_all(encode.pingresp())
        assert await recv_exact(h.device, 2) == encode.pingresp()
    assert not h.done.is_set()
    await h.device.aclose()
    assert await h.result() == CloseReason.DEVICE_CLOSED


async def test_keep_alive_zero_means_none(nursery, config, autojump_clock):
    h = await start(nursery, Harness(config))
    await h.connect(encode.connect("dev1", keep_alive=0))
    await trio.sleep(100_000)
    assert not h.done.is_set()


async def test_v5_server_keep_alive_overrides(nursery, config, autojump_clock):
    h = await start(nursery, Harness(config))
    connect = encode.connect("dev5", keep_alive=100, protocol_level=MQTT_5)
    connack = encode.connack(0, protocol_level=MQTT_5, properties=[(Property.SERVER_KEEP_ALIVE, 4)])
    await h.connect(connect, connack)
    t0 = trio.current_time()
    assert await recv_eof(h.hub) == b""
    assert trio.current_time() - t0 == pytest.approx(6.0, abs=0.01)


@pytest.mark.parametrize(
    ("level", "expected"), [(4, encode.connack(5)), (5, encode.connack(0x87, protocol_level=5))]
)
async def test_no_route_refused_with_not_authorized(nursery, make_config, level, expected):
    config = make_config(1, hub="otherhub.azure-devices.net")
    h = await start(nursery, Harness(config))
    await h.device.send_all(
        encode.connect("dev1", username="myhub.azure-devices.net/dev1/?x", protocol_level=level)
    )
    assert await recv_eof(h.device) == expected
    assert await h.result() == CloseReason.NO_ROUTE and not h.upstream_opened.is_set()


async def test_exact_hub_route_wins_over_star(nursery, make_config):
    from gateway.mqtt_relay import select_route

    routes = make_config(1).mqtt_routes + make_config(1, hub="MyHub.azure-devices.net").mqtt_routes
    assert select_route(routes, "myhub.azure-devices.net").hub == "MyHub.azure-devices.net"
    assert select_route(routes, "other").hub == "*"
    assert select_route(routes[1:], "other") is None


@pytest.mark.parametrize(
    ("level", "expected"), [(4, encode.connack(3)), (5, encode.connack(0x88, protocol_level=5))]
)
async def test_upstream_unavailable_refused_with_server_unavailable(
    nursery, config, level, expected
):
    h = await start(nursery, Harness(config, fail_connect="certificate_verify_failed"))
    await h.device.send_all(encode.connect("dev1", protocol_level=level))
    assert await recv_eof(h.device) == expected
    assert await h.result() == CloseReason.UPSTREAM_UNAVAILABLE
    assert h.observer.connect_failures == [("broker", "certificate_verify_failed")]


async def test_unsupported_protocol_level(nursery, config):
    h = await start(nursery, Harness(config))
    bad = encode.connect("dev1", protocol_level=7)
    await h.device.send_all(bad)
    assert await recv_eof(h.device) == encode.connack(1)
    assert await h.result() == CloseReason.UNSUPPORTED_PROTOCOL


async def test_first_packet_must_be_connect(nursery, config):
    h = await start(nursery, Harness(config))
    await h.device.send_all(encode.publish("a", b"x"))
    assert await recv_eof(h.device) == b""
    assert await h.result() == CloseReason.DEVICE_PROTOCOL_ERROR and not h.upstream_opened.is_set()


async def test_hub_refusal_reaches_the_device_then_both_close(nursery, config):
    h = await start(nursery, Harness(config))
    await h.device.send_all(CONNECT)
    await recv_exact(h.hub, len(CONNECT))
    await h.hub.send_all(encode.connack(4))
    assert await recv_eof(h.device) == encode.connack(4)
    assert await recv_eof(h.hub) == b""
    assert await h.result() == CloseReason.UPSTREAM_REFUSED


async def test_hub_close_closes_the_device(nursery, config):
    h = await start(nursery, Harness(config))
    await h.connect()
    await h.hub.aclose()
    assert await recv_eof(h.device) == b""
    assert await h.result() == CloseReason.UPSTREAM_CLOSED


async def test_device_loss_closes_upstream_without_disconnect(nursery, config):
    h = await start(nursery, Harness(config))
    await h.connect()
    await h.device.send_all(encode.publish("t", b"x"))
    await h.device.aclose()
    assert await recv_eof(h.hub) == encode.publish(
        "t", b"x"
    )  # no DISCONNECT: the hub sends the Will
    assert await h.result() == CloseReason.DEVICE_CLOSED


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"\x00\x00", CloseReason.DEVICE_PROTOCOL_ERROR),
        (encode.publish("t", b"x", qos=1, packet_id=0), CloseReason.DEVICE_PROTOCOL_ERROR),
        (encode.connect("again"), CloseReason.DEVICE_PROTOCOL_ERROR),
        (encode.suback(1, [0]), CloseReason.DEVICE_PROTOCOL_ERROR),
        (b"\x30\xff\xff\x7f", CloseReason.PACKET_TOO_LARGE),
    ],
)
async def test_bad_device_packet_closes_both(nursery, config, bad, reason):
    h = await start(nursery, Harness(config))
    await h.connect()
    good = encode.publish("t", b"ok")
    await h.device.send_all(good + bad)
    assert await recv_eof(h.hub) == good  # nothing of the bad packet is forwarded
    assert await recv_eof(h.device) == b""
    assert await h.result() == reason


async def test_bad_upstream_packet_closes_both(nursery, config):
    h = await start(nursery, Harness(config))
    await h.connect()
    await h.hub.send_all(encode.connect("not-from-a-server"))
    assert await recv_eof(h.device) == b""
    assert await h.result() == CloseReason.UPSTREAM_PROTOCOL_ERROR


async def test_backpressure_from_a_slow_hub(nursery, config):
    """While the hub reads nothing, the relay reads at most one chunk ahead from the device."""
    h = await start(nursery, Harness(config, lockstep_upstream=True))
    await h.connect()
    packets = [encode.publish("t", bytes([i]) * 10_000, qos=0) for i in range(100)]
    stream = b"".join(packets)

    async def device_sends():
        await h.device.send_all(stream)

    nursery.start_soon(device_sends)
    await trio.testing.wait_all_tasks_blocked()
    assert h.relay_device.received - len(CONNECT) <= RECEIVE_SIZE
    assert await recv_exact(h.hub, len(stream)) == stream


async def test_topic_policy(nursery, make_config, caplog):
    config = make_config(1, allowed_topics=["devices/+/messages/events/#", "$iothub/#"])
    h = await start(nursery, Harness(config))
    await h.connect()
    ok = encode.publish("devices/dev1/messages/events/", b"x") + encode.subscribe(
        1, [("$iothub/twin/res/#", 0)]
    )
    await h.device.send_all(ok)
    assert await recv_exact(h.hub, len(ok)) == ok
    await h.device.send_all(encode.publish("elsewhere/topic", b"secret-payload"))
    assert await recv_eof(h.hub) == b""
    assert await h.result() == CloseReason.TOPIC_REFUSED
    assert "elsewhere/topic" in caplog.text and "secret-payload" not in caplog.text


async def test_topic_policy_subscribe(nursery, make_config):
    config = make_config(1, allowed_topics=["devices/+/messages/devicebound/#"])
    h = await start(nursery, Harness(config))
    await h.connect()
    await h.device.send_all(
        encode.subscribe(1, [("devices/dev1/messages/devicebound/#", 1), ("#", 0)])
    )
    assert await recv_eof(h.hub) == b""
    assert await h.result() == CloseReason.TOPIC_REFUSED


async def test_topic_policy_will(nursery, make_config):
    config = make_config(1, allowed_topics=["devices/#"])
    h = await start(nursery, Harness(config))
    await h.device.send_all(encode.connect("dev1", will_topic="other/will"))
    assert await recv_eof(h.device) == encode.connack(5)
    assert await h.result() == CloseReason.TOPIC_REFUSED and not h.upstream_opened.is_set()


async def test_topic_policy_follows_v5_topic_aliases(nursery, make_config):
    config = make_config(1, allowed_topics=["ok/#"])
    h = await start(nursery, Harness(config))
    await h.connect(encode.connect("d", protocol_level=5), encode.connack(0, protocol_level=5))
    alias = [(Property.TOPIC_ALIAS, 1)]
    first = encode.publish("ok/a", b"1", protocol_level=5, properties=alias)
    again = encode.publish("", b"2", protocol_level=5, properties=alias)
    await h.device.send_all(first + again)
    assert await recv_exact(h.hub, len(first) + len(again)) == first + again
    await h.device.send_all(encode.publish("no/b", b"3", protocol_level=5, properties=alias))
    assert await recv_eof(h.hub) == b""
    assert await h.result() == CloseReason.TOPIC_REFUSED


async def test_cancellation_closes_both(config):
    h = Harness(config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(h.run)
        await h.connect()
        nursery.cancel_scope.cancel()
    assert await recv_eof(h.device) == b""
    assert await recv_eof(h.hub) == b""
    assert h.observer.closed == [CloseReason.SHUTDOWN]


async def test_trace_shows_packets_but_no_secrets(nursery, config, caplog):
    from gateway.ops.trace import FrameTracer

    caplog.set_level(logging.INFO, logger="gateway.trace")
    tracer = FrameTracer(logging.getLogger("gateway.trace"), protocols=["mqtt"])
    h = Harness(config)
    nursery.start_soon(h.run, tracer)
    await h.connect()
    await h.device.send_all(
        encode.publish("devices/dev1/messages/events/", b"very-private-payload")
    )
    await recv_exact(h.hub, 2 + 2 + 29 + 20)
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.trace"]
    assert any("<- CONNECT" in line for line in lines)
    assert any("-> CONNACK" in line for line in lines)
    assert any("<- PUBLISH" in line and "devices/dev1/messages/events/" in line for line in lines)
    text = "\n".join(lines)
    assert "hunter2" not in text and "very-private-payload" not in text


def test_counts_for_ack_batching_only_answerable_publishes_and_their_answers():
    """QoS 0 PUBLISHes are never answered; PUBACK and PUBREC answer QoS 1 and 2."""
    from gateway.mqtt.reader import PacketReader
    from gateway.mqtt_relay.in_flight import answerable_publishes, publish_answers

    reader = PacketReader(1 << 20)
    reader.feed(
        encode.publish("t", b"0", qos=0)
        + encode.publish("t", b"1", qos=1, packet_id=1)
        + encode.publish("t", b"2", qos=2, packet_id=2)
        + encode.puback(1)
        + encode.pubrec(2)
        + encode.pingresp()
    )
    buf, spans = reader.next_spans()
    assert len(spans) == 6
    assert answerable_publishes(spans, 6) == 2
    assert answerable_publishes(spans, 2) == 1
    assert publish_answers(spans, 6) == 2
    assert publish_answers(spans, 4) == 1
