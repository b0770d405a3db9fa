"""Child processes of the harness: start, read their JSON lines, measure, tear down.

Every child runs in a session of its own, so a Ctrl-C in the terminal reaches
the harness only and the teardown happens in a known order; stopping a child
signals its process group (the child and whatever it started), never anything
else.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import resource
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

STOP_TIMEOUT = 5.0
PR_SET_PDEATHSIG = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A scenario could not run (a child failed, a deadline passed)."""


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns the new limit.

    Thousands of idle devices mean thousands of sockets in every process of the chain.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def _child_setup() -> None:
    """In the child before exec: more file descriptors, and SIGTERM if the harness dies
    (PR_SET_PDEATHSIG), so nothing outlives a harness killed without a chance to clean up."""
    raise_fd_limit()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port for a server that must be told its port (stunnel, mosquitto, gateway).

    Picked below the kernel's ephemeral range: the port is released before the server binds
    it, and an ephemeral one could meanwhile become some outgoing connection's local port."""
    low = _ephemeral_low()
    if low > 12000:
        for _ in range(64):
            port = random.randrange(10000, low)
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user + system, all threads) and resident memory of one process."""

    cpu: float
    rss: int  # bytes

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.cpu - other.cpu, self.rss - other.rss)


def usage_of(pid: int) -> Usage:
    """Read /proc/<pid>/stat (utime, stime) and /proc/<pid>/status (VmRSS)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    # The command name may hold spaces: fields start after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    rss = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    return Usage(cpu, rss)


class Child:
    """One child process; output goes to a log file unless `json_lines` is set."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, *, json_lines: bool = False,
                 stdin: bool = False, env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:  # fmt: skip
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        self._buffer = b""
        self.process = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if json_lines else self._log,
            stderr=self._log,
            start_new_session=True,
            preexec_fn=_child_setup,
            env=env,
            cwd=cwd,
        )
        self._selector: selectors.BaseSelector | None = None
        if json_lines:
            assert self.process.stdout is not None
            os.set_blocking(self.process.stdout.fileno(), False)
            self._selector = selectors.DefaultSelector()
            self._selector.register(self.process.stdout, selectors.EVENT_READ)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def usage(self) -> Usage:
        try:
            return usage_of(self.pid)
        except (OSError, ValueError) as exc:
            raise BenchError(f"{self.name}: cannot read /proc/{self.pid}: {exc}") from exc

    def read_message(self, timeout: float) -> dict[str, Any]:
        """The next JSON line the child prints; BenchError on timeout or exit."""
        assert self._selector is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if sep:
                self._buffer = rest
                try:
                    message: dict[str, Any] = json.loads(line)
                except ValueError:
                    self._log.write(line + b"\n")  # stray output: keep it for the log
                    continue
                if message.get("event") == "error":
                    raise BenchError(f"{self.name}: {message.get('error')}")
                return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{self.name}: no answer within {timeout:.0f} s ({self.log_path})")
            if self._selector.select(min(remaining, 1.0)):
                chunk = self.process.stdout.read(65536)
                if chunk:
                    self._buffer += chunk
                    continue
                if chunk is not None:  # EOF
                    self.process.wait(STOP_TIMEOUT)
                    raise BenchError(self._exit_text())
            elif not self.alive():
                raise BenchError(self._exit_text())

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        message = self.read_message(timeout)
        if message.get("event") != event:
            raise BenchError(f"{self.name}: expected {event!r}, got {message!r}")
        return message

    def send_line(self, text: str) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(text.encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError as exc:
            raise BenchError(self._exit_text()) from exc

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.name}: still running after {timeout:.0f} s") from None

    def _exit_text(self) -> str:
        code = self.process.poll()
        self._log.flush()
        tail = self.log_tail()
        return f"{self.name} exited with {code}" + (f":\n{tail}" if tail else f" ({self.log_path})")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the child's process group, SIGKILL after STOP_TIMEOUT; idempotent."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(STOP_TIMEOUT)
        else:
            # The leader is gone; anything it started in its group goes too.
            self._signal(signal.SIGKILL)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        self._log.close()

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def wait_for_port(port: int, child: Child, timeout: float, host: str = "127.0.0.1") -> None:
    """Readiness: connect in a bounded retry loop until the child listens on `port`."""
    deadline = time.monotonic() + timeout
    while True:
        if not child.alive():
            raise BenchError(child._exit_text())
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"{child.name}: not listening on {port} after {timeout:.0f} s "
                                 f"({child.log_path})") from None  # fmt: skip
            time.sleep(0.02)  # readiness polling with a deadline


def emit(event: str, **fields: Any) -> None:
    """A child's side of the protocol: one JSON object per stdout line."""
    print(json.dumps({"event": event, **fields}), flush=True)
