"""Store-and-forward, AMQP replay throughput against hubsim.

    python -m bench.store_replay_amqp [--messages 20000] [--devices 10] [--size 256]
                                      [--replay-rate 100000] [--rounds 1]

A store file is filled with `--messages` stored AMQP telemetry messages (proton-encoded
data sections of `--size` bytes, spread over `--devices` opted-in identities), as the
gateway's local telemetry links store them. Then hubsim (in this process, on its own
thread) and the gateway (`python -m gateway run`, a child process, as operators run
it) are started on it: the gateway replays the backlog over its pooled hub connection.
Reported: messages per second from the first message at the hub to the last, the
gateway's CPU seconds, and duplicates (none expected without crashes).

`--replay-rate` is the connector's replay limit (messages per second); the default
is far above what the chain can do, to measure the replay itself.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import trio

from gateway.hubsim import HubSim

from .procs import usage_of

HUB_HOST = "myhub.azure-devices.net"


def _key(device: str) -> str:
    return base64.b64encode(hashlib.sha256(f"bench-{device}".encode()).digest()).decode()


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _config(tmp: Path, hub: HubSim, devices: list[str], rate: float, listen: tuple[str, int]) -> Path:
    secrets = tmp / "secrets.yaml"
    fd = os.open(secrets, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{d}-key: {_key(d)}\n" for d in devices))
    entries = "".join(f"    - {{id: {d}, key: {d}-key, trust: network, store_and_forward: true}}\n"
                      for d in devices)  # fmt: skip
    path = tmp / "gateway.yaml"
    path.write_text(f"""
gateway: {{id: gw-bench}}
admin: {{enabled: false}}
log: {{level: warning}}
tls_profiles:
  hub: {{ca_file: "{hub.ca_file}", server_name: {HUB_HOST}}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "{listen[0]}:{listen[1]}"}}
connectors:
  - name: iothub
    protocol: amqp
    host: {hub.host}
    port: {hub.amqp_port}
    tls_profile: hub
link_routes:
  - {{prefix: "$cbs", connector: iothub}}
  - {{prefix: "devices/", connector: iothub}}
store_and_forward:
  path: {tmp / "store.db"}
  max_bytes: 1GiB
  device_share: 1
  replay_rate: {rate}
credentials:
  secrets_file: {secrets}
  devices:
{entries}""")
    return path


async def _fill(config_path: Path, devices: list[str], messages: int, size: int) -> None:
    from proton import Message

    from gateway.config import load_config
    from gateway.router.local_link import encode_meta
    from gateway.store import MessageStore

    config = load_config(str(config_path))
    store = await MessageStore.open(config.store_and_forward)
    per_device = messages // len(devices)

    async def one(device: str) -> None:
        address = f"amqps://{HUB_HOST}/devices/{device}/messages/events"
        for i in range(per_device):
            msg = Message(body=os.urandom(size), id=f"{device}-{i}", properties={"i": i})
            msg.inferred = True
            await store.append(device=device, connector="iothub", protocol="amqp", address=address,
                               meta=encode_meta(0, b"%d" % i), payload=msg.encode())  # fmt: skip

    try:
        async with trio.open_nursery() as nursery:
            for device in devices:
                nursery.start_soon(one, device)
    finally:
        await store.aclose()


def run(messages: int, devices_n: int, size: int, rate: float) -> dict[str, object]:
    devices = [f"bench{i:03d}" for i in range(devices_n)]
    messages = messages // devices_n * devices_n
    with tempfile.TemporaryDirectory(prefix="sf-bench-") as tmpdir:
        tmp = Path(tmpdir)
        hub = HubSim({d: _key(d) for d in devices}, hub_host=HUB_HOST, mqtt_port=None)
        hub.start()
        hub.stop()  # its port and certificate are known now; started once the store is full
        listen = ("127.0.0.1", _free_port("127.0.0.1"))
        config = _config(tmp, hub, devices, rate, listen)
        filled_at = time.monotonic()
        trio.run(_fill, config, devices, messages, size)
        fill_seconds = time.monotonic() - filled_at
        hub.start()
        log = (tmp / "gateway.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL)  # fmt: skip
        try:
            hub.recorder.wait_for(lambda: hub.recorder.d2c, timeout=120)
            first = time.monotonic()
            cpu0 = usage_of(proc.pid).cpu
            hub.recorder.wait_for(lambda: len(hub.recorder.d2c) >= messages, timeout=3600)
            last = time.monotonic()
            cpu = usage_of(proc.pid).cpu - cpu0
        finally:
            proc.terminate()
            proc.wait(30)
            hub.close()
        seen = Counter(r.properties.get("message-id") for r in hub.recorder.d2c)
        elapsed = last - first
        return {
            "protocol": "amqp",
            "messages": messages,
            "devices": devices_n,
            "size": size,
            "replay_rate": rate,
            "fill_seconds": round(fill_seconds, 2),
            "replay_seconds": round(elapsed, 2),
            "msgs_per_s": round((messages - 1) / elapsed, 1) if elapsed > 0 else None,
            "gateway_cpu_s": round(cpu, 2),
            "duplicates": sum(n - 1 for n in seen.values() if n > 1),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_replay_amqp")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--size", type=int, default=256, help="body bytes per message")
    parser.add_argument("--replay-rate", type=float, default=100000.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    for _ in range(args.rounds):
        print(json.dumps(run(args.messages, args.devices, args.size, args.replay_rate)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
