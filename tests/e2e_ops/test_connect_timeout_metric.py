"""A hub that accepts TCP and never answers: the connect times out as a whole, and
is counted like any failed connect (iotgw_tls_handshake_failures_total{reason="timeout"}),
which the dashboard and the hub-unreachable alert read."""

from __future__ import annotations

import socket

import pytest
from proton.utils import LinkDetached

from tests.e2e_amqp.gw_helpers import Device, in_thread

from .helpers import EVENTS, admin_url, gateway_yaml, port_of, start_daemon, write_config
from .test_dashboards import wait_for_series


async def test_silent_hub_counts_as_a_timeout(nursery, hub, tmp_path) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes the handshake; nobody ever answers TLS
        port = silent.getsockname()[1]
        text = gateway_yaml(hub, mqtt=False).replace(f"port: {hub.amqp_port}", f"port: {port}")
        text = text.replace("connect_timeout: 5s", "connect_timeout: 0.5s")
        daemon = await start_daemon(nursery, write_config(tmp_path / "gateway.yaml", text))

        def attach() -> None:
            dev = Device(f"amqp://127.0.0.1:{port_of(daemon, 'amqp')}")
            try:
                with pytest.raises(LinkDetached):
                    dev.conn.create_sender(EVENTS % "dev1")
            finally:
                dev.close()

        await in_thread(attach)
        await wait_for_series(admin_url(daemon), "iotgw_tls_handshake_failures_total",
                              connector="iothub", reason="timeout")  # fmt: skip
