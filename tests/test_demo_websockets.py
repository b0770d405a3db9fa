"""`iot-gateway demo --transport websockets`: the same demo with the gateway reaching
the emulator over WebSockets (both protocols on one wss port)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from gateway.config import parse_config_text
from gateway.demo.gateway_config import GatewayPorts, HubEndpoint, render_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_generated_config_uses_websockets_for_both_connectors(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("placeholder\n")
    hub = HubEndpoint("demo-hub.azure-devices.net", 5671, 8883, str(ca_file), ws_port=4443)
    config = parse_config_text(
        render_config(hub, GatewayPorts(15672, 11883, 19090)), str(tmp_path / "gw.yaml")
    )
    assert [(c.protocol, c.transport, c.port) for c in config.connectors] == [
        ("amqp", "websockets", 4443),
        ("mqtt", "websockets", 4443),
    ]


def test_demo_over_websockets() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--transport", "websockets", "--verbose"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert re.search(r"wss 127\.0\.0\.1:\d+/\$iothub/websocket", out)
    assert "byte-identical to what the device sent: yes (3/3)" in out
    assert "topic and payload identical to what the device sent: yes (2/2)" in out
    assert "(over WebSockets)" in out
    # The gateway's own log says how its connectors reach the hub.
    assert out.count(", over WebSockets") >= 2
    assert "FAILED" not in out
