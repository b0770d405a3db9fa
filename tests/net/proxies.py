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
import tempfile
import warnings
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


SQUID = shutil.which("squid") or ("/usr/sbin/squid" if Path("/usr/sbin/squid").exists() else None)
NCSA_AUTH = "/usr/lib/squid/basic_ncsa_auth"


def _can_hash_passwords() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt  # noqa: F401
        except ImportError:
            return shutil.which("openssl") is not None
    return True


needs_squid = pytest.mark.skipif(
    SQUID is None or not Path(NCSA_AUTH).exists() or not _can_hash_passwords(),
    reason="squid (with basic_ncsa_auth) not installed, or neither crypt nor openssl",
)


def _md5_crypt(password: str) -> str:
    """An htpasswd hash basic_ncsa_auth accepts ($1$, MD5-crypt)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # gone in Python 3.13: openssl does the same below

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_MD5))
    except ImportError:
        out = subprocess.run(
            ["openssl", "passwd", "-1", password], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()


@contextlib.asynccontextmanager
async def squid(
    directory: Path,
    *,
    connect_ports: Iterable[int],
    auth: tuple[str, str] | None = None,
) -> AsyncIterator[RunningProxy]:
    """A squid allowing CONNECT to `connect_ports` only, Basic auth from an htpasswd file.

    As root squid runs as its own user (`proxy`), which cannot reach pytest's
    private temporary directories: its files live in a world-writable directory of
    their own under the system temp directory, removed afterwards. (`directory` is
    unused; kept for the same call shape as `tinyproxy`.)
    """
    assert SQUID is not None
    work = Path(tempfile.mkdtemp(prefix="gateway-test-squid-"))
    work.chmod(0o777)
    host = loopback_address()
    port = free_port(host)
    lines = [
        f"http_port {host}:{port}",
        f"pid_filename {work}/squid.pid",
        f"cache_log stdio:{work}/cache.log",
        f"access_log stdio:{work}/access.log",
        "cache deny all",
        "cache_mem 8 MB",
        "shutdown_lifetime 1 seconds",
        "acl CONNECT method CONNECT",
        "acl allowed_ports port " + " ".join(str(p) for p in connect_ports),
        "http_access deny CONNECT !allowed_ports",
    ]
    if auth is not None:
        htpasswd = work / "htpasswd"
        htpasswd.write_text(f"{auth[0]}:{_md5_crypt(auth[1])}\n")
        htpasswd.chmod(0o644)
        lines += [
            f"auth_param basic program {NCSA_AUTH} {htpasswd}",
            "auth_param basic realm gateway-tests",
            "acl authed proxy_auth REQUIRED",
            "http_access allow authed",
        ]
    else:
        lines.append("http_access allow localhost")
    lines.append("http_access deny all")
    conf = work / "squid.conf"
    conf.write_text("\n".join(lines) + "\n")
    conf.chmod(0o644)
    proc = await trio.lowlevel.open_process(
        [SQUID, "-N", "-d", "1", "-f", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    log: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            ready = trio.Event()

            async def read_log() -> None:
                assert proc.stderr is not None
                buffer = b""
                while True:
                    data = await proc.stderr.receive_some(65536)
                    if not data:
                        break
                    buffer += data
                    *complete, buffer = buffer.split(b"\n")
                    for line in complete:
                        text = line.decode("utf-8", "replace")
                        log.append(text)
                        if "Accepting HTTP Socket connections" in text:
                            ready.set()
                ready.set()

            nursery.start_soon(read_log)
            with trio.fail_after(START_WAIT):
                await ready.wait()
            if not any("Accepting HTTP Socket connections" in s for s in log):
                raise RuntimeError("squid did not start:\n" + "\n".join(log[-20:]))
            # squid logs that line as it sets the listener up; connects may be refused
            # for a moment after it.
            with trio.fail_after(START_WAIT):
                while True:
                    try:
                        probe = await trio.open_tcp_stream(host, port)
                    except OSError:
                        await trio.sleep(0.05)
                        continue
                    await probe.aclose()
                    break
            try:
                yield RunningProxy(host, port, log)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        with trio.CancelScope(shield=True), trio.move_on_after(15):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
