"""What a device may send before it is authenticated: the CONNECT limits.

The codec refuses a first packet over `max_connect_size` from its fixed header
(before its body is buffered); the relay answers it (CONNACK 2, MQTT 5 0x95)
having read only a few bytes of it, refuses fields over the limits of
`gateway.mqtt.limits` with the matching CONNACK, and reads the CONNECT in pieces
no larger than it still needs, held in the handshake budget.
"""

from __future__ import annotations

import io
import logging

import pytest
import trio

from gateway.mqtt import MQTT_5, encode
from gateway.mqtt.errors import ConnectTooLarge, PacketTooLarge
from gateway.mqtt.limits import (
    DEFAULT_MAX_CONNECT_SIZE,
    MAX_CLIENT_ID,
    MAX_PASSWORD,
    MAX_USERNAME,
    check_connect,
    connect_level,
)
from gateway.mqtt.reader import PacketReader
from gateway.mqtt_relay import CloseReason, relay_mqtt_connection
from gateway.net.handshake import HandshakeBudget
from gateway.ops.logging import setup_logging
from tests.mqtt.test_relay_unit import CONNECT, Harness, recv_eof, recv_exact, start

USER = "myhub.azure-devices.net/dev1/?api-version=2021-04-12"
FIELD = 65535


def huge_connect() -> bytes:
    """3.1.1 CONNECT with 65,535-byte client id, user name and password (~196 KB)."""
    return encode.connect("c" * FIELD, username="u" * FIELD, password=b"p" * FIELD)


@pytest.fixture
def config(make_config):
    return make_config(1, handshake_timeout="5s")


# -- the codec ------------------------------------------------------------------------------


def test_reader_refuses_an_oversized_connect_from_its_header() -> None:
    packet = huge_connect()
    assert len(packet) < 263168  # under max_packet_size: only the CONNECT limit refuses it
    reader = PacketReader(263168, max_connect_size=DEFAULT_MAX_CONNECT_SIZE)
    reader.feed(packet[:5])  # the fixed header and nothing else
    with pytest.raises(ConnectTooLarge) as caught:
        reader.next_packet()
    assert isinstance(caught.value, PacketTooLarge)
    assert caught.value.size == len(packet) and caught.value.limit == DEFAULT_MAX_CONNECT_SIZE
    assert reader.buffered == 5


def test_reader_applies_the_connect_limit_to_the_first_packet_only() -> None:
    reader = PacketReader(263168, max_connect_size=1024)
    publish = encode.publish("devices/d/messages/events/", b"x" * 5000, qos=0)
    reader.feed(CONNECT + publish)
    assert reader.next_packet() is not None
    assert reader.next_packet() is not None  # 5 KB, over the CONNECT limit: allowed now


def test_reader_needed_counts_the_bytes_missing_from_the_packet() -> None:
    reader = PacketReader()
    assert reader.needed == 0
    reader.feed(CONNECT[:1])
    assert reader.needed is None  # the remaining length is not known yet
    reader.feed(CONNECT[1:10])
    assert reader.needed == len(CONNECT) - 10
    reader.feed(CONNECT[10:])
    assert reader.needed == 0


def test_connect_level_reads_the_protocol_level_from_the_first_bytes() -> None:
    v5 = encode.connect("d", protocol_level=MQTT_5)
    assert connect_level(huge_connect()[:16]) == 4
    assert connect_level(v5[:16]) == MQTT_5
    assert connect_level(huge_connect()[:6]) is None  # not that far yet
    assert connect_level(b"\x30\x02ab") is None  # not a CONNECT


@pytest.mark.parametrize(
    ("client_id", "username", "password", "code"),
    [
        ("c" * MAX_CLIENT_ID, USER, b"p", None),
        ("c" * (MAX_CLIENT_ID + 1), USER, b"p", 2),
        ("d", "u" * (MAX_USERNAME + 1), b"p", 4),
        ("d", USER, b"p" * (MAX_PASSWORD + 1), 4),
        ("d", "u" * MAX_USERNAME, b"p" * MAX_PASSWORD, None),
    ],
)
def test_check_connect_field_limits(client_id, username, password, code) -> None:
    reader = PacketReader()
    reader.feed(encode.connect(client_id, username=username, password=password))
    refusal = check_connect(reader.next_packet())  # type: ignore[arg-type]
    assert (refusal[0] if refusal else None) == code
    if refusal:
        assert "p" * 10 not in refusal[1] and "u" * 10 not in refusal[1]  # lengths, not values


# -- the relay ------------------------------------------------------------------------------


async def test_relay_refuses_an_oversized_connect_after_reading_its_header(
    nursery, config, caplog
) -> None:
    caplog.set_level(logging.INFO)
    h = await start(nursery, Harness(config))
    packet = huge_connect()
    await h.device.send_all(packet[:64])  # the device may send the rest: it is never read
    assert await recv_exact(h.device, 4) == encode.connack(2)
    assert await h.result() == CloseReason.CONNECT_TOO_LARGE
    assert h.relay_device.received == 64
    assert not h.upstream_opened.is_set()
    assert h.observer.closed == [CloseReason.CONNECT_TOO_LARGE]
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.mqtt.relay"]
    assert len(lines) == 1 and "connect_too_large" in lines[0] and len(lines[0]) < 300


async def test_relay_answers_an_oversized_mqtt5_connect_with_packet_too_large(
    nursery, config
) -> None:
    h = await start(nursery, Harness(config))
    packet = encode.connect("c" * 20000, protocol_level=MQTT_5)
    await h.device.send_all(packet[:32])
    connack = await recv_exact(h.device, 4)
    assert connack[0] == 0x20 and connack[3] == 0x95  # CONNACK, reason Packet Too Large
    assert await h.result() == CloseReason.CONNECT_TOO_LARGE


async def test_relay_closes_when_the_oversized_connect_level_is_unknown(nursery, config) -> None:
    h = await start(nursery, Harness(config))
    await h.device.send_all(huge_connect()[:4])  # the size, not yet the protocol level
    assert await recv_eof(h.device) == b""
    assert await h.result() == CloseReason.CONNECT_TOO_LARGE


@pytest.mark.parametrize(
    ("client_id", "username", "password", "code"),
    [
        ("c" * (MAX_CLIENT_ID + 1), USER, b"p", 2),
        ("dev1", USER + "&x=" + "u" * MAX_USERNAME, b"p", 4),
        ("dev1", USER, b"p" * (MAX_PASSWORD + 1), 4),
    ],
)
async def test_relay_refuses_fields_over_the_limits(
    nursery, config, client_id, username, password, code
) -> None:
    h = await start(nursery, Harness(config))
    await h.device.send_all(encode.connect(client_id, username=username, password=password))
    assert await recv_exact(h.device, 4) == encode.connack(code)
    assert await h.result() == CloseReason.CONNECT_TOO_LARGE
    assert not h.upstream_opened.is_set()


async def test_relay_reads_the_connect_within_the_handshake_budget(nursery, config) -> None:
    """Each read asks for no more than the CONNECT still needs, and the budget's hold
    covers what is buffered; it is all given back once the CONNECT is relayed."""
    budget = HandshakeBudget(64 * 1024)
    h = Harness(config)
    sizes: list[int] = []
    inner = h.relay_device.receive_some

    async def receive_some(max_bytes=None):
        sizes.append(max_bytes)
        return await inner(max_bytes)

    h.relay_device.receive_some = receive_some  # type: ignore[method-assign]
    done = trio.Event()

    async def run() -> None:
        await relay_mqtt_connection(h.relay_device, ("192.0.2.7", 40000), config.listeners[0],
                                    config, h.observer, open_upstream=h.open_upstream,
                                    handshake=budget)  # fmt: skip
        done.set()

    nursery.start_soon(run)
    connect = encode.connect("dev1", username=USER, password=b"x" * 3000)
    await h.device.send_all(connect)
    assert await recv_exact(h.hub, len(connect)) == connect
    assert sizes[0] <= 4096  # the CONNECT's reads; the relay's own come after it
    assert budget.peak <= len(connect) + 4096
    assert budget.held == 0
    await h.device.send_stream.aclose()
    await done.wait()


async def test_budget_makes_handshakes_wait_not_fail(autojump_clock) -> None:
    budget = HandshakeBudget(10_000)
    first, second = budget.hold(), budget.hold()
    await first.grow_to(8_000)
    got = trio.Event()

    async def wait_for_room() -> None:
        await second.grow_to(4_000)
        got.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_room)
        await trio.sleep(1)
        assert not got.is_set() and budget.waits == 1
        first.release()
        await got.wait()
    assert budget.held == 4_000
    second.release()
    assert budget.held == 0
    alone = budget.hold()
    await alone.grow_to(50_000)  # larger than the budget, but nobody else holds any
    assert budget.held == 50_000


# -- the relay's log lines ------------------------------------------------------------------------


async def test_relay_line_with_a_65535_char_client_id_is_bounded(
    nursery, config, monkeypatch, restore_root_logger
) -> None:
    """With the CONNECT limits lifted, a 65,535-character client id and user name
    still make only short lines (the relay's lines name them through `shown`)."""
    monkeypatch.setattr("gateway.mqtt_relay.session.check_connect", lambda connect: None)
    listener = config.listeners[0].model_copy(update={"max_connect_size": 1 << 20})
    config = config.model_copy(update={"listeners": [listener]})
    out = io.StringIO()
    setup_logging("info", "text", stream=out)
    h = await start(nursery, Harness(config, fail_connect="refused"))
    client_id = "c" * 65535
    username = "myhub.azure-devices.net/" + "u" * (65535 - 24)
    await h.device.send_all(encode.connect(client_id, username=username, password=b"p" * 65535))
    assert await recv_exact(h.device, 4) == encode.connack(3)
    assert await h.result() == CloseReason.UPSTREAM_UNAVAILABLE
    await trio.testing.wait_all_tasks_blocked()
    lines = out.getvalue().splitlines()
    assert lines and max(len(line) for line in lines) < 1000, [len(x) for x in lines]
    assert "(65535 chars)" in out.getvalue()
    assert "p" * 200 not in out.getvalue()
