"""Store-and-forward from the outside: a hub outage as an operator would live through it.

The real daemon (`python -m gateway run -c FILE`) with a configuration written from the
README and docs/store-and-forward.md: an AMQP and an MQTT listener, TLS connectors to
hubsim, `credentials:` with a secrets file (0600), most devices opted in, one of each
protocol not. Devices are peers we did not write: paho-mqtt (QoS 1) and
python-qpid-proton (unsettled, a message counts once proton saw it `accepted`), each
numbering its messages, sending throughout, and reconnecting with backoff on any drop.

1. hub up, traffic flows;
2. hub down: opted-in devices are acknowledged by the store, the others refused;
3. gateway SIGKILLed while storing, restarted, more storage;
4. hub back; gateway SIGKILLed while replaying, restarted;
5. the backlog drains (`/api/store`), every device delivers.

Then, at hubsim: every acknowledged message arrived at least once, first arrivals keep
each device's order, duplicates are counted and bounded, bytes and properties are the
device's; `/metrics`, `/api/store` and `iot-gateway status` agree with what happened.
Waits are on progress with generous fail-safe timeouts; the seed is printed
(SF_OUTAGE_SEED sets it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import signal
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families
from proton import Delivery, Message
from proton.utils import BlockingConnection

from gateway.hubsim import HubSim
from tests.acceptance.gateway_proc import GatewayProcess, run_cli, start_gateway

HUB = "myhub.azure-devices.net"
SEED = int(os.environ.get("SF_OUTAGE_SEED", str(random.randrange(1 << 30))))
FAILSAFE = 180.0  # seconds: a wait this long is a failure, not a slow machine
PACING = 0.1  # seconds between one device's messages: a sensor, slower than replay_rate
MQTT_IN_FLIGHT = 4
STORE_WINDOW = 16  # both forwarders' replay window (docs/store-and-forward.md)
# Acknowledgements per opted-in device in each storing phase (raise it for a longer outage).
PER_PHASE = int(os.environ.get("SF_OUTAGE_PER_PHASE", "40"))

MQTT_OPTED = ("mq-1", "mq-2")
AMQP_OPTED = ("am-1", "am-2")
MQTT_PLAIN = "mq-plain"  # credentials held, no store_and_forward
AMQP_PLAIN = "am-plain"


def key_of(device: str) -> str:
    return base64.b64encode(hashlib.sha256(f"outage-{device}".encode()).digest()).decode()


def loopback(rng: random.Random) -> str:
    return f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}"


def free_port(host: str) -> int:
    # A fixed port for the whole test: devices reconnect to the same address after
    # each restart, as they would to a real gateway.
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = FAILSAFE) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress: {what}")
        time.sleep(0.02)


@dataclass
class Sent:
    """What a device sent and saw acknowledged; `expect` is what the hub must see."""

    expect: dict[int, Any] = field(default_factory=dict)
    acked: list[int] = field(default_factory=list)
    refusals: int = 0  # CONNACK != 0, refused attaches, released outcomes
    refusals_hub_down: int = 0
    errors: Counter[str] = field(default_factory=Counter)


class Device(threading.Thread):
    """A device that numbers its messages, sends throughout, reconnects with backoff."""

    def __init__(self, name: str, target: tuple[str, int], hub_down: threading.Event) -> None:
        super().__init__(name=f"device-{name}", daemon=True)
        self.device = name
        self.target = target
        self.hub_down = hub_down
        self.sent = Sent()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.rng = random.Random(f"{SEED}-{name}")
        self.delay = 0.05

    def acked(self) -> int:
        with self.lock:
            return len(self.sent.acked)

    def refused(self, what: str) -> None:
        with self.lock:
            self.sent.refusals += 1
            if self.hub_down.is_set():
                self.sent.refusals_hub_down += 1
            self.sent.errors[what] += 1

    def pace(self) -> float:
        return PACING

    def backoff(self) -> None:
        # Exponential with jitter, as the SDKs do; reset after a good session.
        self.stopping.wait(self.delay * (0.5 + self.rng.random()))
        self.delay = min(self.delay * 2, 1.0)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.session():
                    self.delay = 0.05
            except Exception as exc:  # any drop: the gateway killed or restarting
                with self.lock:
                    self.sent.errors[type(exc).__name__] += 1
            if not self.stopping.is_set():
                self.backoff()

    def session(self) -> bool:
        raise NotImplementedError


class MqttDevice(Device):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.next = 0
        self.unacked: dict[int, None] = {}  # in send order; sent again after a reconnect

    def topic(self, n: int) -> str:
        return f"devices/{self.device}/messages/events/n={n}&%24.ct=application%2Foctet-stream"

    def payload(self, n: int) -> bytes:
        return f"{self.device}:{n}:".encode() + bytes(range(256))[n % 256 :] + b"\x00\xff"

    def session(self) -> bool:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.device,
                             reconnect_on_failure=False)  # fmt: skip
        client.username_pw_set(f"{HUB}/{self.device}/?api-version=2021-04-12")
        client.max_inflight_messages_set(MQTT_IN_FLIGHT)
        mids: dict[int, int] = {}
        early: set[int] = set()
        cond = threading.Condition()
        state = {"connected": False, "gone": False}

        def on_connect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
            with cond:
                if reason == 0:
                    state["connected"] = True
                else:
                    self.refused(f"CONNACK {reason}")
                    state["gone"] = True
                cond.notify_all()

        def on_publish(c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
            with cond:
                n = mids.pop(mid, None)
                if n is None:
                    early.add(mid)  # acknowledged before publish() returned its mid
                else:
                    self.acked_one(n)
                cond.notify_all()

        def on_disconnect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
            with cond:
                state["gone"] = True
                cond.notify_all()

        client.on_connect, client.on_publish, client.on_disconnect = on_connect, on_publish, on_disconnect
        client.connect(*self.target, keepalive=30)
        client.loop_start()
        try:
            with cond:
                cond.wait_for(lambda: state["connected"] or state["gone"] or self.stopping.is_set(), 30)
                if not state["connected"] or state["gone"]:
                    return False
                again = list(self.unacked)
            for n in again:
                self.publish(client, mids, early, cond, n)
            last = 0.0
            while not self.stopping.is_set():
                with cond:
                    cond.wait_for(lambda: state["gone"] or self.stopping.is_set()
                                  or len(mids) < MQTT_IN_FLIGHT, 5)  # fmt: skip
                    if state["gone"] or self.stopping.is_set():
                        return True
                    if len(mids) >= MQTT_IN_FLIGHT:
                        continue
                    n = self.next
                    self.next += 1
                    self.unacked[n] = None
                pause = self.pace() - (time.monotonic() - last)
                if pause > 0:
                    self.stopping.wait(pause)  # the sensor's own rate
                last = time.monotonic()
                self.publish(client, mids, early, cond, n)
            return True
        finally:
            client.loop_stop()
            sock = client.socket()
            if sock is not None:
                sock.close()

    def acked_one(self, n: int) -> None:
        with self.lock:
            self.sent.acked.append(n)
        self.unacked.pop(n, None)

    def publish(self, client: paho.Client, mids: dict[int, int], early: set[int],
                cond: threading.Condition, n: int) -> None:  # fmt: skip
        topic, payload = self.topic(n), self.payload(n)
        with self.lock:
            self.sent.expect[n] = (topic, payload)
        # Not under `cond`: paho calls on_publish (which takes it) under its own lock.
        info = client.publish(topic, payload, qos=1)
        with cond:
            if info.mid in early:
                early.discard(info.mid)
                self.acked_one(n)
            else:
                mids[info.mid] = n
            cond.notify_all()


class AmqpDevice(Device):
    # True: after a refusal, send again on the same link (as an SDK may) instead of
    # reconnecting: only the gateway detaching the link moves the device on.
    same_link = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.next = 0

    def message(self, n: int) -> Message:
        msg = Message(body=f"{self.device}:{n}:".encode() + bytes(range(n % 200, 256)),
                      id=f"{self.device}-{n}", content_type="application/octet-stream",
                      properties={"n": n, "device": self.device})  # fmt: skip
        msg.inferred = True
        return msg

    def session(self) -> bool:
        conn = BlockingConnection(f"amqp://{self.target[0]}:{self.target[1]}",
                                  allowed_mechs="ANONYMOUS", virtual_host=HUB, timeout=30)  # fmt: skip
        try:
            try:
                sender = conn.create_sender(f"amqps://{HUB}/devices/{self.device}/messages/events")
            except Exception:
                self.refused("attach")
                raise
            good = False
            while not self.stopping.is_set():
                n = self.next
                msg = self.message(n)
                with self.lock:
                    self.sent.expect[n] = msg.encode()
                d = sender.send(msg, error_states=[])
                if d.remote_state == Delivery.ACCEPTED:
                    with self.lock:
                        self.sent.acked.append(n)
                    self.next += 1
                    good = True
                else:  # released (a full or broken store), or anything else: send it again
                    self.refused(f"outcome {d.remote_state}")
                    if not self.same_link:
                        return good
                self.stopping.wait(PACING)
            return good
        finally:
            try:
                conn.close()
            except Exception:
                pass


def write_config(tmp: Path, hub: HubSim, host: str, ports: dict[str, int]) -> Path:
    secrets = tmp / "secrets.yaml"
    fd = os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    everyone = (*MQTT_OPTED, *AMQP_OPTED, MQTT_PLAIN, AMQP_PLAIN)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{d}-key: {key_of(d)}\n" for d in everyone))
    entries = "".join(
        f"    - {{id: {d}, key: {d}-key, trust: network"
        f"{', store_and_forward: true' if d not in (MQTT_PLAIN, AMQP_PLAIN) else ''}}}\n"
        for d in everyone
    )
    path = tmp / "gateway.yaml"
    path.write_text(f"""\
gateway: {{id: edge-gw-outage}}
admin:
  listen: "{host}:{ports['admin']}"
log: {{level: info}}
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
  path: state/store.db
  max_bytes: 16MiB
  max_age: 1d
credentials:
  secrets_file: secrets.yaml
  devices:
{entries}""")
    return path


class Gateway:
    def __init__(self, config: Path, admin: str) -> None:
        self.config = config
        self.admin = admin
        self.runs = 0
        self.gw: GatewayProcess | None = None

    def start(self) -> GatewayProcess:
        self.runs += 1
        # One config (and so one log) per run; same directory, so the same store file.
        run = self.config.with_name(f"run{self.runs}.yaml")
        run.write_text(self.config.read_text())
        self.gw = start_gateway(run, listeners=("amqp", "mqtt"), timeout=60)
        return self.gw

    def kill(self) -> None:
        assert self.gw is not None
        self.gw.proc.send_signal(signal.SIGKILL)
        self.gw.proc.wait(FAILSAFE)

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=10) as resp:
            return str(resp.read().decode())

    def api_store(self) -> dict[str, Any]:
        return dict(json.loads(self.get("/api/store")))

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(self.get("/metrics"))
                for s in family.samples}  # fmt: skip


def at_hub(hub: HubSim) -> dict[str, list[Any]]:
    """Per device, what hubsim recorded, in arrival order."""
    out: dict[str, list[Any]] = {}
    for r in list(hub.recorder.d2c):
        out.setdefault(r.device_id, []).append(r)
    return out


def number(record: Any) -> int:
    return int(record.body.split(b":", 2)[1])


@pytest.mark.slow
def test_hub_outage_with_kills_while_storing_and_replaying(tmp_path: Path) -> None:
    print(f"SF_OUTAGE_SEED={SEED}")
    rng = random.Random(SEED)
    everyone = (*MQTT_OPTED, *AMQP_OPTED, MQTT_PLAIN, AMQP_PLAIN)
    hub = HubSim({d: key_of(d) for d in everyone}, hub_host=HUB, host=loopback(rng))
    hub.start()
    host = loopback(rng)
    ports = {name: free_port(host) for name in ("amqp", "mqtt", "admin")}
    gateway = Gateway(write_config(tmp_path, hub, host, ports), f"{host}:{ports['admin']}")
    hub_down = threading.Event()
    devices: list[Device] = [MqttDevice(d, (host, ports["mqtt"]), hub_down) for d in (*MQTT_OPTED, MQTT_PLAIN)]
    devices += [AmqpDevice(d, (host, ports["amqp"]), hub_down) for d in (*AMQP_OPTED, AMQP_PLAIN)]
    opted = [d for d in devices if d.device not in (MQTT_PLAIN, AMQP_PLAIN)]
    plain = [d for d in devices if d.device in (MQTT_PLAIN, AMQP_PLAIN)]
    kills = hub_stops = 0
    notes: dict[str, Any] = {}

    def delivered(dev: Device) -> bool:
        with dev.lock:
            acked = set(dev.sent.acked)
        return acked <= {number(r) for r in at_hub(hub).get(dev.device, [])}

    def each_acked(more: int, among: list[Device]) -> Callable[[], bool]:
        goal = {d.device: d.acked() + more for d in among}
        return lambda: all(d.acked() >= goal[d.device] for d in among)

    try:
        gateway.start()
        for dev in devices:
            dev.start()
        # 1. The hub is up: traffic flows through.
        wait_for(each_acked(10, devices), "traffic through the gateway")
        wait_for(lambda: all(delivered(d) for d in devices), "live messages at the hub")
        assert gateway.api_store()["messages"] == 0

        # 2. The hub goes away; opted-in devices store, the others are refused.
        hub_down.set()
        hub.stop()
        hub_stops += 1
        acked_before_outage = {d.device: d.acked() for d in opted}
        wait_for(each_acked(PER_PHASE, opted), "opted-in devices acknowledged while the hub is down")
        wait_for(lambda: all(d.sent.refusals_hub_down > 0 for d in plain), "refusals for the others")
        stored_first_run = sum(d.acked() - acked_before_outage[d.device] for d in opted)

        # 3. SIGKILL while storing; the restarted gateway keeps storing behind the backlog.
        gateway.kill()
        kills += 1
        gateway.start()
        first = gateway.api_store()
        assert first["state"] == "ok", first
        # With the hub down nothing leaves the store: what is there less what this run
        # appended is what the killed run left, whichever moment it is read.
        appended = sum(c["appended"] for c in first["connectors"].values())
        inherited = first["messages"] - appended
        assert inherited >= stored_first_run, (first, stored_first_run)
        wait_for(each_acked(PER_PHASE, opted), "storing after the restart")
        second = gateway.api_store()
        appended = sum(c["appended"] for c in second["connectors"].values())
        assert second["messages"] - appended == inherited, (first, second)
        assert sum(c["replayed"] for c in second["connectors"].values()) == 0
        assert {c for c in second["connectors"] if second["connectors"][c]["messages"]} == {
            "iothub", "iothub-mqtt"}  # fmt: skip
        notes["backlog_before_replay"] = second["messages"]

        # 4. The hub is back; SIGKILL in the middle of the replay.
        arrived = len(hub.recorder.d2c)
        hub.start()
        hub_down.clear()
        wait_for(lambda: len(hub.recorder.d2c) >= arrived + 30, "replay reaching the hub")
        mid_replay = gateway.api_store()
        gateway.kill()
        kills += 1
        notes["backlog_at_kill"] = mid_replay["messages"]
        assert mid_replay["messages"] > 0, "the replay finished before the kill: nothing was tested"

        # 5. Restarted: the backlog drains, every device delivers.
        gw = gateway.start()
        early = gateway.api_store()
        wait_for(lambda: gateway.api_store()["messages"] == 0, "the backlog drained")
        wait_for(each_acked(10, devices), "every device sending through the hub again")
        for dev in devices:
            dev.stopping.set()
        for dev in devices:
            dev.join(60)
            assert not dev.is_alive(), dev.device
        wait_for(lambda: all(delivered(d) for d in devices), "every acknowledged message at the hub")
        wait_for(lambda: gateway.api_store()["messages"] == 0, "the backlog still empty")
        final = gateway.api_store()
        metrics = gateway.metrics()
        status = run_cli("status", "-c", str(gw.config_path), "--store")
    finally:
        for dev in devices:
            dev.stopping.set()
        if gateway.gw is not None and gateway.gw.proc.poll() is None:
            gateway.gw.stop()
        hub.close()

    records = at_hub(hub)
    duplicates: dict[str, int] = {}
    for dev in devices:
        got = records.get(dev.device, [])
        numbers = [number(r) for r in got]
        acked = set(dev.sent.acked)
        # Every acknowledged message arrived; first arrivals keep the sending order.
        assert acked <= set(numbers), (dev.device, sorted(acked - set(numbers))[:10])
        firsts = list(dict.fromkeys(numbers))
        assert firsts == sorted(firsts), f"{dev.device}: first arrivals out of order"
        duplicates[dev.device] = len(numbers) - len(firsts)
        # The hub got the device's bytes and properties.
        for r in got:
            n = number(r)
            if isinstance(dev, MqttDevice):
                assert (r.topic, r.body) == dev.sent.expect[n], (dev.device, n)
                assert r.properties.get("n") == str(n)
                assert r.properties.get("$.ct") == "application/octet-stream"
            else:
                assert r.raw == dev.sent.expect[n], (dev.device, n)
                assert r.message_format in (0, None)
                assert r.properties.get("message-id") == f"{dev.device}-{n}"
    # Duplicates are bounded: per kill or hub loss, a replay window per device plus
    # what each device had in flight.
    events = kills + hub_stops
    for dev in devices:
        bound = events * (STORE_WINDOW + MQTT_IN_FLIGHT)
        assert duplicates[dev.device] <= bound, (dev.device, duplicates[dev.device], bound)
    # The device without the opt-in was refused while the hub was down.
    for dev in plain:
        assert dev.sent.refusals_hub_down > 0, dev.device

    # /api/store and /metrics: this run started with a backlog, replayed it (and what
    # devices stored behind it), and ends empty with nothing refused or lost.
    assert final["state"] == "ok"
    assert final["messages"] == 0 and final["bytes"] == 0
    replayed = {c: v["replayed"] for c, v in final["connectors"].items()}
    appended = {c: v["appended"] for c, v in final["connectors"].items()}
    assert replayed.get("iothub", 0) > 0 and replayed.get("iothub-mqtt", 0) > 0, final
    # The backlog this run inherited, from two snapshots taken far apart.
    def inherited(snap: dict[str, Any]) -> int:
        return int(snap["messages"] + sum(v["replayed"] + v["rejected"] + v["expired"]
                                         for v in snap["connectors"].values())
                   - sum(v["appended"] for v in snap["connectors"].values()))  # fmt: skip

    assert inherited(early) == inherited(final) > 0, (early, final)
    assert final["refused"] == {} or sum(final["refused"].values()) == 0, final
    assert sum(final["errors"].values()) == 0, final

    def metric(name: str, **labels: str) -> float:
        return sum(v for (n, lbl), v in metrics.items() if n == name
                   and all(dict(lbl).get(k) == x for k, x in labels.items()))  # fmt: skip

    assert metric("iotgw_store_up") == 1
    assert metric("iotgw_store_backlog_messages") == 0
    assert metric("iotgw_store_backlog_bytes") == 0
    for connector in ("iothub", "iothub-mqtt"):
        assert metric("iotgw_store_replayed_total", connector=connector) == replayed[connector]
        assert metric("iotgw_store_appended_total", connector=connector) == appended.get(connector, 0)
        assert metric("iotgw_store_rejected_total", connector=connector) == 0
        assert metric("iotgw_store_expired_total", connector=connector) == 0
    assert metric("iotgw_store_errors_total") == 0
    assert metric("iotgw_store_commits_total") > 0
    assert status.returncode == 0, status.stderr
    assert "store" in status.stdout.lower() and "iothub-mqtt" in status.stdout, status.stdout
    print(f"seed {SEED}: kills={kills} at_hub={sum(len(v) for v in records.values())} "
          f"duplicates={duplicates} notes={notes} replayed={replayed} appended={appended} "
          f"refusals={[(d.device, d.sent.refusals_hub_down) for d in plain]} "
          f"errors={[(d.device, dict(d.sent.errors)) for d in devices]}")  # fmt: skip
