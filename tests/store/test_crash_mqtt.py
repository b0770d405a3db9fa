"""Crash safety of store-and-forward, MQTT side: the real daemon SIGKILLed at random points.

hubsim is the hub (in this process; stopping it makes the hub unreachable). Two
paho devices hold no hub credential; the gateway holds their keys and has
them opted in. Each device publishes numbered QoS 1 messages; a message counts
as acknowledged when paho saw its PUBACK. Messages not acknowledged when the
gateway dies are sent again by the device after it reconnects, as a device
does.

1. Storing: the hub is down; the gateway is killed (SIGKILL) after a seeded
   random number of further acknowledgements, then started again on the same
   store file; repeated STORING_KILLS times.
2. Forwarding: the hub is up; the gateway is killed after a seeded random
   number of further messages reached the hub (replay, and devices storing
   behind their backlog), FORWARDING_KILLS times.
3. The gateway runs to the end: every acknowledged message is at hubsim at
   least once; duplicates are counted and must stay within the bound the
   design gives (per kill: a replay window, plus what each device had in
   flight).

Waits are on progress (acknowledgements counted, hubsim's recorder), never sleeps.
"""

from __future__ import annotations

import base64
import os
import random
import signal
import threading
from collections import Counter
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.hubsim import HubSim
from gateway.mqtt_relay.forwarder import WINDOW
from tests.acceptance.gateway_proc import GatewayProcess, start_gateway, wait_until, write_config

HUB = "myhub.azure-devices.net"
SEED = int(os.environ.get("CRASH_SEED", "1907"))
STORING_KILLS = 12
FORWARDING_KILLS = 10
DEVICES = ("dev1", "dev2")
IN_FLIGHT = 10  # each device's unacknowledged PUBLISHes at most
FINAL_TIMEOUT = 180.0  # fail-safe only


def loopback(rng: random.Random) -> str:
    return f"127.{rng.randint(1, 254)}.{rng.randint(1, 254)}.{rng.randint(2, 254)}"


class Device:
    """A paho device that publishes numbered QoS 1 messages for as long as it runs,
    reconnecting when the gateway drops it, and resending what was never
    acknowledged after each reconnect."""

    def __init__(self, device_id: str) -> None:
        self.id = device_id
        self.next_seq = 0
        self.acked: set[int] = set()
        self.unacked: dict[int, None] = {}  # in send order
        self.lock = threading.Condition()
        self.target: tuple[str, int] | None = None
        self.running = True
        self.paused = False
        self.resent = 0
        self.thread = threading.Thread(target=self._run, name=f"device-{device_id}", daemon=True)
        self.thread.start()

    def point_at(self, target: tuple[str, int] | None) -> None:
        with self.lock:
            self.target = target
            self.lock.notify_all()

    def stop(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify_all()
        self.thread.join(30)

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def _run(self) -> None:
        while True:
            with self.lock:
                while self.running and self.target is None:
                    self.lock.wait()
                if not self.running:
                    return
                target = self.target
            assert target is not None
            self._session(target)

    def _session(self, target: tuple[str, int]) -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.id,
                             reconnect_on_failure=False)  # fmt: skip
        client.username_pw_set(f"{HUB}/{self.id}/?api-version=2021-04-12")
        client.max_inflight_messages_set(IN_FLIGHT)
        mids: dict[int, int] = {}
        early: set[int] = set()  # PUBACKed before publish() returned its mid
        gone = threading.Event()
        connected = threading.Event()

        def on_connect(c, u, flags, reason, props):
            if reason == 0:
                connected.set()
            else:
                gone.set()

        def on_publish(c, u, mid, reason, props):
            with self.lock:
                seq = mids.pop(mid, None)
                if seq is None:
                    early.add(mid)
                else:
                    self._acked(seq)

        def on_disconnect(c, u, flags, reason, props):
            gone.set()
            with self.lock:
                self.lock.notify_all()

        client.on_connect, client.on_publish = on_connect, on_publish
        client.on_disconnect = on_disconnect
        try:
            client.connect(*target, keepalive=30)
        except OSError:
            with self.lock:
                if self.target == target:
                    self.lock.wait(0.05)  # the gateway is restarting: try again soon
            return
        client.loop_start()
        try:
            if not connected.wait(10) or gone.is_set():
                return
            with self.lock:
                backlog = list(self.unacked)  # sent before, never acknowledged: again
                self.resent += len(backlog)
            for seq in backlog:
                self._publish(client, mids, early, seq)
            while not gone.is_set():
                with self.lock:
                    while (self.running and self.target == target and not gone.is_set()
                           and (len(mids) >= IN_FLIGHT or self.paused)):  # fmt: skip
                        self.lock.wait(1.0)
                    if not self.running or self.target != target or gone.is_set():
                        return
                    seq = self.next_seq
                    self.next_seq += 1
                    self.unacked[seq] = None
                self._publish(client, mids, early, seq)
        finally:
            client.loop_stop()
            sock = client.socket()
            if sock is not None:
                sock.close()

    def _publish(
        self, client: paho.Client, mids: dict[int, int], early: set[int], seq: int
    ) -> None:
        topic = f"devices/{self.id}/messages/events/seq={seq}"
        # Not under self.lock: paho calls on_publish holding its own lock.
        info = client.publish(topic, f"{self.id}:{seq}".encode(), qos=1)
        with self.lock:
            if info.mid in early:
                early.discard(info.mid)
                self._acked(seq)
            else:
                mids[info.mid] = seq

    def _acked(self, seq: int) -> None:
        """With self.lock held."""
        self.acked.add(seq)
        self.unacked.pop(seq, None)
        self.lock.notify_all()


def received(hub: HubSim) -> Counter[tuple[str, int]]:
    counts: Counter[tuple[str, int]] = Counter()
    for record in list(hub.recorder.d2c):
        device, _, seq = record.body.decode().partition(":")
        counts[device, int(seq)] += 1
    return counts


def config(tmp_path: Path, hub: HubSim, host: str, keys: dict[str, str]) -> Path:
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text("".join(f"{d}-key: {k}\n" for d, k in keys.items()))
    secrets.chmod(0o600)
    devices = "".join(
        f"    - {{id: {d}, key: {d}-key, trust: network, store_and_forward: true}}\n" for d in keys
    )
    return write_config(
        tmp_path,
        f"""
admin: {{enabled: false}}
log: {{level: info}}
tls_profiles:
  hubsim: {{ca_file: {hub.ca_file}, server_name: {HUB}}}
listeners:
  - {{name: mqtt, protocol: mqtt, bind: "{host}:0"}}
connectors:
  - {{name: iothub-mqtt, protocol: mqtt, host: {hub.host}, port: {hub.mqtt_port},
     tls_profile: hubsim, connect_timeout: 5s}}
mqtt_routes:
  - {{hub: {HUB}, connector: iothub-mqtt}}
store_and_forward:
  path: {tmp_path / "store.db"}
  replay_rate: 150
credentials:
  secrets_file: {secrets}
  devices:
{devices}""",
    )


def kill(gw: GatewayProcess) -> None:
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(10)


@pytest.mark.slow
def test_sigkill_while_storing_and_forwarding_loses_no_acknowledged_message(tmp_path):
    rng = random.Random(SEED)
    keys = {d: base64.b64encode(os.urandom(32)).decode() for d in DEVICES}
    hub = HubSim(keys, hub_host=HUB, amqp_port=None, host=loopback(rng))
    hub.start()
    devices = [Device(d) for d in DEVICES]
    host = loopback(rng)
    path = config(tmp_path, hub, host, keys)
    gw: GatewayProcess | None = None
    kills = 0

    def start() -> GatewayProcess:
        started = start_gateway(path, listeners=("mqtt",), admin=False, timeout=60)
        for device in devices:
            device.point_at((host, started.port("mqtt")))
        return started

    def total_acked() -> int:
        return sum(d.acked_count() for d in devices)

    try:
        hub.stop()
        # 1. Storing, hub down.
        for _ in range(STORING_KILLS):
            gw = start()
            goal = total_acked() + rng.randint(3, 40)
            wait_until(
                lambda goal=goal: total_acked() >= goal, 60, "acknowledgements while storing"
            )
            kill(gw)
            kills += 1
        stored_acked = total_acked()
        assert stored_acked > 100
        assert received(hub) == Counter()  # the hub saw nothing yet

        # 2. Forwarding, hub up.
        hub.start()
        for _ in range(FORWARDING_KILLS):
            gw = start()
            goal = sum(received(hub).values()) + rng.randint(5, 60)
            wait_until(
                lambda goal=goal: sum(received(hub).values()) >= goal, 60, "messages at the hub"
            )
            kill(gw)
            kills += 1

        # 3. To the end.
        gw = start()
        for device in devices:
            with device.lock:
                device.paused = True  # no new messages: let everything acknowledged arrive
                device.lock.notify_all()

        def all_arrived() -> bool:
            got = received(hub)
            return all((d.id, seq) in got for d in devices for seq in list(d.acked))

        wait_until(all_arrived, FINAL_TIMEOUT, "every acknowledged message at the hub")
    finally:
        # The gateway first: a failing run must not leave it behind.
        if gw is not None and gw.proc.poll() is None:
            kill(gw)
        for device in devices:
            device.stop()
        hub.close()

    got = received(hub)
    acked = {(d.id, seq) for d in devices for seq in d.acked}
    assert acked <= set(got)
    duplicates = sum(n - 1 for n in got.values())
    # Per kill at most a replay window resent by the forwarder, and what each device
    # had in flight (stored, then sent again because the PUBACK died with the gateway).
    bound = kills * (WINDOW + len(devices) * IN_FLIGHT)
    print(f"seed {SEED}: {kills} kills, {len(acked)} messages acknowledged "
          f"({stored_acked} while the hub was down), {sum(got.values())} at the hub, "
          f"{duplicates} duplicates (bound {bound}), "
          f"{sum(d.resent for d in devices)} resent by the devices")  # fmt: skip
    assert kills >= 20
    assert duplicates <= bound
    # Per device, the first arrivals of what was stored while the hub was down keep
    # the order the device sent them in.
    for device in devices:
        firsts = []
        for record in hub.recorder.d2c:
            name, _, seq = record.body.decode().partition(":")
            if name == device.id and int(seq) not in firsts:
                firsts.append(int(seq))
        early = [s for s in firsts if s in device.acked][:50]
        assert early == sorted(early)
