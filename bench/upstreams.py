"""The TLS upstreams the devices talk to: the emulated hub and mosquitto."""

from __future__ import annotations

import getpass
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import trustme

from .devices import HUB_HOST
from .procs import Child, free_port, wait_for_port

MOSQUITTO_PATHS = ("mosquitto", "/usr/sbin/mosquitto")
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Certs:
    """A throwaway CA and a server certificate for the hub host name (and 127.0.0.1)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def create(cls, directory: Path) -> Certs:
        ca = trustme.CA(organization_name="iot-gateway bench CA")
        leaf = ca.issue_cert(HUB_HOST, "localhost", "127.0.0.1")
        certs = cls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
        ca.cert_pem.write_to_path(str(certs.ca_file))
        leaf.private_key_pem.write_to_path(str(certs.key_file))
        certs.cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        certs.key_file.chmod(0o600)
        return certs


@dataclass
class Upstream:
    """Where devices (or stunnel, or the gateway) connect with TLS."""

    name: str  # "hubsim" | "mosquitto"
    child: Child
    amqp_port: int | None = None
    mqtt_port: int | None = None
    ws_port: int | None = None  # both protocols over WebSockets (hubsim with --ws)

    def stop(self) -> None:
        self.child.stop()


def write_secret(path: Path, text: str) -> Path:
    """Keys go to the children in 0600 files, not on command lines (`ps` shows those)."""
    path.touch(mode=0o600)
    path.write_text(text)
    return path


def start_hub(certs: Certs, key: str, devices: int, log_dir: Path, *, amqp: bool,
              mqtt: bool, ws: bool = False) -> Upstream:  # fmt: skip
    key_file = write_secret(log_dir / "device-key", key)
    argv = [sys.executable, "-m", "bench.hub_main", "--devices", str(devices),
            "--key-file", str(key_file),
            "--cert", str(certs.cert_file), "--cert-key", str(certs.key_file),
            "--ca", str(certs.ca_file)]  # fmt: skip
    argv += ["--amqp"] if amqp else []
    argv += ["--mqtt"] if mqtt else []
    argv += ["--ws"] if ws else []
    child = Child("hubsim", argv, log_dir, json_lines=True, stdin=True)
    try:
        ready = child.expect("ready", START_TIMEOUT)
    except BaseException:
        child.stop()
        raise
    return Upstream("hubsim", child, ready.get("amqp_port"), ready.get("mqtt_port"),
                    ready.get("ws_port"))  # fmt: skip


def hub_stats(upstream: Upstream) -> dict[str, object]:
    upstream.child.send_line("stats")
    return upstream.child.expect("stats", 10.0)


def mosquitto_binary() -> str | None:
    for name in MOSQUITTO_PATHS:
        found = shutil.which(name)
        if found:
            return found
    return None


def start_mosquitto(certs: Certs, log_dir: Path) -> Upstream:
    binary = mosquitto_binary()
    if binary is None:
        raise FileNotFoundError("mosquitto is not installed")
    port = free_port()
    conf = log_dir / "mosquitto.conf"
    conf.write_text(
        "\n".join(
            [
                f"user {getpass.getuser()}",
                "per_listener_settings false",
                "allow_anonymous true",
                "persistence false",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                "max_keepalive 65535",
                "set_tcp_nodelay true",
                "max_inflight_messages 0",
                "max_queued_messages 10000",
                f"listener {port} 127.0.0.1",
                "max_connections -1",
                f"certfile {certs.cert_file}",
                f"keyfile {certs.key_file}",
                "",
            ]
        )
    )
    child = Child("mosquitto", [binary, "-c", str(conf)], log_dir)
    try:
        wait_for_port(port, child, START_TIMEOUT)
    except BaseException:
        child.stop()
        raise
    return Upstream("mosquitto", child, mqtt_port=port)
