"""The daemon between independent peers: proton and paho devices, hubsim as the hub.

Two ways to run the gateway:

- in-process, `gateway.daemon.serve` in the test's nursery (`start_daemon`),
  for metrics and readiness, where the test also wants the daemon's state;
- as a process, ``python -m gateway run -c FILE`` (`GatewayProcess`), for
  signals, sd_notify and the frame trace, with bounded waits on its log lines.

The hub's recorder is the reference: counts read from /metrics are compared
with what hubsim saw, never with what the gateway says about itself.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import GatewayConfig, load_config
from gateway.daemon import Daemon, serve
from tests.e2e_amqp.gw_helpers import HUB_HOST
from tests.waiting import FAILSAFE

REPO_ROOT = Path(__file__).resolve().parents[2]
WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)

EVENTS = f"amqps://{HUB_HOST}/devices/%s/messages/events"
DEVICEBOUND = "/devices/%s/messages/devicebound"
MQTT_EVENTS = "devices/{}/messages/events/"


def gateway_yaml(
    hub: Any,
    *,
    admin: bool = True,
    routes: str | None = None,
    amqp_listener: str = "",
    connector: str = "",
    mqtt: bool = True,
    ca_file: str | None = None,
    server_name: str = HUB_HOST,
    extra: str = "",
    log: str = "{level: info}",
    gateway: str = "",
) -> str:
    """A configuration: AMQP (and MQTT) listeners on port 0 in front of `hub`."""
    routes = (
        routes
        or '  - {prefix: "$cbs", connector: iothub}\n  - {prefix: "devices/", connector: iothub}\n'
    )
    mqtt_listener = '  - {name: mqtt, protocol: mqtt, bind: "127.0.0.1:0"}\n' if mqtt else ""
    mqtt_connector = (
        f"  - {{name: iothub-mqtt, protocol: mqtt, host: 127.0.0.1, port: {hub.mqtt_port}, "
        "tls_profile: hub, connect_timeout: 5s}\n"
        if mqtt
        else ""
    )
    mqtt_routes = 'mqtt_routes:\n  - {hub: "*", connector: iothub-mqtt}\n' if mqtt else ""
    return f"""
gateway: {{id: gw-ops{gateway}}}
admin: {{listen: "127.0.0.1:0", enabled: {str(admin).lower()}}}
log: {log}
tls_profiles:
  hub: {{ca_file: "{ca_file or hub.ca_file}", server_name: {server_name}}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "127.0.0.1:0"{amqp_listener}}}
{mqtt_listener}connectors:
  - name: iothub
    protocol: amqp
    host: 127.0.0.1
    port: {hub.amqp_port}
    tls_profile: hub
    connect_timeout: 5s
    reconnect: {{initial: 0.2s, max: 0.5s}}
{connector}
{mqtt_connector}link_routes:
{routes}{mqtt_routes}{extra}"""


def write_config(path: Path, text: str) -> GatewayConfig:
    path.write_text(text, encoding="utf-8")
    return load_config(path)


async def start_daemon(nursery: trio.Nursery, config: GatewayConfig,
                       trace: tuple[str, ...] = ()) -> Daemon:  # fmt: skip
    """`gateway.daemon.serve` in `nursery`; returns the running Daemon."""
    daemon: Daemon = await nursery.start(serve, config, trace)
    return daemon


def port_of(daemon: Daemon, listener: str) -> int:
    return daemon.listener_addresses[listener][0][1]


def admin_url(daemon: Daemon) -> str:
    return f"http://127.0.0.1:{daemon.admin_addresses[0][1]}"


# -- HTTP -------------------------------------------------------------------------------


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


Samples = list[tuple[str, dict[str, str], float]]


def parse_metrics(text: str) -> Samples:
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


async def scrape(url: str) -> Samples:
    status, body = await trio.to_thread.run_sync(http_get, url + "/metrics")
    assert status == 200, body
    return parse_metrics(body)


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


async def wait_http(url: str, expected: int, timeout: float = WAIT) -> str:
    """Poll `url` until it answers `expected` (bounded); returns the body."""
    with trio.fail_after(timeout):
        while True:
            status, body = await trio.to_thread.run_sync(http_get, url)
            if status == expected:
                return body
            await trio.sleep(0.05)


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll a cheap condition on state this process owns, bounded by `timeout`."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


# -- the daemon as a process --------------------------------------------------------------


class GatewayProcess:
    """``python -m gateway run -c FILE`` with its output collected line by line."""

    def __init__(self, config_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        full_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update(env or {})
        self.config_path = config_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config_path), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
        )  # fmt: skip
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ports: dict[str, int] = {}
        self.admin_port: int | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.lines.append("")  # EOF marker
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = WAIT, start: int = 0) -> re.Match[str]:
        """The first output line from index `start` on matching `pattern` (blocks, bounded)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self.lines):
                    line = self.lines[index]
                    if line == "" and index == len(self.lines) - 1:
                        raise AssertionError(f"gateway exited before {pattern!r}:\n{self.output}")
                    index += 1
                    m = regex.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r} in time:\n{self.output}")
                self._cond.wait(left)

    async def await_line(
        self, pattern: str, timeout: float = WAIT, start: int = 0
    ) -> re.Match[str]:
        return await trio.to_thread.run_sync(self.wait_line, pattern, timeout, start)

    def mark(self) -> int:
        """An index into the output: wait_line(..., start=mark) sees only later lines."""
        with self._cond:
            return len(self.lines)

    async def started(self) -> GatewayProcess:
        """Wait for the start-up to finish; read the bound ports from the log lines."""
        await self.await_line(r"gateway \S+ started")
        output = self.output
        for m in re.finditer(r"listener ([\w-]+): \w+ on 127\.0\.0\.1:(\d+)", output):
            self.ports[m.group(1)] = int(m.group(2))
        m = re.search(r"admin endpoint listening on 127\.0\.0\.1:(\d+)", output)
        if m:
            self.admin_port = int(m.group(1))
        return self

    @property
    def admin_url(self) -> str:
        assert self.admin_port is not None
        return f"http://127.0.0.1:{self.admin_port}"

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = WAIT) -> int:
        return await trio.to_thread.run_sync(lambda: self.proc.wait(timeout=timeout))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
