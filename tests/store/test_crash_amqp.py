"""Crash safety of AMQP store-and-forward: the real daemon (`python -m gateway run`) is
killed with SIGKILL at seeded random points while it stores telemetry (hub down) and
while it replays it (hub back), and restarted on the same store file each time.

Devices are python-qpid-proton senders that count a message as delivered only when
proton saw it settled ``accepted``, and send it again (same message-id) otherwise.
At the end every accepted message-id is at hubsim at least once; duplicates are
counted and must stay under the bound the design gives: per kill and device, one
message being stored or relayed, plus one replay window.

Waits are on progress (accepted counts, hubsim's records, the listener accepting
connections), with generous fail-safe timeouts only; the seed is printed and can be
set with SF_CRASH_SEED.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from proton import Delivery, Message
from proton.utils import BlockingConnection

from gateway.hubsim import HubSim
from gateway.router.forwarder import WINDOW
from tests.waiting import wait_for_progress_sync

HUB_HOST = "myhub.azure-devices.net"
DEVICES = ("crash1", "crash2")
KILLS_STORING = 12
KILLS_FORWARDING = 12
PACING = 0.005  # seconds between one device's messages
FAILSAFE = 120.0  # seconds without any progress: a hang, not slowness
SEED = int(os.environ.get("SF_CRASH_SEED", "1919"))


def loopback(rng: random.Random) -> str:
    return f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Any, what: str, progress: Any = None) -> None:
    """Poll `predicate` (state of other threads and processes) until it holds; fails only
    when `progress()` (default: the predicate's own value) stops changing for a while."""
    wait_for_progress_sync(predicate, progress or predicate, stall=FAILSAFE, poll=0.01, what=what)


class Gateway:
    """The daemon as a child process; SIGKILLed and restarted on the same files."""

    def __init__(self, config: Path, host: str, port: int, log: Path) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "-c", str(self.config)],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.starts += 1
        wait_for(self._accepting, "the gateway's listener accepting connections")

    def _accepting(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the gateway exited with {self.proc.returncode}; see {self.log}")
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(FAILSAFE)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(FAILSAFE)


class DeviceThread(threading.Thread):
    """One device sending numbered telemetry; a message counts once proton saw it
    accepted; anything else (a lost connection, a refusal) and it is sent again."""

    def __init__(self, device: str, url: str) -> None:
        super().__init__(name=f"device-{device}", daemon=True)
        self.device = device
        self.url = url
        self.accepted: list[str] = []
        self.stopping = threading.Event()
        self.errors = Counter[str]()

    def run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            conn: BlockingConnection | None = None
            try:
                conn = BlockingConnection(self.url, allowed_mechs="ANONYMOUS",
                                          virtual_host=HUB_HOST, timeout=30)  # fmt: skip
                sender = conn.create_sender(f"amqps://{HUB_HOST}/devices/{self.device}/messages/events")
                while not self.stopping.is_set():
                    mid = f"{self.device}-{i}"
                    msg = Message(body=mid.encode() + b"." * 200, id=mid, properties={"n": i})
                    msg.inferred = True
                    d = sender.send(msg, error_states=[])
                    if d.remote_state == Delivery.ACCEPTED:
                        self.accepted.append(mid)
                        i += 1
                    else:
                        self.errors[f"outcome {d.remote_state}"] += 1
                    # Pacing, as a sensor sends: the hub emulator shares this process
                    # (and its GIL) and must keep up with two devices and the replay.
                    time.sleep(PACING)
            except Exception as exc:  # a killed gateway: connection lost, link detached, timeout
                self.errors[type(exc).__name__] += 1
                time.sleep(0.05)  # retry pacing while the gateway restarts
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass


@pytest.fixture
def rng() -> random.Random:
    print(f"SF_CRASH_SEED={SEED}")
    return random.Random(SEED)


@pytest.fixture
def hub(rng: random.Random) -> Iterator[HubSim]:
    sim = HubSim({d: _key(d) for d in DEVICES}, hub_host=HUB_HOST, mqtt_port=None, host=loopback(rng))
    with sim:
        yield sim
    sim.close()


def _key(device: str) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.sha256(f"crash-key-{device}".encode()).digest()).decode()


def write_config(tmp_path: Path, hub: HubSim, host: str, port: int) -> Path:
    secrets = tmp_path / "secrets.yaml"
    fd = os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{d}-key: {_key(d)}\n" for d in DEVICES))
    devices = "".join(f"    - {{id: {d}, key: {d}-key, trust: network, store_and_forward: true}}\n"
                      for d in DEVICES)  # fmt: skip
    path = tmp_path / "gateway.yaml"
    path.write_text(f"""
gateway: {{id: gw-crash}}
admin: {{enabled: false}}
log: {{level: info}}
tls_profiles:
  hub: {{ca_file: "{hub.ca_file}", server_name: {HUB_HOST}}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "{host}:{port}"}}
connectors:
  - name: iothub
    protocol: amqp
    host: {hub.host}
    port: {hub.amqp_port}
    tls_profile: hub
    connect_timeout: 5s
    reconnect: {{initial: 0.1s, max: 0.5s}}
link_routes:
  - {{prefix: "$cbs", connector: iothub}}
  - {{prefix: "devices/", connector: iothub}}
store_and_forward:
  path: {tmp_path / "store.db"}
  replay_rate: 2000
credentials:
  secrets_file: {secrets}
  devices:
{devices}""")
    return path


def test_sigkill_while_storing_and_forwarding(tmp_path: Path, hub: HubSim, rng: random.Random) -> None:
    host = loopback(rng)
    port = free_port(host)
    gw = Gateway(write_config(tmp_path, hub, host, port), host, port, tmp_path / "gateway.log")
    hub.stop()
    gw.start()
    devices = [DeviceThread(d, f"amqp://{host}:{port}") for d in DEVICES]
    for dev in devices:
        dev.start()

    def accepted() -> int:
        return sum(len(d.accepted) for d in devices)

    def at_hub() -> int:
        return len(hub.recorder.d2c)

    kills = 0
    try:
        # Storing: the hub is down, every acknowledgement is the store's.
        for _ in range(KILLS_STORING):
            target = accepted() + rng.randint(1, 12)
            wait_for(lambda t=target: accepted() >= t, "devices storing", accepted)  # type: ignore[misc]
            time.sleep(rng.random() * 0.02)  # a random point between two messages
            gw.kill()
            kills += 1
            gw.start()
        # Forwarding: build a backlog with the hub down, bring it back, kill mid-replay.
        for _ in range(KILLS_FORWARDING):
            hub.stop()
            target = accepted() + rng.randint(10, 30)
            wait_for(lambda t=target: accepted() >= t, "devices storing", accepted)  # type: ignore[misc]
            hub.start()
            target = at_hub() + rng.randint(1, 15)
            wait_for(lambda t=target: at_hub() >= t, "replay reaching the hub", at_hub)  # type: ignore[misc]
            gw.kill()
            kills += 1
            gw.start()
        for dev in devices:
            dev.stopping.set()
        for dev in devices:
            dev.join(FAILSAFE)
        # Every message a device saw accepted reaches the hub.
        sent = {mid for dev in devices for mid in dev.accepted}

        def all_arrived() -> bool:
            return sent <= {r.properties.get("message-id") for r in list(hub.recorder.d2c)}

        wait_for(all_arrived, "every accepted message at the hub", at_hub)
    finally:
        for dev in devices:
            dev.stopping.set()
        gw.stop()
    records = list(hub.recorder.d2c)
    seen = Counter(r.properties.get("message-id") for r in records)
    duplicates = sum(n - 1 for n in seen.values() if n > 1)
    bound = kills * len(DEVICES) * (WINDOW + 1)
    print(f"kills={kills} accepted={len(sent)} at_hub={len(records)} duplicates={duplicates} "
          f"bound={bound} device_errors={[dict(d.errors) for d in devices]}")  # fmt: skip
    assert kills >= 20
    assert not sent - set(seen)
    assert duplicates <= bound
    # Per device, the first arrival of each message keeps the device's order.
    for dev in devices:
        firsts: list[int] = []
        for r in records:
            mid = r.properties.get("message-id")
            if r.device_id == dev.device and mid in sent and int(mid.rsplit("-", 1)[1]) not in firsts:
                firsts.append(int(mid.rsplit("-", 1)[1]))
        assert firsts == sorted(firsts), f"{dev.device}: order broken"
