"""Fixtures for the black-box acceptance suite: certificates, our own TLS hub, the daemon."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from .amqp_hub import AmqpHub
from .gateway_proc import GatewayProcess, start_gateway, write_config

HUB_SERVER_NAME = "hub.acceptance.test"


@dataclass
class Pki:
    ca_file: Path
    cert_file: Path  # server chain + key, PEM
    key_file: Path
    server_name: str


def make_pki(directory: Path, server_name: str = HUB_SERVER_NAME) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert(server_name, "127.0.0.1")
    ca_file = directory / "ca.pem"
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return Pki(ca_file, cert_file, key_file, server_name)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def amqp_gateway_yaml(
    pki: Pki, hub_port: int, *, devices_per_connection: int | None = None, extra_routes: str = ""
) -> str:
    pool = ""
    if devices_per_connection is not None:
        pool = f"    pool: {{max_connections: 4, max_devices_per_connection: {devices_per_connection}}}\n"
    return f"""\
gateway:
  id: acceptance-gw
  drain_timeout: 2s
admin:
  listen: 127.0.0.1:0
log: {{level: info, format: text}}
tls_profiles:
  hub:
    ca_file: {pki.ca_file}
    server_name: {pki.server_name}
    min_version: "1.2"
listeners:
  - {{name: amqp, protocol: amqp, bind: "127.0.0.1:0", sasl: [anonymous, plain]}}
connectors:
  - name: iothub
    protocol: amqp
    host: 127.0.0.1
    port: {hub_port}
    tls_profile: hub
    sasl: anonymous
    idle_timeout: 120s
{pool}link_routes:
  - {{prefix: "$cbs", connector: iothub, direction: both}}
  - {{prefix: "devices/", connector: iothub, direction: both}}
{extra_routes}"""


@dataclass
class AmqpStack:
    hub: AmqpHub
    gateway: GatewayProcess

    @property
    def port(self) -> int:
        return self.gateway.port("amqp")


def _amqp_stack(tmp: Path, pki: Pki, devices_per_connection: int | None) -> Iterator[AmqpStack]:
    hub = AmqpHub(pki.cert_file, pki.key_file).start()
    gw: GatewayProcess | None = None
    try:
        config = write_config(
            tmp, amqp_gateway_yaml(pki, hub.port, devices_per_connection=devices_per_connection)
        )
        gw = start_gateway(config, listeners=("amqp",))
        yield AmqpStack(hub, gw)
    finally:
        if gw is not None:
            gw.stop()
        hub.stop()


@pytest.fixture(scope="module")
def amqp_stack(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[AmqpStack]:
    """Our hub + the daemon with default pool sizes (shared upstream connections)."""
    yield from _amqp_stack(tmp_path_factory.mktemp("gw-amqp"), pki, None)


@pytest.fixture(scope="module")
def amqp_stack_isolated(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[AmqpStack]:
    """Our hub + the daemon with max_devices_per_connection: 1 ($cbs routed verbatim)."""
    yield from _amqp_stack(tmp_path_factory.mktemp("gw-amqp-1"), pki, 1)
