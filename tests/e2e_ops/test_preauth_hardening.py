"""Huge handshakes and bad input against `python -m gateway run`: bounded and contained.

Raw sockets send what no device should: MQTT CONNECTs with 65,535-byte client
id, user name and password (about 196 KB, under `max_packet_size`), AMQP
SASL-INITs and opens far over the pre-authentication frame limits. Each is
refused from its header (CONNACK 2, a SASL outcome, a close) and counted in
``iotgw_protocol_errors_total``; the log stays short; a paho device on the same
gateway then connects and publishes, asserted at hubsim.
"""

from __future__ import annotations

import socket
import struct

import trio

from tests.e2e_amqp.gw_helpers import TIMEOUT
from tests.mqtt.paho_device import PahoDevice
from tests.mqtt.test_relay_hubsim import sas_token as mqtt_sas_token
from tests.mqtt.test_relay_hubsim import username

from .helpers import MQTT_EVENTS, GatewayProcess, gateway_yaml, metric, scrape

FIELD = 65535
SASL_HEADER = b"AMQP\x03\x01\x00\x00"


def _field(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def huge_connect() -> bytes:
    body = _field(b"MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 60)
    body += _field(b"c" * FIELD) + _field(b"u" * FIELD) + _field(b"p" * FIELD)
    size, length = len(body), bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        length.append(byte | (0x80 if size else 0))
        if not size:
            break
    return b"\x10" + bytes(length) + body


def read_until_eof(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def oversized_connect_answer(port: int) -> bytes:
    """Send the first 64 bytes of a 196 KB CONNECT; what comes back before EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(huge_connect()[:64])
        return read_until_eof(sock)


def huge_connect_sent_whole(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        try:
            sock.sendall(huge_connect())
        except OSError:
            return  # refused before it was all sent: fine
        read_until_eof(sock)


def oversized_sasl_init_answer(port: int) -> bytes:
    """A SASL header and the 8-byte header of a 60 KB SASL frame."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(SASL_HEADER + struct.pack(">IBBH", 60_000, 2, 1, 0))
        return read_until_eof(sock)


async def test_huge_connects_refused_from_their_header_and_devices_carry_on(
    hub, keys, tmp_path
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(hub))
    gw = GatewayProcess(path)
    try:
        await gw.started()
        mqtt_port, amqp_port = gw.ports["mqtt"], gw.ports["amqp"]

        answer = await trio.to_thread.run_sync(oversized_connect_answer, mqtt_port)
        assert answer == b"\x20\x02\x00\x02"  # CONNACK 2, identifier rejected, then EOF

        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(trio.to_thread.run_sync, huge_connect_sent_whole, mqtt_port)

        sasl = await trio.to_thread.run_sync(oversized_sasl_init_answer, amqp_port)
        assert sasl.startswith(SASL_HEADER)
        assert b"\x00\x53\x44" in sasl  # a sasl-outcome (code auth) before the close

        dev = PahoDevice("dev1", username=username("dev1"),
                         password=mqtt_sas_token("dev1", keys["dev1"]))  # fmt: skip
        try:
            assert await dev.connect(mqtt_port) == 0
            await dev.publish(MQTT_EVENTS.format("dev1"), b"after the flood", qos=1)
            await trio.to_thread.run_sync(
                hub.recorder.wait_for, lambda: hub.recorder.d2c_for("dev1"), TIMEOUT
            )
            assert [r.raw for r in hub.recorder.d2c_for("dev1")][-1].endswith(b"after the flood")
            await dev.disconnect()
        finally:
            await trio.to_thread.run_sync(dev.close)

        samples = await scrape(gw.admin_url)
        refused = metric(samples, "iotgw_protocol_errors_total", protocol="mqtt", side="device",
                         kind="connect_too_large")  # fmt: skip
        assert refused == 41
        assert gw.proc.poll() is None
        lines = gw.output.splitlines()
        assert max(len(line) for line in lines) < 1000
        assert sum("connect_too_large" in line for line in lines) < 10  # rate-limited
    finally:
        gw.close()
