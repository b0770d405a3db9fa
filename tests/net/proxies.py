"""Real HTTP proxies for the tests: Debian's tinyproxy, started on a loopback port.

`tinyproxy(...)` writes a config (listen address, allowed CONNECT ports,
optional Basic auth), runs ``tinyproxy -d`` and waits for its "Accepting
connections" log line, so the test starts only once it listens.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

TINYPROXY = shutil.which("tinyproxy") or (
    "/usr/bin/tinyproxy" if Path("/usr/bin/tinyproxy").exists() else None
)

needs_tinyproxy = pytest.mark.skipif(TINYPROXY is None, reason="tinyproxy not installed")

START_WAIT = 30.0


@dataclass
class RunningProxy:
    host: str
    port: int
    log: list[str]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def loopback_address() -> str:
    """A random 127.x.y.z, so parallel test runs seldom share a port space."""
    return f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def tinyproxy(
    directory: Path,
    *,
    connect_ports: Iterable[int] = (),
    auth: tuple[str, str] | None = None,
) -> AsyncIterator[RunningProxy]:
    """A tinyproxy allowing CONNECT to `connect_ports` (all ports if empty)."""
    assert TINYPROXY is not None
    host = loopback_address()
    port = free_port(host)
    lines = [
        f"Port {port}",
        f"Listen {host}",
        "Timeout 60",
        "MaxClients 100",
        "LogLevel Info",
        "Allow 127.0.0.0/8",
        "DisableViaHeader Yes",
    ]
    lines += [f"ConnectPort {p}" for p in connect_ports]
    if auth is not None:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    conf = directory / f"tinyproxy-{port}.conf"
    conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = await trio.lowlevel.open_process(
        [TINYPROXY, "-d", "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,  # tinyproxy -d logs to stdout
        stderr=subprocess.STDOUT,
    )
    log: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            ready = trio.Event()

            async def read_log() -> None:
                assert proc.stdout is not None
                buffer = b""
                while True:
                    data = await proc.stdout.receive_some(65536)
                    if not data:
                        break
                    buffer += data
                    *complete, buffer = buffer.split(b"\n")
                    for line in complete:
                        text = line.decode("utf-8", "replace")
                        log.append(text)
                        if "Accepting connections" in text:
                            ready.set()
                ready.set()

            nursery.start_soon(read_log)
            with trio.fail_after(START_WAIT):
                await ready.wait()
            if proc.returncode is not None or not any("Accepting connections" in s for s in log):
                raise RuntimeError("tinyproxy did not start:\n" + "\n".join(log[-20:]))
            try:
                yield RunningProxy(host, port, log)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
