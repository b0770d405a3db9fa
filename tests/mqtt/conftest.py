"""Fixtures for the MQTT codec and relay tests: certificates, mosquitto, configs."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from gateway.config import GatewayConfig, parse_config_text
from tests.waiting import FAILSAFE

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
STARTUP_TIMEOUT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)


@dataclass(frozen=True)
class CertFiles:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertFiles:
    """A throwaway CA and a server certificate for loopback names."""
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    server = ca.issue_cert(
        "localhost", "127.0.0.1", "::1", "mqtt.test", key_type=trustme.KeyType.ECDSA
    )
    ca_file = directory / "ca.pem"
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    server.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    return CertFiles(ca, ca_file, cert_file, key_file)


def free_port() -> int:
    """A port for a server that cannot bind port 0 itself (mosquitto)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mosquitto:
    """A mosquitto broker with one TLS listener on 127.0.0.1 (anonymous allowed)."""

    def __init__(self, certs: CertFiles, directory: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.conf = directory / "mosquitto.conf"
        self.log_file = directory / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.conf.write_text(
            "\n".join(
                [
                    f"user {getpass.getuser()}",
                    "per_listener_settings false",
                    "allow_anonymous true",
                    "persistence false",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "max_keepalive 65535",
                    f"listener {self.port} 127.0.0.1",
                    f"certfile {certs.cert_file}",
                    f"keyfile {certs.key_file}",
                    "",
                ]
            )
        )

    def start(self) -> None:
        assert MOSQUITTO is not None
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log
            )
        _wait_listening(self.port, self.process, time.monotonic() + STARTUP_TIMEOUT)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


def _wait_listening(port: int, process: subprocess.Popen[bytes], deadline: float) -> None:
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not start listening in time") from None
            time.sleep(0.02)  # readiness polling with a deadline


@pytest.fixture(scope="module")
def mosquitto(certs: CertFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A broker shared by the tests of a module."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed")
    broker = Mosquitto(certs, tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mosquitto_factory(
    certs: CertFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], Mosquitto]]:
    """Make brokers of one's own (not started), stopped at the end of the test."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed")
    made: list[Mosquitto] = []

    def make() -> Mosquitto:
        broker = Mosquitto(certs, tmp_path_factory.mktemp("mosquitto"))
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.stop()


ConfigFactory = Callable[..., GatewayConfig]


@pytest.fixture
def make_config(certs: CertFiles) -> ConfigFactory:
    """make_config(upstream_port, **options) -> GatewayConfig with one MQTT listener on port 0.

    Options: hub (route hub, "*"), allowed_topics (list or None), handshake_timeout (FAILSAFE),
    max_packet_size, max_connections, server_name, connect_timeout, allowed_networks, ca_file, device_tls
    (the listener terminates device TLS with the test server certificate).
    """

    def make(
        upstream_port: int,
        *,
        hub: str = "*",
        allowed_topics: list[str] | None = None,
        # The gateway's own timeouts default to the fail-safe: a test of them sets its own.
        handshake_timeout: str = f"{FAILSAFE:g}s",
        max_packet_size: int | None = None,
        max_connections: int = 1000,
        server_name: str | None = None,
        connect_timeout: str = f"{FAILSAFE:g}s",
        allowed_networks: list[str] | None = None,
        ca_file: Path | None = None,
        device_tls: bool = False,
    ) -> GatewayConfig:
        lines = [
            "admin: {enabled: false}",
            "tls_profiles:",
            "  devices:",
            f"    cert_file: {certs.cert_file}",
            f"    key_file: {certs.key_file}",
            "  upstream:",
            f"    ca_file: {ca_file or certs.ca_file}",
        ]
        if server_name:
            lines.append(f"    server_name: {server_name}")
        lines += [
            "listeners:",
            "  - name: mqtt",
            "    protocol: mqtt",
            '    bind: "127.0.0.1:0"',
            f"    handshake_timeout: {handshake_timeout}",
            f"    max_connections: {max_connections}",
        ]
        if device_tls:
            lines.append("    tls_profile: devices")
        if max_packet_size is not None:
            lines.append(f"    max_packet_size: {max_packet_size}")
        if allowed_networks is not None:
            lines.append(f"    allowed_networks: {allowed_networks!r}")
        lines += [
            "connectors:",
            "  - name: broker",
            "    protocol: mqtt",
            "    host: 127.0.0.1",
            f"    port: {upstream_port}",
            "    tls_profile: upstream",
            f"    connect_timeout: {connect_timeout}",
            "mqtt_routes:",
            f'  - hub: "{hub}"',
            "    connector: broker",
        ]
        if allowed_topics is not None:
            lines.append(f"    allowed_topics: {allowed_topics!r}")
        return parse_config_text("\n".join(lines) + "\n", "test.yaml")

    return make
