"""`iot-gateway run` start-up failures: one line on stderr naming what failed, where
and why, and a distinct exit status (docs/operations.md, "Exit status").

Each test runs the real ``python -m gateway run`` in a subprocess. The
configuration files live in a directory every user may read, so the same
helper can run the gateway as ``nobody`` (``setpriv``) for the permission cases.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme

from gateway import daemon as daemon_module
from gateway.config import parse_config_text
from gateway.daemon import Daemon
from gateway.ops.startup import (
    EXIT_ADDRESS,
    EXIT_CONFIG,
    EXIT_PERMISSION,
    EXIT_TLS,
    StartupError,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def _can_drop_privileges() -> bool:
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A temporary directory any user may read (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="iotgw-startup-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port another process (here: this one) is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def write(directory: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    path.chmod(0o644)
    return path


def config_text(*, listeners: str, admin: str = '{listen: "127.0.0.1:0"}',
                tls_profiles: str = "{}", connector_tls: str = "") -> str:  # fmt: skip
    tls = f", tls_profile: {connector_tls}" if connector_tls else ", allow_plaintext: true"
    return f"""
    gateway: {{id: startup-test}}
    admin: {admin}
    tls_profiles: {tls_profiles}
    listeners:
    {textwrap.indent(textwrap.dedent(listeners).strip(), "    ").lstrip()}
    connectors:
      - {{name: hub, protocol: amqp, host: 127.0.0.1, port: 1{tls}}}
    link_routes:
      - {{prefix: "$cbs", connector: hub}}
    """


def run_gateway(config: Path, *, as_nobody: bool = False) -> tuple[int, list[str]]:
    """Run the gateway until it exits by itself: (status, stderr lines)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("NOTIFY_SOCKET", None)
    command = [sys.executable, "-m", "gateway", "run", "-c", str(config)]
    if as_nobody:
        command = [*NOBODY, *command]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=90)  # fmt: skip
    return done.returncode, done.stderr.splitlines()


def one_line(lines: list[str]) -> str:
    assert len(lines) == 1, "\n".join(lines)
    assert "Traceback" not in lines[0] and "ExceptionGroup" not in lines[0]
    return lines[0]


def test_listener_address_in_use(shared_dir: Path, held_port: int) -> None:
    config = write(shared_dir, config_text(listeners=f"""
        - {{name: first, protocol: amqp, bind: "127.0.0.1:0"}}
        - {{name: amqp, protocol: amqp, bind: "127.0.0.1:{held_port}"}}
        """))  # fmt: skip
    status, lines = run_gateway(config)
    line = one_line(lines)
    assert status == EXIT_ADDRESS, line
    assert f"listener 'amqp' on 127.0.0.1:{held_port}: address already in use" in line


def test_mqtt_listener_address_in_use(shared_dir: Path, held_port: int) -> None:
    config = write(shared_dir, config_text(listeners=f"""
        - {{name: devices-mqtt, protocol: mqtt, bind: "127.0.0.1:{held_port}"}}
        """))  # fmt: skip
    status, lines = run_gateway(config)
    assert status == EXIT_ADDRESS
    assert f"listener 'devices-mqtt' on 127.0.0.1:{held_port}: address already in use" in (
        one_line(lines)
    )


def test_admin_address_in_use(shared_dir: Path, held_port: int) -> None:
    config = write(shared_dir, config_text(
        listeners='- {name: amqp, protocol: amqp, bind: "127.0.0.1:0"}',
        admin=f'{{listen: "127.0.0.1:{held_port}"}}',
    ))  # fmt: skip
    status, lines = run_gateway(config)
    line = one_line(lines)
    assert status == EXIT_ADDRESS, line
    assert f"admin endpoint on 127.0.0.1:{held_port}: address already in use" in line


def test_address_not_of_this_host(shared_dir: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never assigned to a real interface.
    config = write(shared_dir, config_text(listeners="""
        - {name: amqp, protocol: amqp, bind: "192.0.2.1:5672"}
        """))  # fmt: skip
    status, lines = run_gateway(config)
    line = one_line(lines)
    assert status == EXIT_ADDRESS, line
    assert "listener 'amqp' on 192.0.2.1:5672: address not available" in line


def _privileged_port_is_protected() -> bool:
    try:
        start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        start = 1024
    return start > 80


@pytest.mark.skipif(not _can_drop_privileges(), reason="needs root and setpriv to run as nobody")
@pytest.mark.skipif(not _privileged_port_is_protected(), reason="unprivileged users may bind 80")
def test_port_below_1024_as_unprivileged_user(shared_dir: Path) -> None:
    config = write(shared_dir, config_text(listeners="""
        - {name: amqp, protocol: amqp, bind: "127.0.0.1:80"}
        """))  # fmt: skip
    status, lines = run_gateway(config, as_nobody=True)
    line = one_line(lines)
    assert status == EXIT_PERMISSION, line
    assert "listener 'amqp' on 127.0.0.1:80: permission denied" in line
    assert "CAP_NET_BIND_SERVICE" in line


@pytest.mark.skipif(not _can_drop_privileges(), reason="needs root and setpriv to run as nobody")
def test_unreadable_certificate_as_unprivileged_user(shared_dir: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("gateway.local")
    cert.cert_chain_pems[0].write_to_path(str(shared_dir / "cert.pem"))
    cert.private_key_pem.write_to_path(str(shared_dir / "key.pem"))
    (shared_dir / "cert.pem").chmod(0o600)  # root's, unreadable to nobody
    (shared_dir / "key.pem").chmod(0o644)
    config = write(shared_dir, config_text(
        listeners='- {name: amqps, protocol: amqp, bind: "127.0.0.1:0", tls_profile: local}',
        tls_profiles="{local: {cert_file: cert.pem, key_file: key.pem}}",
    ))  # fmt: skip
    status, lines = run_gateway(config, as_nobody=True)
    line = one_line(lines)
    assert status == EXIT_CONFIG, line
    assert f"tls_profiles.local.cert_file: file not readable: {shared_dir / 'cert.pem'}" in line


def _listener_cert(directory: Path, *, key_text: bytes | None = None,
                   other_key: bool = False) -> None:  # fmt: skip
    ca = trustme.CA()
    cert = ca.issue_cert("gateway.local")
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    if key_text is not None:
        (directory / "key.pem").write_bytes(key_text)
    elif other_key:
        ca.issue_cert("other.local").private_key_pem.write_to_path(str(directory / "key.pem"))
    else:
        cert.private_key_pem.write_to_path(str(directory / "key.pem"))


def test_listener_key_file_not_a_key(shared_dir: Path) -> None:
    _listener_cert(shared_dir, key_text=b"this is not a private key\n")
    config = write(shared_dir, config_text(
        listeners='- {name: amqps, protocol: amqp, bind: "127.0.0.1:0", tls_profile: local}',
        tls_profiles="{local: {cert_file: cert.pem, key_file: key.pem}}",
    ))  # fmt: skip
    status, lines = run_gateway(config)
    line = one_line(lines)
    assert status == EXIT_TLS, line
    assert "listener 'amqps' tls_profile 'local': cannot load cert_file" in line
    assert str(shared_dir / "key.pem") in line and "not a PEM certificate and private key" in line


def test_listener_key_of_another_certificate(shared_dir: Path) -> None:
    _listener_cert(shared_dir, other_key=True)
    config = write(shared_dir, config_text(
        listeners='- {name: mqtts, protocol: mqtt, bind: "127.0.0.1:0", tls_profile: local}',
        tls_profiles="{local: {cert_file: cert.pem, key_file: key.pem}}",
    ))  # fmt: skip
    status, lines = run_gateway(config)
    line = one_line(lines)
    assert status == EXIT_TLS, line
    assert "listener 'mqtts' tls_profile 'local'" in line
    assert "the private key does not belong to the certificate" in line


def test_connector_client_key_not_a_key(shared_dir: Path) -> None:
    _listener_cert(shared_dir, key_text=b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    config = write(shared_dir, config_text(
        listeners='- {name: amqp, protocol: amqp, bind: "127.0.0.1:0"}',
        tls_profiles="{hub: {cert_file: cert.pem, key_file: key.pem}}",
        connector_tls="hub",
    ))  # fmt: skip
    status, lines = run_gateway(config)
    line = one_line(lines)
    assert status == EXIT_TLS, line
    assert "connector 'hub' tls_profile 'hub': cannot load cert_file" in line


async def test_a_failed_bind_releases_the_ports_already_bound(
    held_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config_text(textwrap.dedent(config_text(listeners=f"""
        - {{name: first, protocol: amqp, bind: "127.0.0.1:0"}}
        - {{name: second, protocol: mqtt, bind: "127.0.0.1:{held_port}"}}
        """)), "<test>")  # fmt: skip
    opened: list[trio.SocketListener] = []
    real_bind = daemon_module._bind

    async def recording_bind(what: str, address: object) -> list[trio.SocketListener]:
        sockets = await real_bind(what, address)
        opened.extend(sockets)
        return sockets

    monkeypatch.setattr(daemon_module, "_bind", recording_bind)
    daemon = Daemon(config)
    with pytest.raises(StartupError) as caught:
        await daemon.bind()
    assert caught.value.status == EXIT_ADDRESS
    assert str(caught.value).startswith(f"listener 'second' on 127.0.0.1:{held_port}: ")
    assert daemon.listener_settings == {} and daemon.admin_sockets == []
    assert len(opened) == 1 and opened[0].socket.fileno() == -1  # "first" was closed again
