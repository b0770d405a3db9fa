"""Store-and-forward's bad input, from the outside: the real daemon, hubsim, paho and
proton devices. A corrupt or locked database and a device flooding the store each get
a clear log line and a metric; live relaying and the other devices carry on.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.hubsim import HubSim
from tests.store.test_outage_blackbox import (
    HUB,
    SEED,
    AmqpDevice,
    Device,
    Gateway,
    MqttDevice,
    at_hub,
    free_port,
    key_of,
    loopback,
    number,
    wait_for,
)

OPTED = ("mq-1", "am-1", "flood")


def config(tmp: Path, hub: HubSim, host: str, ports: dict[str, int], store: str = "") -> Path:
    secrets = tmp / "secrets.yaml"
    fd = os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{d}-key: {key_of(d)}\n" for d in OPTED))
    entries = "".join(f"    - {{id: {d}, key: {d}-key, trust: network, store_and_forward: true}}\n"
                      for d in OPTED)  # fmt: skip
    path = tmp / "gateway.yaml"
    path.write_text(f"""\
admin: {{listen: "{host}:{ports['admin']}"}}
tls_profiles:
  azure: {{ca_file: "{hub.ca_file}", server_name: {HUB}}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "{host}:{ports['amqp']}"}}
  - {{name: mqtt, protocol: mqtt, bind: "{host}:{ports['mqtt']}"}}
connectors:
  - {{name: iothub, protocol: amqp, host: {hub.host}, port: {hub.amqp_port}, tls_profile: azure,
     connect_timeout: 5s, reconnect: {{initial: 0.2s, max: 2s}}}}
  - {{name: iothub-mqtt, protocol: mqtt, host: {hub.host}, port: {hub.mqtt_port}, tls_profile: azure,
     connect_timeout: 5s}}
link_routes:
  - {{prefix: "$cbs", connector: iothub}}
  - {{prefix: "devices/", connector: iothub}}
mqtt_routes:
  - {{hub: "*", connector: iothub-mqtt}}
store_and_forward:
  path: store.db
{store}credentials:
  secrets_file: secrets.yaml
  devices:
{entries}""")
    return path


class Setup:
    def __init__(self, tmp: Path, store: str = "") -> None:
        rng = random.Random(SEED)
        self.hub = HubSim({d: key_of(d) for d in OPTED}, hub_host=HUB, host=loopback(rng))
        self.hub.start()
        self.host = loopback(rng)
        self.ports = {name: free_port(self.host) for name in ("amqp", "mqtt", "admin")}
        self.gateway = Gateway(config(tmp, self.hub, self.host, self.ports, store),
                               f"{self.host}:{self.ports['admin']}")  # fmt: skip
        self.hub_down = threading.Event()
        self.devices: list[Device] = []

    def device(self, cls: type[Device], name: str) -> Device:
        dev = cls(name, (self.host, self.ports["mqtt" if issubclass(cls, MqttDevice) else "amqp"]), self.hub_down)
        self.devices.append(dev)
        dev.start()
        return dev

    def close(self) -> None:
        for dev in self.devices:
            dev.stopping.set()
        for dev in self.devices:
            dev.join(60)
        if self.gateway.gw is not None and self.gateway.gw.proc.poll() is None:
            self.gateway.gw.stop()
        self.hub.close()

    def delivered(self, dev: Device) -> bool:
        with dev.lock:
            acked = set(dev.sent.acked)
        return acked <= {number(r) for r in at_hub(self.hub).get(dev.device, [])}

    def metric(self, name: str, **labels: str) -> float:
        return sum(v for (n, lbl), v in self.gateway.metrics().items() if n == name
                   and all(dict(lbl).get(k) == x for k, x in labels.items()))  # fmt: skip


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    yield s
    s.close()


def _live_relaying_carries_on(s: Setup) -> None:
    mq, am = s.device(MqttDevice, "mq-1"), s.device(AmqpDevice, "am-1")
    wait_for(lambda: mq.acked() >= 10 and am.acked() >= 10, "live traffic with the store out")
    wait_for(lambda: s.delivered(mq) and s.delivered(am), "live messages at the hub")
    # Without a store, the hub going away is refused as without the feature.
    s.hub_down.set()
    s.hub.stop()
    wait_for(lambda: mq.sent.refusals_hub_down > 0 and am.sent.refusals_hub_down > 0,
             "refusals while the hub is down")  # fmt: skip
    assert s.gateway.gw is not None and s.gateway.gw.proc.poll() is None


def test_corrupt_database_at_start(tmp_path: Path, setup: Setup) -> None:
    (tmp_path / "store.db").write_bytes(b"this is not an SQLite database\n" * 4096)
    setup.gateway.start()
    api = setup.gateway.api_store()
    assert api["state"] == "unavailable" and "corrupt" in api["reason"], api
    assert setup.metric("iotgw_store_up") == 0
    assert setup.metric("iotgw_store_errors_total", kind="corrupt") == 1
    _live_relaying_carries_on(setup)
    assert setup.gateway.gw is not None
    lines = [ln for ln in setup.gateway.gw.log().splitlines() if "corrupt" in ln]
    assert len(lines) == 1 and str(tmp_path / "store.db") in lines[0], lines


def test_database_locked_by_another_gateway_at_start(tmp_path: Path, setup: Setup) -> None:
    fd = os.open(tmp_path / "store.db.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        setup.gateway.start()
        api = setup.gateway.api_store()
        assert api["state"] == "unavailable" and "locked" in api["reason"], api
        assert setup.metric("iotgw_store_up") == 0
        assert setup.metric("iotgw_store_errors_total", kind="locked") == 1
        _live_relaying_carries_on(setup)
        assert setup.gateway.gw is not None
        lines = [ln for ln in setup.gateway.gw.log().splitlines() if "locked" in ln]
        assert len(lines) == 1, lines
    finally:
        os.close(fd)


def test_database_locked_while_storing(tmp_path: Path, setup: Setup) -> None:
    """Another process holds a write lock on the database while devices store: they get
    back-pressure, the gateway says why; when the lock goes, storing resumes and
    nothing acknowledged is lost."""
    setup.gateway.start()
    setup.hub_down.set()
    setup.hub.stop()
    mq, am = setup.device(MqttDevice, "mq-1"), setup.device(AmqpDevice, "am-1")
    wait_for(lambda: mq.acked() >= 5 and am.acked() >= 5, "storing")
    other = sqlite3.connect(tmp_path / "store.db", timeout=30, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        wait_for(lambda: setup.metric("iotgw_store_errors_total", kind="locked") > 0,
                 "the gateway counting the locked database")  # fmt: skip
        wait_for(lambda: mq.sent.refusals > 0 or am.sent.refusals > 0, "back-pressure")
    finally:
        other.execute("ROLLBACK")
        other.close()
    goal = (mq.acked() + 5, am.acked() + 5)
    wait_for(lambda: mq.acked() >= goal[0] and am.acked() >= goal[1], "storing again")
    setup.hub.start()
    setup.hub_down.clear()
    wait_for(lambda: setup.gateway.api_store()["messages"] == 0, "the backlog drained")
    for dev in (mq, am):
        dev.stopping.set()
        dev.join(60)
    wait_for(lambda: setup.delivered(mq) and setup.delivered(am), "every acknowledged message")
    assert setup.gateway.gw is not None
    assert any("locked" in ln for ln in setup.gateway.gw.log().splitlines())


class SameLinkAmqpDevice(AmqpDevice):
    same_link = True


def test_corruption_found_while_running(tmp_path: Path, setup: Setup) -> None:
    """Pages of a stored backlog damaged while the gateway was stopped: the store goes out
    of service when it reads them; devices that were held behind that backlog are relayed
    to the hub again (an AMQP device that keeps its link is detached from the local one)."""
    s = setup
    s.gateway.start()
    s.hub_down.set()
    s.hub.stop()
    mq, am = s.device(MqttDevice, "mq-1"), s.device(SameLinkAmqpDevice, "am-1")
    wait_for(lambda: mq.acked() >= 100 and am.acked() >= 100, "storing")
    assert s.gateway.gw is not None
    s.gateway.gw.stop()
    db = tmp_path / "store.db"
    with db.open("r+b") as f:  # scribble over pages in the middle of the messages
        f.seek(db.stat().st_size // 2)
        f.write(b"\xa5" * 3 * 4096)
    s.gateway.start()
    # Back on local sessions (still storing, or refused once the damage is read).
    before = (mq.acked(), am.acked())
    wait_for(lambda: (mq.acked() > before[0] or mq.sent.refusals > 0)
             and (am.acked() > before[1] or am.sent.refusals > 0), "local sessions again")  # fmt: skip
    s.hub.start()
    s.hub_down.clear()
    wait_for(lambda: s.metric("iotgw_store_errors_total", kind="corrupt") == 1, "corruption seen")
    goal = (mq.acked() + 20, am.acked() + 20)
    wait_for(lambda: mq.acked() >= goal[0] and am.acked() >= goal[1], "devices relayed to the hub")
    assert s.metric("iotgw_store_up") == 0
    api = s.gateway.api_store()
    assert api["state"] == "unavailable" and "corrupt" in api["reason"], api
    # What they send now reaches the hub.
    for dev in (mq, am):
        dev.stopping.set()
        dev.join(60)
    last = {d.device: max(d.sent.acked) for d in (mq, am)}
    wait_for(lambda: all(last[d] in {number(r) for r in at_hub(s.hub).get(d, [])} for d in last),
             "the latest messages at the hub")  # fmt: skip
    log = s.gateway.gw.log()
    assert "Traceback" not in log
    assert len([ln for ln in log.splitlines() if "corrupt" in ln and "out of service" in ln]) == 1


class Flooder(MqttDevice):
    """Sends 2 KiB messages as fast as its window allows."""

    sessions = 0

    def session(self) -> bool:
        self.sessions += 1
        return super().session()

    def payload(self, n: int) -> bytes:
        return f"{self.device}:{n}:".encode() + hashlib.sha256(str(n).encode()).digest() * 64

    def pace(self) -> float:
        return 0.0


def test_a_device_flooding_the_store(tmp_path: Path) -> None:
    s = Setup(tmp_path, store="  max_bytes: 1MiB\n  device_share: 0.1\n")
    try:
        s.gateway.start()
        s.hub_down.set()
        s.hub.stop()
        mq, am = s.device(MqttDevice, "mq-1"), s.device(AmqpDevice, "am-1")
        flood = s.device(Flooder, "flood")
        wait_for(lambda: s.metric("iotgw_store_refused_total", reason="device_share") > 0,
                 "the flooder reaching its share")  # fmt: skip
        goal = (mq.acked() + 20, am.acked() + 20)
        wait_for(lambda: mq.acked() >= goal[0] and am.acked() >= goal[1],
                 "the other devices still storing")  # fmt: skip
        api = s.gateway.api_store()
        assert api["devices"]["flood"]["bytes"] <= api["device_max_bytes"], api
        assert s.gateway.gw is not None
        gw = s.gateway.gw

        def share_lines() -> list[str]:
            return [ln for ln in gw.log().splitlines()
                    if "flood" in ln and "share" in ln and "WARNING" in ln]  # fmt: skip

        # MQTT: the gateway waits (back-pressure) before it gives up on the PUBLISH and
        # closes, with one line; the device reconnects and resends.
        wait_for(share_lines, "a log line naming the flooding device")
        lines = share_lines()
        refused = s.metric("iotgw_store_refused_total", reason="device_share")
        # One line per refused connection (an episode), not one per refused message.
        sessions = flood.sessions
        assert 1 <= len([ln for ln in lines if "store_full" in ln]) <= sessions, (lines, sessions)
        assert not any("mq-1" in ln or "am-1" in ln for ln in lines), lines
        s.hub.start()
        s.hub_down.clear()
        for dev in (mq, am, flood):
            dev.stopping.set()
            dev.join(60)
        wait_for(lambda: s.gateway.api_store()["messages"] == 0, "the backlog drained")
        wait_for(lambda: all(s.delivered(d) for d in (mq, am, flood)), "every acknowledged message")
        print(f"refused={refused} flood_acked={flood.acked()} sessions={flood.sessions} lines={lines}")
    finally:
        s.close()
