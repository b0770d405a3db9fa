"""The gateway under demonstration, run as its own process: ``python -m gateway run -c FILE``."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

STOP_TIMEOUT = 5.0  # the daemon promises to exit within 5 s of SIGTERM
PROBE_INTERVAL = 0.05
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class Readiness:
    open_ports: frozenset[int]  # listener ports accepting connections
    seconds: float
    exited: int | None = None  # the gateway's exit status if it ended before it was ready

    def is_open(self, port: int) -> bool:
        return port in self.open_ports


class GatewayProcess:
    """Starts the gateway, copies its output to a log file (and optionally a terminal),
    waits for its listeners, and stops it with SIGTERM (SIGKILL as a last resort)."""

    def __init__(
        self,
        config_file: Path,
        log_file: Path,
        *,
        echo: Callable[[str], None] | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.config_file = config_file
        self.log_file = log_file
        template = command or [sys.executable, "-m", "gateway", "run", "-c", "{config}"]
        self.command = [part.replace("{config}", str(config_file)) for part in template]
        self._echo = echo
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.stop_status: int | None = None
        self.stop_seconds: float | None = None
        self.killed = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self._reader = threading.Thread(target=self._copy_output, name="gateway-log", daemon=True)
        self._reader.start()

    def _copy_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with open(self.log_file, "w", encoding="utf-8") as log:
            for raw in self._proc.stdout:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                self._tail.append(line)
                if self._echo is not None:
                    self._echo(line)

    def poll(self) -> int | None:
        """The exit status if the process has ended, else None."""
        return self._proc.poll() if self._proc else None

    def wait(self) -> int:
        """Block until the gateway exits (Ctrl-C interrupts); its exit status."""
        assert self._proc is not None
        return self._proc.wait()

    def wait_ready(self, ports: Sequence[int], timeout: float, grace: float) -> Readiness:
        """Wait until every port accepts a TCP connection, bounded in time.

        Once the first port is open the others get ``grace`` seconds more: a daemon
        that serves only some listeners is reported as such, not waited on.
        """
        started = time.monotonic()
        deadline = started + timeout
        open_ports: set[int] = set()
        while True:
            status = self.poll()
            if status is not None:
                return Readiness(frozenset(open_ports), time.monotonic() - started, status)
            for port in ports:
                if port not in open_ports and _accepts(port):
                    if not open_ports:
                        deadline = min(deadline, time.monotonic() + grace)
                    open_ports.add(port)
            now = time.monotonic()
            if len(open_ports) == len(ports) or now >= deadline:
                return Readiness(frozenset(open_ports), now - started)
            time.sleep(PROBE_INTERVAL)  # readiness polling against a deadline

    def stop(self) -> None:
        """SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
                self.stop_seconds = time.monotonic() - started
            except subprocess.TimeoutExpired:
                self.killed = True
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        self.stop_status = proc.returncode
        if self._reader is not None:
            self._reader.join(STOP_TIMEOUT)

    def tail(self, lines: int = 15) -> list[str]:
        """The gateway's last output lines (secrets never reach its log)."""
        return list(self._tail)[-lines:]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
