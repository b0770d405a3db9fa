"""Run `python -m gateway run -c FILE` as a subprocess and talk to its admin endpoint.

Only documented interfaces are used: the CLI, the YAML shape, the startup log lines that
name the bound addresses, and the admin HTTP endpoint (/metrics, /healthz, /readyz, /api).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.waiting import FAILSAFE

REPO_ROOT = Path(__file__).resolve().parents[2]

# "listener amqp: amqp on 127.0.0.1:43221 (plaintext)"; "admin endpoint listening on 127.0.0.1:9"
_LISTENER_LINE = re.compile(r"listener ([\w.-]+)\W.*?\b(?:on|to) (?:\[?[0-9a-fA-F.:]+\]?):(\d+)")
_ADMIN_LINE = re.compile(r"admin\b.*?listening on (?:\[?[0-9a-fA-F.:]+\]?):(\d+)")
_STARTED_LINE = re.compile(r"gateway \S+ started")


def gateway_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


def run_cli(
    *args: str, timeout: float = FAILSAFE, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_command(*args),
        cwd=cwd or REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


def _env() -> dict[str, str]:
    # ACCEPTANCE_GATEWAY_SOURCE runs the suite against another checkout of the product.
    env = dict(os.environ)
    source = env.get("ACCEPTANCE_GATEWAY_SOURCE") or str(REPO_ROOT)
    env["PYTHONPATH"] = source + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOTIFY_SOCKET", None)
    return env


@dataclass
class MetricSample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path
    listener_ports: dict[str, int] = field(default_factory=dict)
    admin_port: int | None = None

    @property
    def admin_url(self) -> str:
        assert self.admin_port is not None, "admin endpoint not enabled"
        return f"http://127.0.0.1:{self.admin_port}"

    def port(self, listener: str) -> int:
        return self.listener_ports[listener]

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def http_get(self, path: str, timeout: float = FAILSAFE) -> tuple[int, str, dict[str, str]]:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as resp:
                return resp.status, resp.read().decode(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), dict(exc.headers)

    def metrics(self) -> list[MetricSample]:
        status, body, _ = self.http_get("/metrics")
        assert status == 200, body
        out = []
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                out.append(MetricSample(sample.name, dict(sample.labels), float(sample.value)))
        return out

    def metric_sum(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels`."""
        return sum(
            s.value for s in self.metrics() if s.name == name and _labels_match(s.labels, labels)
        )

    def wait_metric(
        self, name: str, predicate: Callable[[float], bool], timeout: float = FAILSAFE, **labels: str
    ) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.metric_sum(name, **labels)
            if predicate(value):
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"metric {name}{labels} = {value}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = FAILSAFE) -> int:
        """SIGTERM, wait; returns the exit status (kills it if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
                raise
        return self.proc.returncode


class Contains(str):
    """A label value matched as a substring: label formats (e.g. a route's) are not a contract."""


Snapshot = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _labels_match(labels: dict[str, str], wanted: dict[str, str]) -> bool:
    for key, value in wanted.items():
        got = labels.get(key)
        if got is None:
            return False
        if isinstance(value, Contains) and value not in got:
            return False
        if not isinstance(value, Contains) and got != value:
            return False
    return True


def snapshot(gw: GatewayProcess) -> Snapshot:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in gw.metrics()}


def metric_total(snap: Snapshot, name: str, **labels: str) -> float:
    return sum(
        v for (n, lbls), v in snap.items() if n == name and _labels_match(dict(lbls), labels)
    )


def metric_delta(after: Snapshot, before: Snapshot, name: str, **labels: str) -> float:
    return metric_total(after, name, **labels) - metric_total(before, name, **labels)


def settled_delta(
    gw: GatewayProcess, before: Snapshot, name: str, expected: float, **labels: str
) -> float:
    """The metric's change since `before`, once it reaches `expected` (or after 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        got = metric_delta(snapshot(gw), before, name, **labels)
        if got == expected or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def write_config(directory: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def start_gateway(
    config_path: Path,
    *,
    listeners: tuple[str, ...],
    admin: bool = True,
    extra_args: tuple[str, ...] = (),
    timeout: float = FAILSAFE,
) -> GatewayProcess:
    """Start the daemon and wait until every named listener (and the admin endpoint) is bound."""
    log_path = config_path.with_suffix(".log")
    log_file = open(log_path, "wb")  # the child owns it from here
    proc = subprocess.Popen(
        gateway_command("run", "-c", str(config_path), *extra_args),
        cwd=config_path.parent,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    log_file.close()
    gw = GatewayProcess(proc=proc, log_path=log_path, config_path=config_path)
    deadline = time.monotonic() + timeout
    while True:
        text = gw.log()
        for match in _LISTENER_LINE.finditer(text):
            gw.listener_ports[match.group(1)] = int(match.group(2))
        admin_match = _ADMIN_LINE.search(text)
        if admin_match:
            gw.admin_port = int(admin_match.group(1))
        ready = all(name in gw.listener_ports for name in listeners) and (
            gw.admin_port is not None or not admin
        )
        if ready and _STARTED_LINE.search(text):
            return gw
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{text}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"gateway did not start in {timeout}s:\n{text}")
        time.sleep(0.05)


def wait_until(predicate: Callable[[], Any], timeout: float = FAILSAFE, what: str = "") -> Any:
    """Poll a condition that has no event to wait on (another process's state)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)
