"""Hub outages against the real daemon: how many hub connections are left behind.

One proton device sends telemetry through `iot-gateway run` (a subprocess) to
hubsim, which is stopped and started again ``--restarts`` times. Printed:

- upstream connections in ``/api/connections`` after the last restart, with the
  device still sending (expected: 1);
- the same once the device has gone and ``--linger`` seconds have passed
  (expected: 0 once that is past the connector's ``idle_close``);
- with the hub down and no device, how many TCP connects the gateway made to the
  hub's port in ``--quiet`` seconds (a listener that accepts and closes counts them;
  expected: 0).

    .venv/bin/python scripts/hub_restarts.py --restarts 10 --idle-close 5

With ``--scale N`` instead: N devices connect and put their tokens (a pool of 4 x
``--per-connection``), then all leave; printed are the upstream connections
before and ``--linger`` seconds after they left.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote_plus

from proton import Message
from proton.reactor import LinkOption
from proton.utils import BlockingConnection

from gateway.hubsim import HubSim

HUB = "myhub.azure-devices.net"
CBS_TYPE = "servicebus.windows.net:sastoken"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def sas_token(resource: str, key_b64: str) -> str:
    expiry = int(time.time()) + 3600
    sr = quote_plus(resource)
    digest = hmac.new(base64.b64decode(key_b64), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    sig = quote_plus(base64.b64encode(digest).decode())
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}"


class ReplyTo(LinkOption):
    """The CBS receiver's own target address: the reply-to its requests name."""

    def apply(self, link) -> None:  # type: ignore[no-untyped-def]
        link.target.address = "cbs"

    def test(self, link) -> bool:  # type: ignore[no-untyped-def]
        return bool(link.is_receiver)


class Device(threading.Thread):
    """Sends a message every 50 ms; on any error, reconnects after 200 ms."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        while not self.stop.is_set():
            conn = None
            try:
                conn = BlockingConnection(self.url, timeout=5, allowed_mechs="ANONYMOUS",
                                          virtual_host=HUB)  # fmt: skip
                reply = conn.create_receiver("$cbs", options=[ReplyTo()])
                conn.create_sender("$cbs").send(Message(
                    reply_to="cbs", properties={"operation": "put-token", "type": CBS_TYPE,
                                                "name": f"{HUB}/devices/dev1"},
                    body=sas_token(f"{HUB}/devices/dev1", self.key)))  # fmt: skip
                reply.receive(timeout=5)
                sender = conn.create_sender(f"amqps://{HUB}/devices/dev1/messages/events")
                while not self.stop.is_set():
                    sender.send(Message(body=b"x" * 100), timeout=5)
                    self.sent += 1
                    time.sleep(0.05)
            except Exception:  # noqa: BLE001 - a device retries whatever went wrong
                time.sleep(0.2)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001
                        pass


def api(admin: str, path: str) -> object:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=10) as r:
        return json.loads(r.read())


def upstreams(admin: str) -> list[dict]:
    return [c for c in api(admin, "/api/connections") if c["kind"] == "upstream"]  # type: ignore[union-attr]


def wait(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--restarts", type=int, default=10)
    ap.add_argument("--outage", type=float, default=1.5, help="seconds the hub stays down")
    ap.add_argument("--idle-close", default=None, help="connector idle_close (omit: default)")
    ap.add_argument("--linger", type=float, default=8.0)
    ap.add_argument("--quiet", type=float, default=60.0)
    ap.add_argument("--scale", type=int, default=0, help="N devices come and go instead")
    ap.add_argument("--per-connection", type=int, default=200,
                    help="pool.max_devices_per_connection")  # fmt: skip
    args = ap.parse_args()

    key = base64.b64encode(os.urandom(32)).decode()
    host = "127.0.0.1"
    hub = HubSim({"dev1": key}, hub_host=HUB, mqtt_port=None, host=host)
    hub.start()
    listen, admin = f"{host}:{free_port(host)}", f"{host}:{free_port(host)}"
    extra = f"\n    idle_close: {args.idle_close}" if args.idle_close is not None else ""
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "gateway.yaml"
    cfg.write_text(f"""
gateway: {{id: gw-restarts}}
admin: {{listen: "{admin}"}}
tls_profiles:
  hub: {{ca_file: "{hub.ca_file}", server_name: {HUB}}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "{listen}"}}
connectors:
  - name: iothub
    protocol: amqp
    host: {host}
    port: {hub.amqp_port}
    tls_profile: hub
    connect_timeout: 3s
    reconnect: {{initial: 0.5s, max: 4s}}
    pool: {{max_connections: 4, max_devices_per_connection: {args.per_connection}}}{extra}
link_routes:
  - {{prefix: "$cbs", connector: iothub}}
  - {{prefix: "devices/", connector: iothub}}
""")
    gw = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg)],
                          stdout=subprocess.DEVNULL, stderr=open(tmp / "gateway.log", "w"))  # fmt: skip
    device = Device(f"amqp://{listen}", key)
    try:
        wait(lambda: _up(admin), 30, "the admin endpoint")
        if args.scale:
            scale(f"amqp://{listen}", key, admin, args.scale, args.linger)
            return 0
        device.start()
        for i in range(args.restarts):
            seen = len(hub.recorder.d2c)
            wait(lambda s=seen: len(hub.recorder.d2c) > s, 60, f"a message before restart {i + 1}")
            hub.stop()
            time.sleep(args.outage)  # the outage itself, not a synchronisation
            hub.start()
        seen = len(hub.recorder.d2c)
        wait(lambda: len(hub.recorder.d2c) > seen + 5, 60, "messages after the last restart")
        with_device = upstreams(admin)
        device.stop.set()
        device.join(10)
        time.sleep(args.linger)
        after = upstreams(admin)
        # The hub goes down for good; a listener on its port counts the gateway's connects.
        hub.stop()
        counter = socket.socket()
        counter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        counter.bind((host, hub.amqp_port))
        counter.listen(16)
        counter.settimeout(0.2)
        connects = 0
        end = time.monotonic() + args.quiet
        while time.monotonic() < end:
            try:
                c, _ = counter.accept()
            except TimeoutError:
                continue
            connects += 1
            c.close()
        counter.close()
        print(f"restarts: {args.restarts}, device messages sent: {device.sent}, "
              f"hub connections opened: {hub.recorder.connections['amqp'].opened}")  # fmt: skip
        print(f"upstream connections with the device sending: {len(with_device)}")
        print(f"upstream connections {args.linger:g}s after the device left: {len(after)} "
              f"{[(c['id'], c['device_ids'], c['links']) for c in after]}")  # fmt: skip
        print(f"connects to the hub port in {args.quiet:g}s with no device: {connects}")
    finally:
        device.stop.set()
        gw.terminate()
        try:
            gw.wait(15)
        except subprocess.TimeoutExpired:
            gw.kill()
        hub.close()
    return 0


def scale(url: str, key: str, admin: str, count: int, linger: float) -> None:
    conns = []
    try:
        for _ in range(count):
            conn = BlockingConnection(url, timeout=30, allowed_mechs="ANONYMOUS", virtual_host=HUB)
            conns.append(conn)
            reply = conn.create_receiver("$cbs", options=[ReplyTo()])
            conn.create_sender("$cbs").send(Message(
                reply_to="cbs", properties={"operation": "put-token", "type": CBS_TYPE,
                                            "name": f"{HUB}/devices/dev1"},
                body=sas_token(f"{HUB}/devices/dev1", key)))  # fmt: skip
            reply.receive(timeout=30)
        during = upstreams(admin)
    finally:
        for conn in conns:
            conn.close()
    time.sleep(linger)
    after = upstreams(admin)
    print(f"devices: {count}, upstream connections while connected: {len(during)} "
          f"{[(c['id'], c['links']) for c in during]}")  # fmt: skip
    print(f"upstream connections {linger:g}s after they left: {len(after)} "
          f"{[(c['id'], c['device_ids'], c['links']) for c in after]}")  # fmt: skip


def _up(admin: str) -> bool:
    try:
        api(admin, "/api/connectors")
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
