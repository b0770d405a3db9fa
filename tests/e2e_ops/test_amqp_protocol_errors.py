"""AMQP protocol errors in /metrics: raw frames a real gateway must refuse.

Raw socket clients (`tests.acceptance.raw_amqp`, encoded with proton's codec)
send a malformed frame, an oversized frame and a frame out of state to a
running daemon; each gets the gateway's close and one count in
``iotgw_protocol_errors_total{protocol="amqp", side="device", kind=<condition>}``.
A client that just drops the connection is not a protocol error. A proton
device on the same gateway carries on delivering, asserted at hubsim.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import trio

from tests.acceptance.raw_amqp import CLOSE, OPEN, RawAmqpClient, frame
from tests.e2e_amqp.gw_helpers import TIMEOUT, Device, data_message, in_thread, send_all

from .helpers import (
    EVENTS,
    admin_url,
    gateway_yaml,
    metric,
    port_of,
    scrape,
    start_daemon,
    write_config,
)


def close_condition(client: RawAmqpClient) -> str:
    """The condition of the gateway's close (bounded by the client's timeout)."""
    close = client.expect(CLOSE)
    error = close.fields[0] if close.fields else None
    assert error is not None, close
    return str(error.value[0])


def malformed(port: int) -> str:
    """A frame whose body is not a described performative."""
    client = RawAmqpClient(port)
    try:
        client.handshake()
        client.sock.sendall(frame(b"\xa1\x05hello"))
        return close_condition(client)
    finally:
        client.close()


def oversized(port: int) -> str:
    """A frame header announcing more than the gateway's max-frame-size."""
    client = RawAmqpClient(port)
    try:
        client.handshake()
        client.sock.sendall(struct.pack(">IBBH", 0x7FFFFFF0, 2, 0, 0) + b"\x00" * 64)
        return close_condition(client)
    finally:
        client.close()


def out_of_state(port: int) -> str:
    """A second open on an open connection."""
    client = RawAmqpClient(port)
    try:
        client.handshake()
        client.send(OPEN, ["raw-device-again", "myhub.azure-devices.net"])
        return close_condition(client)
    finally:
        client.close()


def dropped(port: int) -> None:
    """Open, then close the socket without a close: not a protocol error."""
    client = RawAmqpClient(port)
    try:
        client.handshake()
    finally:
        client.sock.shutdown(socket.SHUT_RDWR)
        client.close()


async def wait_metric(url: str, name: str, expected: float, **labels: str) -> Any:
    with trio.fail_after(TIMEOUT):
        while True:
            samples = await scrape(url)
            if metric(samples, name, **labels) == expected:
                return samples
            await trio.sleep(0.05)


async def test_amqp_protocol_errors_counted_by_condition(nursery, hub, keys, tmp_path) -> None:
    config = write_config(tmp_path / "gateway.yaml", gateway_yaml(hub, mqtt=False))
    daemon = await start_daemon(nursery, config)
    url = admin_url(daemon)
    port = port_of(daemon, "amqp")

    dev = await in_thread(Device, f"amqp://127.0.0.1:{port}")
    try:
        await in_thread(dev.authenticate, "dev1", keys["dev1"])
        sender = await in_thread(dev.conn.create_sender, EVENTS % "dev1")
        await in_thread(send_all, sender, dev.conn, [data_message(b"before", id=i) for i in range(3)])

        await in_thread(dropped, port)
        conditions = [
            await in_thread(malformed, port),
            await in_thread(oversized, port),
            await in_thread(out_of_state, port),
        ]
        # Every raw connection is gone: only the proton device is left.
        samples = await wait_metric(url, "iotgw_device_connections_open", 1,
                                    listener="amqp", protocol="amqp")  # fmt: skip

        # The device on the same gateway carries on, as the hub saw it.
        await in_thread(send_all, sender, dev.conn, [data_message(b"after", id=i) for i in range(3)])
        await in_thread(hub.recorder.wait_for,
                        lambda: len([r for r in hub.recorder.d2c if r.device_id == "dev1"]) == 6,
                        TIMEOUT)  # fmt: skip
    finally:
        await in_thread(dev.close)

    # The engine's conditions: an undecodable body; a frame over max-frame-size and
    # a second open, both framing errors.
    assert conditions == ["amqp:decode-error", "amqp:connection:framing-error",
                          "amqp:connection:framing-error"]  # fmt: skip
    name = "iotgw_protocol_errors_total"
    assert metric(samples, name, protocol="amqp") == 3, conditions
    for condition in set(conditions):
        assert metric(samples, name, protocol="amqp", side="device", kind=condition) == (
            conditions.count(condition)
        ), condition
    assert metric(samples, name, protocol="amqp", side="upstream") == 0
    assert metric(samples, name, protocol="mqtt") == 0
    # Labels are protocol, side and kind only: no device id, nothing from the peer.
    for n, labels, _ in samples:
        if n == name:
            assert set(labels) == {"protocol", "side", "kind"}, labels
    bodies = [r.raw for r in hub.recorder.d2c if r.device_id == "dev1"]
    assert [b"before" in b for b in bodies] == [True] * 3 + [False] * 3
    assert all(b"after" in b for b in bodies[3:])
