"""`iot-gateway demo` and the sample devices.

The samples are checked against hubsim directly (TLS, no gateway) and judged by
the hub's recorder; the demo runs as a user runs it (`python -m gateway demo`,
with the real daemon as a subprocess) and is judged by its exit status and
summary. Failure paths use stand-in gateway commands.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.demo.gateway_config import GatewayPorts, HubEndpoint, pick_free_ports, render_config
from gateway.demo.scenario import Demo, Options
from gateway.hubsim import HubSim
from gateway.samples import amqp_device, mqtt_device

HUB_HOST = "sample-hub.azure-devices.net"
DEMO_TIMEOUT = 60
STEP = 5.0


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
def keys() -> dict[str, str]:
    return {"amqp-dev": new_key(), "mqtt-dev": new_key()}


@pytest.fixture
def hub(keys: dict[str, str]) -> Iterator[HubSim]:
    sim = HubSim(keys, hub_host=HUB_HOST)
    with sim:
        yield sim
    sim.close()


def run_python(*args: str, timeout: float = DEMO_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


# -- the samples against the hub emulator directly ------------------------------------------


def test_amqp_sample_cbs_telemetry_and_c2d_against_hubsim(
    hub: HubSim, keys: dict[str, str]
) -> None:
    assert hub.ca_file and hub.amqp_port
    command_id = hub.send_c2d("amqp-dev", b"open-valve", {"content_type": "text/plain"})
    settings = amqp_device.Settings(
        "127.0.0.1", hub.amqp_port, HUB_HOST, "amqp-dev", keys["amqp-dev"],
        ca_file=hub.ca_file, messages=3, c2d_timeout=STEP, timeout=STEP,
    )  # fmt: skip
    lines: list[str] = []
    result = amqp_device.run(settings, lines.append)

    assert result.ok, result.error
    assert (result.cbs_status, len(result.sent)) == (200, 3)
    assert [s.outcome for s in result.sent] == ["accepted"] * 3
    # The hub's word: the token it verified, the exact bytes, the command's outcome.
    cbs = hub.recorder.cbs
    assert [(c.device_id, c.status, c.audience) for c in cbs] == [
        ("amqp-dev", 200, f"{HUB_HOST}/devices/amqp-dev")
    ]
    assert [d.raw for d in hub.recorder.d2c] == [s.encoded for s in result.sent]
    first = hub.recorder.d2c[0]
    assert first.properties["content-type"] == "application/json"
    assert first.properties["temperatureAlert"] == "false"
    assert not first.settled  # at-least-once: sent unsettled
    assert result.command is not None and result.command.body == b"open-valve"
    outcome = hub.recorder.wait_for(lambda: hub.recorder.dispositions, STEP)[0]
    assert (outcome.message_id, outcome.outcome) == (command_id, "accepted")
    assert any("CBS put-token" in line for line in lines)


def test_mqtt_sample_connect_telemetry_twin_and_method_against_hubsim(
    hub: HubSim, keys: dict[str, str]
) -> None:
    assert hub.ca_file and hub.mqtt_port
    hub.update_desired("mqtt-dev", {"telemetryInterval": 10})
    settings = mqtt_device.Settings(
        "127.0.0.1", hub.mqtt_port, HUB_HOST, "mqtt-dev", keys["mqtt-dev"],
        ca_file=hub.ca_file, messages=2, method_timeout=STEP, timeout=STEP,
    )  # fmt: skip
    calls: list[tuple[int, bytes]] = []

    def call_method() -> None:
        thread = threading.Thread(
            target=lambda: calls.append(hub.invoke_method("mqtt-dev", "ping", {"n": 1}, STEP))
        )
        thread.start()
        threads.append(thread)

    threads: list[threading.Thread] = []
    result = mqtt_device.run(settings, lambda _: None, call_method)
    for thread in threads:
        thread.join(STEP)

    assert result.ok, result.error
    assert result.connack == "Success"
    assert result.twin is not None and result.twin["desired"]["telemetryInterval"] == 10
    assert (result.reported_status, result.reported_version) == (204, 2)
    d2c = hub.recorder.d2c
    assert [(d.topic, d.raw, d.qos) for d in d2c] == [
        (t.topic, t.payload, 1) for t in result.telemetry
    ]
    assert d2c[0].properties == {
        "$.ct": "application/json",
        "$.ce": "utf-8",
        "temperatureAlert": "false",
    }
    reported = hub.twin("mqtt-dev")["reported"]
    assert reported["firmwareVersion"] == "1.0.3" and reported["$version"] == 2
    assert result.method is not None and result.method.name == "ping"
    assert calls == [(200, result.method.response)]


def test_samples_report_a_forged_key_clearly(hub: HubSim, keys: dict[str, str]) -> None:
    assert hub.ca_file and hub.amqp_port and hub.mqtt_port
    forged = new_key()
    amqp = amqp_device.run(
        amqp_device.Settings(
            "127.0.0.1",
            hub.amqp_port,
            HUB_HOST,
            "amqp-dev",
            forged,
            ca_file=hub.ca_file,
            c2d_timeout=0,
            timeout=STEP,
        ),  # fmt: skip
        lambda _: None,
    )
    mqtt = mqtt_device.run(
        mqtt_device.Settings(
            "127.0.0.1",
            hub.mqtt_port,
            HUB_HOST,
            "mqtt-dev",
            forged,
            ca_file=hub.ca_file,
            method_timeout=0,
            timeout=STEP,
        ),  # fmt: skip
        lambda _: None,
    )
    assert amqp.cbs_status == 401 and amqp.error and "refused the token: 401" in amqp.error
    assert not amqp.sent and not hub.recorder.d2c
    assert mqtt.error and "connection refused: CONNACK Not authorized" in mqtt.error
    assert mqtt.connack is not None and not mqtt.telemetry


def test_sample_programs_run_from_the_command_line(hub: HubSim, keys: dict[str, str]) -> None:
    hub.send_c2d("amqp-dev", b"cmd")
    common = ["--host", "127.0.0.1", "--hub-host", HUB_HOST, "--ca-file", str(hub.ca_file)]
    amqp = run_python(
        "-m", "gateway.samples.amqp_device", *common, "--port", str(hub.amqp_port),
        "--device-id", "amqp-dev", "--key", keys["amqp-dev"], "--messages", "1",
        "--c2d-timeout", str(STEP),
    )  # fmt: skip
    mqtt = run_python(
        "-m", "gateway.samples.mqtt_device", *common, "--port", str(hub.mqtt_port),
        "--device-id", "mqtt-dev", "--key", keys["mqtt-dev"], "--method-timeout", "0",
    )  # fmt: skip
    assert amqp.returncode == 0, amqp.stdout + amqp.stderr
    assert "[amqp-dev] CBS put-token" in amqp.stdout and "(accepted)" in amqp.stdout
    assert mqtt.returncode == 0, mqtt.stdout + mqtt.stderr
    assert "twin reported PATCH" in mqtt.stdout
    assert len(hub.recorder.d2c) == 1 + 2
    assert keys["amqp-dev"] not in amqp.stdout and "SharedAccessSignature" not in amqp.stdout


# -- the generated configuration ------------------------------------------------------------


def test_generated_config_is_valid_and_routes_both_protocols(tmp_path: Path) -> None:
    from gateway.config import AmqpConnector, parse_config_text

    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("placeholder\n")
    amqp, mqtt, admin = pick_free_ports(3)
    assert len({amqp, mqtt, admin}) == 3
    text = render_config(
        HubEndpoint(HUB_HOST, 5671, 8883, str(ca_file)), GatewayPorts(amqp, mqtt, admin)
    )
    config = parse_config_text(text, str(tmp_path / "gateway.yaml"))
    assert [(lst.protocol, lst.bind.port) for lst in config.listeners] == [
        ("amqp", amqp),
        ("mqtt", mqtt),
    ]
    assert all(str(lst.bind.host) == "127.0.0.1" for lst in config.listeners)
    assert [route.address for route in config.link_routes] == ["$cbs", "devices/"]
    assert [route.hub for route in config.mqtt_routes] == ["*"]
    for connector in config.connectors:
        profile = config.tls_profile_for(connector)
        assert profile is not None and profile.server_name == HUB_HOST
        if isinstance(connector, AmqpConnector):
            assert connector.hostname == HUB_HOST
    assert config.admin.listen.port == admin


# -- the demo --------------------------------------------------------------------------------


def test_demo_runs_end_to_end_through_the_gateway() -> None:
    started = time.monotonic()
    proc = run_python("-m", "gateway", "demo")
    elapsed = time.monotonic() - started
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert elapsed < 30, f"demo took {elapsed:.1f} s"
    assert "Result: OK" in out
    # AMQP: CBS, telemetry bytes, C2D outcome, as the hub recorded them.
    assert re.search(r"hub +CBS put-token for demo-hub\.azure-devices\.net/devices/\S+: 200", out)
    assert "byte-identical to what the device sent: yes (3/3)" in out
    assert re.search(r"hub +C2D \S+: outcome accepted, feedback Success", out)
    # MQTT: telemetry, twin, direct method.
    assert "topic and payload identical to what the device sent: yes (2/2)" in out
    assert re.search(r"hub +twin reported properties: .*\"firmwareVersion\": \"1\.0\.3\"", out)
    assert re.search(r"hub +direct method reboot: status 200", out)
    # Provisioning: through the gateway to the provisioning service, then to the assigned hub.
    dps_part = out.split("Provisioned device dps-sensor-1")[1]
    assert "device  assigned to hub demo-hub.azure-devices.net as device dps-sensor-1" in dps_part
    assert re.search(r"hub +provisioning service: register -> 202", dps_part)
    assert "topic and payload identical to what the device sent: yes (2/2)" in dps_part
    assert "FAILED" not in out
    # Everything torn down: no files left behind.
    workdir = re.search(r"gateway files (\S+)/gateway\.yaml", out)
    assert workdir and not Path(workdir.group(1)).exists()


def test_demo_keep_running_serves_until_interrupted() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--keep-running"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + DEMO_TIMEOUT
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Press Ctrl-C") or time.monotonic() > deadline:
                break
        out = "".join(lines)
        assert "Press Ctrl-C" in out, out
        # Re-run the MQTT sample by hand with the printed command.
        command = next(line.strip() for line in lines if "gateway.samples.mqtt_device" in line)
        rerun = subprocess.run(
            command.replace("python ", f"{sys.executable} ", 1),
            shell=True, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "twin reported PATCH" in rerun.stdout
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=DEMO_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + rest
    assert re.search(r"mqtt-sensor-1 key \S+", out)


def test_demo_reports_a_gateway_that_exits_at_start(capsys: pytest.CaptureFixture[str]) -> None:
    command = [sys.executable, "-c", "import sys; print('bad config, pretend'); sys.exit(2)"]
    demo = Demo(Options(gateway_command=command), sys.stdout)
    assert demo.run() == 1
    out = capsys.readouterr().out
    assert "FAILED: the gateway exited with status 2 before it listened" in out
    assert "bad config, pretend" in out  # its log tail is shown
    assert f"files kept in {demo.workdir}" in out
    assert demo.hub is not None and not demo.hub.running
    import shutil

    shutil.rmtree(demo.workdir)


MQTT_ONLY_GATEWAY = """
import signal, sys
import trio
from gateway.config import load_config
from gateway.daemon import serve_mqtt_listener

async def main(path):
    config = load_config(path)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for listener in config.listeners:
                if listener.protocol == "mqtt":
                    await nursery.start(serve_mqtt_listener, listener, config)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break

trio.run(main, sys.argv[1])
"""


def test_demo_reports_the_amqp_part_failed_when_only_mqtt_is_served(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "mqtt_only_gateway.py"
    script.write_text(MQTT_ONLY_GATEWAY)
    demo = Demo(Options(gateway_command=[sys.executable, str(script), "{config}"]), sys.stdout)
    assert demo.run() == 1
    out = capsys.readouterr().out
    assert re.search(r"amqp 127\.0\.0\.1:\d+ \(NOT LISTENING\)", out)
    assert "the gateway is not listening for AMQP" in out
    assert "Result: FAILED (AMQP device amqp-sensor-1)" in out
    mqtt_part = out.split("MQTT device")[1]
    assert "result  OK" in mqtt_part
    assert demo.gateway is not None and demo.gateway.poll() is not None
    assert demo.gateway.stop_status == 0 and not demo.gateway.killed
    import shutil

    shutil.rmtree(demo.workdir)


def test_demo_starts_the_gateway_again_when_a_port_it_picked_was_taken(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    from gateway.demo import scenario

    # Between picking a free port and the gateway binding it, another process takes it,
    # as an outgoing connection's local port would: bound, not accepting.
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", 0))
    picks: list[list[int]] = []

    def pick(count: int) -> list[int]:
        ports = pick_free_ports(count)
        if not picks:
            ports[0] = squatter.getsockname()[1]
        picks.append(ports)
        return ports

    monkeypatch.setattr(scenario, "pick_free_ports", pick)
    try:
        demo = Demo(Options(), sys.stdout)
        assert demo.run() == 0
    finally:
        squatter.close()
    out = capsys.readouterr().out
    assert len(picks) == 2
    assert "one of its ports was taken meanwhile; again with new ports" in out
    assert "Result: OK" in out and "FAILED" not in out
