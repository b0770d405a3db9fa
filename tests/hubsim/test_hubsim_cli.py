"""`iot-gateway hubsim` (here `python -m gateway.hubsim`) as a black box."""

from __future__ import annotations

import json
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
from hubsim_clients import TIMEOUT, MqttDevice, device_uri, new_key, sas_token

import gateway
from gateway.hubsim.cli import main, parse_endpoint

REPO = pathlib.Path(gateway.__file__).resolve().parent.parent


def test_bad_arguments_exit_2(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "devices.json"
    bad.write_text('{"dev1": "not base64!"}')
    assert main(["--devices", str(bad)]) == 2
    assert "dev1: key is not base64" in capsys.readouterr().err
    assert main(["--devices", str(tmp_path / "missing.json")]) == 2
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"dev1": new_key()}))
    assert main(["--devices", str(good), "--amqp", "nohost"]) == 2
    assert main(["--devices", str(good), "--cert", str(good)]) == 2
    assert parse_endpoint("[::1]:5671") == ("::1", 5671)


def test_runs_logs_d2c_and_stops_on_sigint(tmp_path: pathlib.Path) -> None:
    keys = {"dev1": new_key()}
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps(keys))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.hubsim", "--devices", str(devices),
         "--amqp", "127.0.0.1:0", "--mqtt", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]

    seen: list[str] = []

    def wait_line(pattern: str) -> re.Match[str]:
        while True:
            seen.append(lines.get(timeout=TIMEOUT))
            match = re.search(pattern, seen[-1])
            if match:
                return match

    try:
        mqtt_port = int(wait_line(r"mqtts on 127\.0\.0\.1:(\d+)").group(1))
        ca_file = wait_line(r"CA file (\S+)").group(1)
        token = sas_token(device_uri("dev1"), keys["dev1"])
        dev = MqttDevice(SimpleNamespace(ca_file=ca_file, mqtt_port=mqtt_port), "dev1", token)
        assert dev.connected()
        dev.publish("devices/dev1/messages/events/", b"hello", qos=1)
        dev.close()
        wait_line(r"D2C from dev1, 5 bytes")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    while not lines.empty():
        seen.append(lines.get())
    assert any("CBS" in line or "connected (sas)" in line for line in seen)
    assert not any("SharedAccessSignature" in line or "sig=" in line for line in seen)
