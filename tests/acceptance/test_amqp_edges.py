"""AMQP edges: heartbeats, garbage from a device, a hub whose certificate does not match."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from proton import Data, Delivery, Endpoint
from proton.utils import LinkDetached

from tests.waiting import FAILSAFE

from .amqp_devices import ProtonDevice, message_sections, put_token_request, sample_messages
from .amqp_hub import AmqpHub
from .conftest import AmqpStack, Pki, amqp_gateway_yaml
from .gateway_proc import start_gateway, write_config

pytestmark = pytest.mark.timeout(600)


def test_gateway_keeps_an_idle_device_alive(amqp_stack: AmqpStack) -> None:
    """A device asking for a 2 s idle timeout must get frames at least that often."""
    with ProtonDevice(amqp_stack.port, "idle1") as dev:
        dev.put_token()
        snd = dev.sender("devices/idle1/messages/events", name="telemetry")
        dev.pump(0.1)
        assert dev.conn.conn.transport.remote_idle_timeout > 0, "gateway advertises no idle-timeout"
    with ProtonDevice(amqp_stack.port, "idle2", heartbeat=2) as dev:
        dev.put_token()
        snd = dev.sender("devices/idle2/messages/events", name="telemetry")
        dev.pump(3.5)
        assert not dev.conn.conn.state & Endpoint.REMOTE_CLOSED
        dlv = dev.send_raw(snd, sample_messages(1)[0])
        dev.wait_settled([dlv])
        assert dlv.remote_state == Delivery.ACCEPTED


def _read_frames(sock: socket.socket) -> list[tuple[int, object]]:
    """Read until the peer closes; returns (frame type, performative) pairs."""
    data = b""
    sock.settimeout(10)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    frames = []
    offset = 0
    while offset + 8 <= len(data):
        size, doff, ftype, _channel = struct.unpack(">IBBH", data[offset : offset + 8])
        body = data[offset + doff * 4 : offset + size]
        if body:
            decoded = Data()
            decoded.decode(body)
            decoded.rewind()
            decoded.next()
            frames.append((ftype, decoded.get_object()))
        offset += size
    return frames


def test_garbage_after_the_header_closes_only_that_device(amqp_stack: AmqpStack) -> None:
    with ProtonDevice(amqp_stack.port, "bystander") as good:
        good.put_token()
        snd = good.sender("devices/bystander/messages/events", name="telemetry")
        with socket.create_connection(("127.0.0.1", amqp_stack.port), timeout=10) as sock:
            sock.sendall(b"AMQP\x00\x01\x00\x00")
            assert sock.recv(8) == b"AMQP\x00\x01\x00\x00"
            # A frame whose body is not a valid AMQP performative.
            sock.sendall(struct.pack(">IBBH", 16, 2, 0, 0) + b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8")
            frames = _read_frames(sock)
        closes = [obj for _, obj in frames if int(getattr(obj, "descriptor", 0)) == 0x18]
        assert closes, f"no close frame before the socket closed: {frames}"
        error = closes[-1].value[0] if closes[-1].value else None
        assert error is not None and str(error.value[0]) == "amqp:decode-error", closes[-1]
        dlv = good.send_raw(snd, sample_messages(1)[0])
        good.wait_settled([dlv])
        assert dlv.remote_state == Delivery.ACCEPTED


def test_hub_certificate_name_mismatch_is_refused(tmp_path: Path, pki: Pki) -> None:
    hub = AmqpHub(pki.cert_file, pki.key_file).start()
    gw = None
    try:
        text = amqp_gateway_yaml(pki, hub.port).replace(
            f"server_name: {pki.server_name}", "server_name: someone-else.test"
        )
        gw = start_gateway(write_config(tmp_path, text), listeners=("amqp",))
        with ProtonDevice(gw.port("amqp"), "tls1") as dev:
            # The put-token must fail promptly (an error reply or a rejected request),
            # not leave the device waiting for a reply that cannot come.
            dev.open_cbs()
            assert dev.cbs_sender is not None
            request = put_token_request("tls1", "SharedAccessSignature sr=a&sig=b&se=1").encode()
            dlv = dev.send_raw(dev.cbs_sender, request)
            incoming = dev.cbs_replies.incoming
            dev.wait(lambda: dlv.settled or incoming, timeout=FAILSAFE, what="put-token answered")
            if incoming:
                assert message_sections(incoming[0].data)[0x74]["status-code"] != 200
            else:
                assert dlv.remote_state == Delivery.REJECTED
            with pytest.raises(LinkDetached) as info:
                dev.sender("devices/tls1/messages/events", name="telemetry")
            assert info.value.condition is not None
        assert hub.connections_opened == 0, "the gateway talked AMQP to a hub it could not verify"
        gw.wait_metric("iotgw_tls_handshake_failures_total", lambda v: v >= 1, timeout=FAILSAFE)
    finally:
        if gw is not None:
            gw.stop()
        hub.stop()


def test_pool_spreads_devices_and_refuses_when_full(tmp_path: Path, pki: Pki) -> None:
    hub = AmqpHub(pki.cert_file, pki.key_file).start()
    gw = None
    devices: list[ProtonDevice] = []
    try:
        text = amqp_gateway_yaml(pki, hub.port).replace(
            "    idle_timeout: 120s\n",
            "    idle_timeout: 120s\n    pool: {max_connections: 2, max_devices_per_connection: 3}\n",
        )
        gw = start_gateway(write_config(tmp_path, text), listeners=("amqp",))
        for i in range(6):
            dev = ProtonDevice(gw.port("amqp"), f"pool{i}")
            devices.append(dev)
            reply, _ = dev.put_token(f"token-pool{i}", message_id=0)
            assert reply.properties["status-code"] == 200
            snd = dev.sender(f"devices/pool{i}/messages/events", name="telemetry")
            dlv = dev.send_raw(snd, sample_messages(1)[0])
            dev.wait_settled([dlv])
            assert dlv.remote_state == Delivery.ACCEPTED
        per_connection: dict[int, int] = {}
        for rec in hub.received:
            if rec.address.startswith("devices/pool"):
                per_connection[rec.conn] = per_connection.get(rec.conn, 0) + 1
        assert sorted(per_connection.values()) == [3, 3], per_connection
        extra = ProtonDevice(gw.port("amqp"), "pool-extra")
        devices.append(extra)
        extra.open_cbs()
        assert extra.cbs_sender is not None
        request = put_token_request("pool-extra", "token-extra").encode()
        dlv = extra.send_raw(extra.cbs_sender, request)
        incoming = extra.cbs_replies.incoming
        extra.wait(lambda: dlv.settled or incoming, what="put-token answered")
        if incoming:
            assert message_sections(incoming[0].data)[0x74]["status-code"] != 200
        else:
            assert dlv.remote_state == Delivery.REJECTED
            assert dlv.remote.condition.name == "amqp:resource-limit-exceeded"
    finally:
        for dev in devices:
            dev.close()
        if gw is not None:
            gw.stop()
        hub.stop()
