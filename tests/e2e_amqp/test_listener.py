"""The device side: TLS listeners, SASL optional, handshake and idle timeouts."""

from __future__ import annotations

import socket
import time

import trustme
from gw_helpers import (
    HUB_HOST,
    TIMEOUT,
    Device,
    data_message,
    gateway_config,
    in_thread,
    running_gateway,
)
from proton import SSLDomain
from proton.utils import BlockingConnection

EVENTS = f"amqps://{HUB_HOST}/devices/%s/messages/events"


async def test_device_tls_listener(hub, keys, tmp_path) -> None:
    ca = trustme.CA()
    # proton verifies the name it opens with (the hub host), as SDKs given a gateway do.
    cert = ca.issue_cert("gateway.local", HUB_HOST, "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "gw.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    pem = tmp_path / "gw.pem"
    config = gateway_config(hub, tmp_path, listener_extra=", tls_profile: lan",
                            tls_extra=f'  lan: {{cert_file: "{pem}", key_file: "{pem}"}}')  # fmt: skip
    async with running_gateway(config) as gw:

        def run():
            domain = SSLDomain(SSLDomain.MODE_CLIENT)
            domain.set_trusted_ca_db(str(tmp_path / "ca.pem"))
            domain.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
            conn = BlockingConnection(f"amqps://127.0.0.1:{gw.port}", ssl_domain=domain,
                                      allowed_mechs="ANONYMOUS", virtual_host=HUB_HOST,
                                      timeout=TIMEOUT)  # fmt: skip
            dev = Device.__new__(Device)
            dev.conn, dev.cbs_tx, dev.cbs_rx, dev.reply_to, dev.next_id = conn, None, None, None, 0
            try:
                dev.authenticate("dev1", keys["dev1"])
                dev.conn.create_sender(EVENTS % "dev1").send(data_message(b"over tls"))
            finally:
                dev.close()

        await in_thread(run)
    assert [r.body for r in hub.recorder.d2c] == [b"over tls"]


async def test_device_without_sasl_layer(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path)
    async with running_gateway(config) as gw:

        def run():
            conn = BlockingConnection(gw.url, sasl_enabled=False, virtual_host=HUB_HOST,
                                      timeout=TIMEOUT)  # fmt: skip
            dev = Device.__new__(Device)
            dev.conn, dev.cbs_tx, dev.cbs_rx, dev.reply_to, dev.next_id = conn, None, None, None, 0
            try:
                dev.authenticate("dev1", keys["dev1"])
                dev.conn.create_sender(EVENTS % "dev1").send(data_message(b"no sasl"))
            finally:
                dev.close()

        await in_thread(run)
    assert [r.body for r in hub.recorder.d2c] == [b"no sasl"]


def read_until_closed(port: int, send: bytes) -> tuple[bytes, float]:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(send)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data, time.monotonic() - t0


async def test_handshake_timeout(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path, listener_extra=", handshake_timeout: 0.5s")
    async with running_gateway(config) as gw:
        # The protocol header, then silence: no SASL, no open.
        data, elapsed = await in_thread(read_until_closed, gw.port, b"AMQP\x03\x01\x00\x00")
    assert data.startswith(b"AMQP\x03\x01\x00\x00")
    assert 0.4 <= elapsed < 3


async def test_idle_timeout_both_ways(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path, listener_extra=", idle_timeout: 1s")
    async with running_gateway(config) as gw:

        def quiet_device():
            # proton with a 1 s idle timeout of its own: the gateway must send
            # heartbeats often enough, and proton sends its own, so the connection
            # outlives several idle periods with no traffic at all.
            conn = BlockingConnection(gw.url, allowed_mechs="ANONYMOUS", heartbeat=1,
                                      virtual_host=HUB_HOST, timeout=TIMEOUT)  # fmt: skip
            try:
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    conn.container.process()  # I/O and timers only; no application traffic
                    time.sleep(0.01)
                return conn.conn.state
            finally:
                conn.close()

        from proton import Endpoint

        state = await in_thread(quiet_device)
        assert state & Endpoint.REMOTE_ACTIVE

        def silent_peer():
            # A raw client that opens and then never sends a byte again: the gateway
            # closes it after its 1 s idle timeout.
            import struct

            from proton import Connection, Transport

            t = Transport()
            c = Connection()
            c.container = "silent"
            c.hostname = HUB_HOST
            t.bind(c)
            c.open()
            out = t.peek(t.pending())
            t.pop(len(out))
            assert struct.unpack(">I", out[8:12])[0] > 0
            return read_until_closed(gw.port, bytes(out))

        data, elapsed = await in_thread(silent_peer)
    assert b"amqp:resource-limit-exceeded" in data
    assert 0.9 <= elapsed < 4
