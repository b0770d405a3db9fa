"""Stopping hubsim ends the connections still in their TLS handshake, as a stopped
IoT Hub would: a client that connected just before ``stop()`` is not left waiting
for its own handshake timeout, and the hub restarted on the same port answers."""

from __future__ import annotations

import random
import socket
import ssl

import pytest
from hubsim_clients import HUB_HOST

from gateway.hubsim import HubSim
from tests.waiting import wait_for_progress_sync

FAILSAFE = 60.0  # seconds; a silent socket is the failure, this only bounds the test


@pytest.mark.parametrize("protocol", ["amqp", "mqtt"])
def test_stop_ends_handshakes_in_progress(keys: dict[str, str], protocol: str) -> None:
    rng = random.Random()
    host = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"
    hub = HubSim(keys, hub_host=HUB_HOST, host=host)
    hub.start()
    try:
        server = hub._amqp if protocol == "amqp" else hub._mqtt
        port = hub.amqp_port if protocol == "amqp" else hub.mqtt_port
        assert port is not None
        sock = socket.create_connection((host, port), timeout=FAILSAFE)
        with sock:
            # Accepted by hubsim's loop, no ClientHello yet: its handshake is under way.
            assert server.listener is not None
            listener = server.listener
            wait_for_progress_sync(lambda: len(listener.accepted) > 0, lambda: None,
                                   stall=FAILSAFE, what="hubsim accepting the connection")  # fmt: skip
            hub.stop()
            try:
                data = sock.recv(1024)
            except ConnectionResetError:
                data = b""
            except TimeoutError:
                pytest.fail("the stopped hub left a connection open and silent")
            assert data == b""
        hub.start()  # the same port again
        assert (hub.amqp_port if protocol == "amqp" else hub.mqtt_port) == port
        ctx = ssl.create_default_context(cafile=hub.ca_file)
        with socket.create_connection((host, port), timeout=FAILSAFE) as raw:
            with ctx.wrap_socket(raw, server_hostname=HUB_HOST) as tls:
                assert tls.version() is not None
    finally:
        hub.close()
