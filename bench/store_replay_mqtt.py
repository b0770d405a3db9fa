"""Store-and-forward replay throughput, MQTT side, against hubsim.

    python -m bench.store_replay_mqtt                       # 20,000 x 256 B, 4 devices
    python -m bench.store_replay_mqtt --messages 2000 --quick
    python -m bench.store_replay_mqtt --size 1024 --rate 50 # the default replay_rate

A backlog of `--messages` QoS 1 telemetry messages (`--size` bytes, spread over
`--devices` opted-in devices) is written to a fresh SQLite store (the daemon's
`gateway.store.MessageStore`), then the daemon's `MqttForwarder` replays it
to hubsim over TLS on loopback with the relay's own opener (`MqttUpstreams`),
each device on its own connection, `--window` PUBLISHes in flight, at most
`--rate` messages per second for the connector. Timed: from the forwarder's
start until the store is empty (every message PUBACKed by hubsim and deleted).
Prints one line per run and the best of `--repeat`.

hubsim runs in this process's other thread (asyncio + amqtt's codec), so the
figure is the gateway's replay and hubsim's MQTT server sharing the machine's
cores, as in the other benchmarks.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from gateway.auth.credentials import CredentialStore
from gateway.config import parse_config_text
from gateway.daemon import MqttUpstreams
from gateway.hubsim import HubSim
from gateway.mqtt import encode
from gateway.mqtt_relay import MqttForwarder, StoreForward
from gateway.mqtt_relay.local_session import CONNECT_META
from gateway.store import MessageStore

HUB = "bench.azure-devices.net"
RUN_TIMEOUT = 600.0
FILL_WORKERS = 128


def make_config(directory: Path, hub: HubSim, keys: dict[str, str], rate: float) -> Any:
    secrets = directory / "secrets.yaml"
    secrets.write_text("".join(f"{d}-key: {k}\n" for d, k in keys.items()))
    secrets.chmod(0o600)
    devices = "".join(
        f"    - {{id: {d}, key: {d}-key, trust: network, store_and_forward: true}}\n" for d in keys
    )
    return parse_config_text(
        f"""
admin: {{enabled: false}}
tls_profiles:
  hubsim: {{ca_file: {hub.ca_file}, server_name: {HUB}}}
listeners:
  - {{name: mqtt, protocol: mqtt, bind: "127.0.0.1:0"}}
connectors:
  - {{name: hub, protocol: mqtt, host: {hub.host}, port: {hub.mqtt_port}, tls_profile: hubsim}}
mqtt_routes:
  - {{hub: {HUB}, connector: hub}}
store_and_forward:
  path: {directory / "store.db"}
  max_bytes: 4GiB
  device_share: 1
  replay_rate: {rate}
credentials:
  secrets_file: {secrets}
  devices:
{devices}""",
        "bench.yaml",
    )


async def fill(store: Any, devices: list[str], count: int, size: int) -> float:
    """Append `count` messages round-robin over `devices`; returns seconds taken."""
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    for device in devices:
        connect = encode.connect(device, username=f"{HUB}/{device}/?api-version=2021-04-12")
        await store.put_meta(device, CONNECT_META, connect)
    started = time.perf_counter()
    per_device = count // len(devices)
    # The fill is not what is measured: many appends at once, so group commit takes
    # them in large batches (the order within a device does not matter here).
    jobs = [(device, i) for i in range(per_device) for device in devices]

    async def worker(start: int) -> None:
        for device, i in jobs[start::FILL_WORKERS]:
            await store.append(device=device, connector="hub", protocol="mqtt",
                               address=f"devices/{device}/messages/events/n={i}",
                               meta=b"", payload=payload)  # fmt: skip

    async with trio.open_nursery() as nursery:
        for start in range(FILL_WORKERS):
            nursery.start_soon(worker, start)
    return time.perf_counter() - started


async def one_run(args: argparse.Namespace, hub: HubSim, keys: dict[str, str]) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        config = make_config(Path(tmp), hub, keys, args.rate)
        store = await MessageStore.open(config.store_and_forward)
        try:
            devices = list(keys)
            fill_s = await fill(store, devices, args.messages, args.size)
            total = args.messages // len(devices) * len(devices)
            before = hub.recorder.d2c_count
            forwarder = MqttForwarder(
                StoreForward(store), config, CredentialStore.from_config(config.credentials),
                MqttUpstreams(), window=args.window, scan_interval=0.05,
            )  # fmt: skip
            with trio.fail_after(RUN_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    started = time.perf_counter()
                    await nursery.start(forwarder.run)
                    while any(store.backlog(d) for d in devices):
                        await trio.sleep(0.01)
                    elapsed = time.perf_counter() - started
                    nursery.cancel_scope.cancel()
            arrived = hub.recorder.d2c_count - before
            rate = total / elapsed
            print(f"  {total} x {args.size} B, {len(devices)} devices, window {args.window}, "
                  f"rate limit {args.rate:g}/s: stored in {fill_s:.2f}s, replayed in "
                  f"{elapsed:.2f}s = {rate:,.0f} msg/s ({rate * args.size / 1e6:.2f} MB/s); "
                  f"{arrived} at hubsim", flush=True)  # fmt: skip
            return rate
        finally:
            await store.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_replay_mqtt",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--rate", type=float, default=1e9, help="replay_rate (default: unlimited)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat = 1
    keys = {f"bench-{i}": base64.b64encode(os.urandom(32)).decode() for i in range(args.devices)}
    hub = HubSim(keys, hub_host=HUB, amqp_port=None)
    hub.recorder.keep_d2c = False  # counts only: a long run must not hold every message
    with hub:
        print(f"store replay, MQTT, against hubsim (python {sys.version.split()[0]}):")
        rates = [trio.run(one_run, args, hub, keys) for _ in range(args.repeat)]
    print(f"best: {max(rates):,.0f} msg/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
