"""`iot-gateway run` as a process: start, relay, SIGTERM -> clean detach, exit 0 in < 5 s."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import trio
from gw_helpers import HUB_HOST, TIMEOUT, Device, data_message, in_thread
from proton import Endpoint
from proton.utils import ConnectionClosed, LinkDetached

EVENTS = f"amqps://{HUB_HOST}/devices/%s/messages/events"


def write_config(hub, tmp_path) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(f"""
gateway: {{id: gw-daemon}}
admin: {{listen: "127.0.0.1:0"}}
log: {{level: info}}
tls_profiles:
  hub: {{ca_file: "{hub.ca_file}", server_name: {HUB_HOST}}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "127.0.0.1:0"}}
connectors:
  - {{name: iothub, protocol: amqp, host: 127.0.0.1, port: {hub.amqp_port}, tls_profile: hub}}
link_routes:
  - {{prefix: "$cbs", connector: iothub}}
  - {{prefix: "devices/", connector: iothub}}
""")
    return str(path)


async def test_daemon_relays_and_stops_cleanly_on_sigterm(hub, keys, tmp_path) -> None:
    config = write_config(hub, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", config, "--trace", "amqp"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    lines: list[str] = []
    try:
        port = None
        with trio.fail_after(TIMEOUT):
            while port is None:
                line = await trio.to_thread.run_sync(proc.stdout.readline)
                assert line, "".join(lines)
                lines.append(line)
                m = re.search(r"listener amqp: amqp on 127\.0\.0\.1:(\d+)", line)
                if m:
                    port = int(m.group(1))
            while not any("started" in x for x in lines):
                lines.append(await trio.to_thread.run_sync(proc.stdout.readline))

        def device():
            dev = Device(f"amqp://127.0.0.1:{port}")
            dev.authenticate("dev1", keys["dev1"])
            sender = dev.conn.create_sender(EVENTS % "dev1")
            sender.send(data_message(b"through the daemon"))
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            try:
                dev.conn.wait(lambda: sender.link.state & Endpoint.REMOTE_CLOSED, timeout=TIMEOUT)
            except (LinkDetached, ConnectionClosed):
                pass
            try:
                dev.close()
            except Exception:
                pass
            return time.monotonic() - t0

        detach_after = await in_thread(device)
        t0 = time.monotonic()
        code = await trio.to_thread.run_sync(lambda: proc.wait(timeout=10))
        elapsed = time.monotonic() - t0 + detach_after
    finally:
        if proc.poll() is None:
            proc.kill()
        rest = proc.stdout.read()
        lines.append(rest)
    output = "".join(lines)
    assert code == 0, output
    assert elapsed < 5, output
    assert [r.body for r in hub.recorder.d2c] == [b"through the daemon"]
    assert "connector iothub: amqp to 127.0.0.1" in output
    # The frame trace shows both sides' frames, never a token.
    assert "@attach" in output and "@transfer" in output, output
    assert "SharedAccessSignature" not in output and "sig=" not in output
