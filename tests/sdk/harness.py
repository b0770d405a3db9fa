"""The Azure device SDKs against the gateway: hubsim upstream, the daemon in between.

Each SDK runs in its own process (`DeviceProcess`): the Python SDK and uamqp in
the `.venv-sdk` virtual environment (the Python SDK pins paho-mqtt < 2, which
the project's own test extra cannot share), the Node.js SDK under `node` from
`tests/sdk/node`. A device script prints one JSON object per line for each
step it completes; the test waits on those lines (progress, never sleeps) and
asserts on what hubsim recorded.

The SDKs dial the fixed ports 5671 (AMQPS) and 8883 (MQTTS) of their gateway
host, so each stack binds them on its own random loopback address 127.a.b.c,
with a trustme certificate for that address that the SDK is told to trust.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from gateway.hubsim import HubSim
from tests.acceptance.gateway_proc import GatewayProcess, start_gateway, write_config

REPO_ROOT = Path(__file__).resolve().parents[2]
SDK_DIR = Path(__file__).resolve().parent
NODE_DIR = SDK_DIR / "node"
HUB_HOST = "sdkhub.azure-devices.net"
AMQPS_PORT = 5671
MQTTS_PORT = 8883
# Fail-safe bound for one step of a device script on a busy machine (never a budget).
STEP_TIMEOUT = 90.0


def sdk_python() -> Path | None:
    """The interpreter with azure-iot-device and uamqp (scripts/test.sh builds it)."""
    path = Path(os.environ.get("IOTGW_SDK_PYTHON") or REPO_ROOT / ".venv-sdk" / "bin" / "python")
    return path if path.exists() else None


def node_ready() -> bool:
    """node and the npm packages of tests/sdk/node (npm ci, scripts/test.sh) are there."""
    return shutil.which("node") is not None and (NODE_DIR / "node_modules" / "azure-iot-device").is_dir()


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def random_loopback() -> str:
    """A loopback address of its own (not 127.0.0.1), so fixed ports never clash."""
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


@dataclass
class SdkStack:
    hub: HubSim
    gateway: GatewayProcess
    address: str  # the gateway's device-side address: 127.a.b.c, ports 5671 and 8883
    ca_file: Path  # the CA of the gateway's device-side certificate
    keys: dict[str, str]  # identity ("dev" or "dev/mod") -> base64 key

    def connection_string(self, identity: str) -> str:
        device, _, module = identity.partition("/")
        parts = [f"HostName={HUB_HOST}", f"DeviceId={device}"]
        if module:
            parts.append(f"ModuleId={module}")
        parts += [f"SharedAccessKey={self.keys[identity]}", f"GatewayHostName={self.address}"]
        return ";".join(parts)

    def device_spec(self, identity: str, **extra: Any) -> dict[str, Any]:
        """What every device script takes: where to connect, whom to trust, who it is."""
        device, _, module = identity.partition("/")
        return {
            "hub_host": HUB_HOST,
            "gateway": self.address,
            "ca_file": str(self.ca_file),
            "device_id": device,
            "module_id": module or None,
            "key": self.keys[identity],
            "connection_string": self.connection_string(identity),
            **extra,
        }


def gateway_yaml(hub: HubSim, address: str, cert: Path, key: Path, amqp_listener_extra: str) -> str:
    return f"""\
gateway: {{id: sdk-gw, drain_timeout: 2s}}
admin: {{listen: "127.0.0.1:0"}}
log: {{level: info, format: text}}
tls_profiles:
  hub: {{ca_file: "{hub.ca_file}", server_name: {HUB_HOST}}}
  devices: {{cert_file: "{cert}", key_file: "{key}"}}
listeners:
  - {{name: amqps, protocol: amqp, bind: "{address}:{AMQPS_PORT}", tls_profile: devices{amqp_listener_extra}}}
  - {{name: mqtts, protocol: mqtt, bind: "{address}:{MQTTS_PORT}", tls_profile: devices}}
connectors:
  - {{name: iothub, protocol: amqp, host: 127.0.0.1, port: {hub.amqp_port}, tls_profile: hub,
      reconnect: {{initial: 0.2s, max: 2s}}}}
  - {{name: iothub-mqtt, protocol: mqtt, host: 127.0.0.1, port: {hub.mqtt_port}, tls_profile: hub}}
link_routes:
  - {{prefix: "$cbs", connector: iothub, direction: both}}
  - {{prefix: "devices/", connector: iothub, direction: both}}
mqtt_routes:
  - {{hub: "*", connector: iothub-mqtt}}
"""


def start_stack(tmp: Path, identities: list[str], *, amqp_listener_extra: str = "") -> Iterator[SdkStack]:
    """hubsim + the daemon on a fresh loopback address; yields once both are up.

    `amqp_listener_extra` is appended to the AMQP listener's flow mapping
    (e.g. ``", sasl: [anonymous, plain]"``)."""
    keys = {identity: new_key() for identity in identities}
    ca = trustme.CA(organization_name="iot-gateway SDK tests")
    ca_file = tmp / "device-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    hub = HubSim(keys, hub_host=HUB_HOST).start()
    gw: GatewayProcess | None = None
    try:
        # Another run may hold a given address's ports: a fresh address is the cure.
        for attempt in range(5):
            address = random_loopback()
            leaf = ca.issue_cert(address, "gateway.sdk.test")
            cert, key = tmp / f"gw-{attempt}.pem", tmp / f"gw-{attempt}.key"
            cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
            leaf.private_key_pem.write_to_path(str(key))
            config = write_config(
                tmp, gateway_yaml(hub, address, cert, key, amqp_listener_extra), f"gw-{attempt}.yaml"
            )
            try:
                gw = start_gateway(config, listeners=("amqps", "mqtts"), timeout=60)
                break
            except RuntimeError as exc:
                if "address already in use" not in str(exc).lower() or attempt == 4:
                    raise
        assert gw is not None
        yield SdkStack(hub, gw, address, ca_file, keys)
    finally:
        if gw is not None:
            gw.stop()
        hub.close()


@dataclass
class DeviceProcess:
    """One device script: JSON lines in (commands), JSON lines out (progress)."""

    proc: subprocess.Popen[str]
    name: str
    lines: queue.Queue[dict[str, Any] | None] = field(default_factory=queue.Queue)
    seen: list[dict[str, Any]] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, argv: list[str], spec: dict[str, Any], *, name: str, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> DeviceProcess:  # fmt: skip
        proc = subprocess.Popen(
            [*argv, json.dumps(spec)],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        device = cls(proc, name)
        threading.Thread(target=device._read_stdout, daemon=True).start()
        threading.Thread(target=device._read_stderr, daemon=True).start()
        return device

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue  # SDK chatter on stdout is not ours
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                continue
        self.lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_tail.append(line.rstrip())
            del self.stderr_tail[:-200]

    def expect(self, event: str | tuple[str, ...], timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        """The next line whose "event" is `event` (or one of them); a line with event
        "error", the script's exit or the fail-safe timeout fails the test with its output."""
        wanted = (event,) if isinstance(event, str) else event
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                item = self.lines.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                raise AssertionError(
                    f"{self.name}: no {event!r} within {timeout:.0f}s\n{self.transcript()}"
                ) from None
            if item is None:
                self.lines.put(None)
                self.proc.wait(timeout=30)
                raise AssertionError(
                    f"{self.name}: exited ({self.proc.returncode}) before {event!r}\n"
                    f"{self.transcript()}"
                )
            item.setdefault("t", round(time.monotonic() - self.started, 3))
            self.seen.append(item)
            if item.get("event") == "error":
                raise AssertionError(f"{self.name}: {item.get('error')}\n{self.transcript()}")
            if item.get("event") in wanted:
                return item

    def expect_any(self, events: tuple[str, ...], timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        """The next line whose event is one of `events`."""
        return self.expect(events, timeout)

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = STEP_TIMEOUT) -> None:
        """Wait for the script's "done" and a clean exit."""
        self.expect("done", timeout)
        code = self.proc.wait(timeout=timeout)
        assert code == 0, f"{self.name}: exit status {code}\n{self.transcript()}"

    @contextmanager
    def failing_with_transcript(self) -> Iterator[None]:
        """Hub-side waits inside this block fail with the script's output attached."""
        try:
            yield
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc}\n{self.name}:\n{self.transcript()}") from exc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def transcript(self) -> str:
        return "stdout lines: " + json.dumps(self.seen)[-4000:] + "\nstderr:\n" + "\n".join(
            self.stderr_tail[-60:]
        )


def start_node(node_dir: Path, stack: SdkStack, identity: str, **spec: Any) -> DeviceProcess:
    """The Node.js SDK device script (tests/sdk/node/device.js) for `identity`."""
    return DeviceProcess.start(
        ["node", str(node_dir / "device.js")],
        stack.device_spec(identity, **spec),
        name=f"node {spec.get('transport')} {identity}",
        cwd=node_dir,
    )


def wait_methods_ready(hub: HubSim, identity: str, protocol: str, timeout: float = STEP_TIMEOUT) -> None:
    """Until the hub can route a direct method to `identity`: its method links are
    attached (AMQP) or its method subscription is in (MQTT)."""
    rec = hub.recorder
    device, _, module = identity.partition("/")
    path = f"devices/{device}" + (f"/modules/{module}" if module else "")

    def ready() -> bool:
        if protocol == "amqp":
            roles = {
                link.role
                for link in rec.links
                if link.accepted and (link.address or "").endswith(f"{path}/methods/devicebound")
            }
            return roles == {"sender", "receiver"}
        return any(
            kind == "mqtt-subscribe" and what[0] == identity
            and any(f.startswith("$iothub/methods/POST") for f in what[1])
            for kind, what in rec.events
        )  # fmt: skip

    rec.wait_for(ready, timeout)


def wait_desired_watch(hub: HubSim, identity: str, protocol: str, timeout: float = STEP_TIMEOUT) -> None:
    """Until the hub will send `identity` its desired-property patches."""
    rec = hub.recorder

    def ready() -> bool:
        for kind, what in rec.events:
            if protocol == "amqp" and kind == "twin-request" and what[0] == identity \
                    and what[2] == "PUT" and what[3] == "/notifications/twin/properties/desired":
                return True
            if protocol == "mqtt" and kind == "mqtt-subscribe" and what[0] == identity \
                    and any(f.startswith("$iothub/twin/PATCH/properties/desired") for f in what[1]):
                return True
        return False  # fmt: skip

    rec.wait_for(ready, timeout)
