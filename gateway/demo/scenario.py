"""The demo run: hub emulator in-process, gateway as a process, sample devices through it."""

from __future__ import annotations

import base64
import os
import shlex
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from gateway.demo.gateway_config import (
    LOOPBACK,
    GatewayPorts,
    HubEndpoint,
    pick_free_ports,
    render_config,
)
from gateway.demo.gateway_process import GatewayProcess, Readiness
from gateway.demo.report import DeviceReport, check_amqp, check_dps, check_mqtt
from gateway.hubsim import HubSim
from gateway.hubsim.dps import derive_key
from gateway.ops.startup import EXIT_ADDRESS
from gateway.samples import amqp_device, dps_device, mqtt_device

HUB_HOST = "demo-hub.azure-devices.net"
AMQP_DEVICE = "amqp-sensor-1"
MQTT_DEVICE = "mqtt-sensor-1"
DPS_DEVICE = "dps-sensor-1"  # provisions through the gateway (its hub learns it then)
DPS_SCOPE = "0ne00DEM0"
DPS_GROUP = "demo-fleet"  # a symmetric-key enrollment group; its members' keys derive from it
C2D_COMMAND = b'{"command":"blink","seconds":2}'
METHOD = ("reboot", {"delaySeconds": 0})

# Fail-safes only: every wait ends as soon as its step completes, so a healthy run is as
# quick as ever, and a busy machine (a cold interpreter start alone can take seconds) has
# room before a slow step is taken for a broken one.
READY_TIMEOUT = 60.0  # the gateway process starts and binds its listeners
READY_GRACE = 5.0  # after the first listener, the others
STEP_TIMEOUT = 15.0  # each device step (connect, CBS, send, receive)
DEVICES_TIMEOUT = 90.0  # all devices together; every step inside is bounded too
PORT_ATTEMPTS = 3  # the ports picked for the gateway can be taken before it binds them
EXTRA_COMMANDS = 3  # queued for manual runs with --keep-running


@dataclass
class Options:
    keep_running: bool = False
    verbose: bool = False
    keep_files: bool = False
    transport: str = "tcp"  # or "websockets": the gateway reaches the hub over WebSockets
    # Default: python -m gateway run -c {config}; "{config}" is replaced by the file's path.
    gateway_command: Sequence[str] | None = None


class Demo:
    def __init__(self, options: Options, out: TextIO) -> None:
        self.options = options
        self.out = out
        self.keys = {AMQP_DEVICE: _random_key(), MQTT_DEVICE: _random_key()}
        self.group_key = _random_key()
        self.workdir = Path(tempfile.mkdtemp(prefix="iot-gateway-demo-"))
        self.hub: HubSim | None = None
        self.gateway: GatewayProcess | None = None
        self.ports: GatewayPorts | None = None
        self._print_lock = threading.Lock()

    def say(self, line: str = "") -> None:
        with self._print_lock:
            print(line, file=self.out, flush=True)

    # -- the whole run -----------------------------------------------------------------

    def run(self) -> int:
        ok = False
        try:
            ok = self._run()
            if ok and self.options.keep_running:
                ok = self._keep_running()
            return 0 if ok else 1
        except KeyboardInterrupt:
            self.say("interrupted")
            return 130
        except Exception as exc:  # anything unforeseen still ends in a clear line and teardown
            if self.options.verbose:
                traceback.print_exc(file=self.out)
            self.say(f"FAILED: {type(exc).__name__}: {exc}")
            return 1
        finally:
            self._teardown(keep_files=self.options.keep_files or not ok)

    def _run(self) -> bool:
        started = time.monotonic()
        self.say(
            "iot-gateway demo: an IoT Hub emulator with its provisioning service, the gateway "
            "and three sample devices"
        )
        hub = self._start_hub()
        ready = self._start_gateway(hub)
        if not ready.open_ports:
            return False
        c2d_id = hub.send_c2d(
            AMQP_DEVICE,
            C2D_COMMAND,
            {"content_type": "application/json"},
            {"priority": "high"},
        )
        reports = self._run_devices(hub, ready, c2d_id)
        problems = [r for r in reports if not r.ok]
        status = self.gateway.poll() if self.gateway else None
        self.say()
        for report in reports:
            for line in report.render():
                self.say(line)
            self.say()
        if status is not None:
            self.say(f"FAILED: the gateway exited with status {status} during the demo")
            self._show_log_tail()
            return False
        elapsed = time.monotonic() - started
        if problems:
            failed = ", ".join(r.title.split(":")[0] for r in problems)
            self.say(f"Result: FAILED ({failed}) after {elapsed:.1f} s")
            self._show_log_tail()
            return False
        self.say(
            f"Result: OK in {elapsed:.1f} s. Every device's traffic crossed the gateway in "
            "plaintext on the device side and TLS towards the hub"
            + (" (over WebSockets)" if self.options.transport == "websockets" else "")
            + "; the provisioning service assigned the new device, and the hub recorded every "
            "message byte for byte."
        )
        return True

    # -- steps ---------------------------------------------------------------------------

    def _start_hub(self) -> HubSim:
        websockets = self.options.transport == "websockets"
        hub = HubSim(
            dict(self.keys), hub_host=HUB_HOST, dps_scope=DPS_SCOPE,
            dps_group_keys={DPS_GROUP: self.group_key}, dps_amqp_port=None,
            ws_port=0 if websockets else None,
        )  # fmt: skip
        self.hub = hub
        hub.start()
        ws = f", wss {LOOPBACK}:{hub.ws_port}/$iothub/websocket" if websockets else ""
        self.say(
            f"  hub emulator  {HUB_HOST}: amqps {LOOPBACK}:{hub.amqp_port}, "
            f"mqtts {LOOPBACK}:{hub.mqtt_port}{ws} (TLS, throwaway CA)"
        )
        self.say(
            f"  provisioning  ID scope {DPS_SCOPE}: mqtts {LOOPBACK}:{hub.dps_mqtt_port}, "
            f"enrollment group {DPS_GROUP}, assigns to {HUB_HOST}"
        )
        return hub

    def _start_gateway(self, hub: HubSim) -> Readiness:
        # The ports are picked free, then released for the gateway to bind: another
        # process on the machine can take one in between. Fresh ports cure that.
        for _ in range(PORT_ATTEMPTS):
            ready = self._launch_gateway(hub)
            if ready.exited is None or not self._lost_a_port(ready.exited):
                break
            self.say("  gateway       one of its ports was taken meanwhile; again with new ports")
        if ready.exited is not None and not ready.open_ports:
            self.say(f"FAILED: the gateway exited with status {ready.exited} before it listened")
            self._show_log_tail()
        elif not ready.open_ports:
            self.say(f"FAILED: the gateway opened no listener within {READY_TIMEOUT:g} s")
            self._show_log_tail()
        elif len(ready.open_ports) < 3:
            self.say(f"  gateway       only some listeners open after {ready.seconds:.1f} s")
        else:
            self.say(f"  gateway       ready in {ready.seconds:.1f} s")
        return ready

    def _lost_a_port(self, status: int) -> bool:
        assert self.gateway is not None
        self.gateway.stop()  # reaps it and lets its output reader finish
        return status == EXIT_ADDRESS

    def _launch_gateway(self, hub: HubSim) -> Readiness:
        assert hub.ca_file is not None and hub.amqp_port and hub.mqtt_port
        amqp, mqtt, admin = pick_free_ports(3)
        self.ports = ports = GatewayPorts(amqp=amqp, mqtt=mqtt, admin=admin)
        endpoint = HubEndpoint(HUB_HOST, hub.amqp_port, hub.mqtt_port, hub.ca_file,
                               hub.dps_mqtt_port, DPS_SCOPE, hub.dps_host_name,
                               ws_port=hub.ws_port)  # fmt: skip
        config_file = self.workdir / "gateway.yaml"
        config_file.write_text(render_config(endpoint, ports), encoding="utf-8")
        log_file = self.workdir / "gateway.log"
        echo = (lambda line: self.say(f"  gateway | {line}")) if self.options.verbose else None
        gateway = GatewayProcess(
            config_file, log_file, echo=echo, command=self.options.gateway_command
        )
        self.gateway = gateway
        gateway.start()
        # The admin port opens last: when it answers, the daemon is fully started (and
        # did not fail on that port after its listeners).
        ready = gateway.wait_ready(
            [ports.amqp, ports.mqtt, ports.admin], READY_TIMEOUT, READY_GRACE
        )

        def state(port: int) -> str:
            return f"{LOOPBACK}:{port}" + ("" if ready.is_open(port) else " (NOT LISTENING)")

        self.say(
            f"  gateway       pid {gateway.pid}: amqp {state(ports.amqp)}, mqtt {state(ports.mqtt)}, "
            f"admin http://{LOOPBACK}:{ports.admin}"
        )
        self.say(f"  gateway files {config_file}, {log_file}")
        return ready

    def _run_devices(self, hub: HubSim, ready: Readiness, c2d_id: str) -> list[DeviceReport]:
        assert self.ports is not None
        ports = self.ports
        self.say(
            f"  devices       {AMQP_DEVICE} (python-qpid-proton), {MQTT_DEVICE} and "
            f"{DPS_DEVICE} (paho-mqtt), plaintext to the gateway"
        )
        amqp_report = DeviceReport(
            f"AMQP device {AMQP_DEVICE}: proton -> gateway amqp://{LOOPBACK}:{ports.amqp} "
            f"(plaintext) -> hub (TLS)"
        )
        mqtt_report = DeviceReport(
            f"MQTT device {MQTT_DEVICE}: paho -> gateway mqtt://{LOOPBACK}:{ports.mqtt} "
            f"(plaintext) -> hub (TLS)"
        )
        dps_report = DeviceReport(
            f"Provisioned device {DPS_DEVICE}: paho -> gateway mqtt://{LOOPBACK}:{ports.mqtt} "
            f"(plaintext) -> provisioning service, then -> its assigned hub (TLS)"
        )
        results: dict[str, Any] = {}
        method_results: list[tuple[int, bytes]] = []
        callers: list[threading.Thread] = []

        def collect(report: DeviceReport, device_id: str) -> Callable[[str], None]:
            def say(line: str) -> None:
                report.device_lines.append(line)
                if self.options.verbose:
                    self.say(f"  {device_id} | {line}")

            return say

        def call_method() -> None:
            name, payload = METHOD
            method_results.append(hub.invoke_method(MQTT_DEVICE, name, payload, STEP_TIMEOUT))

        def on_method_wait() -> None:
            # The service side calls the method once the device listens for it.
            caller = threading.Thread(target=call_method, name="method-call", daemon=True)
            callers.append(caller)
            caller.start()

        def run_amqp() -> None:
            settings = amqp_device.Settings(
                LOOPBACK, ports.amqp, HUB_HOST, AMQP_DEVICE, self.keys[AMQP_DEVICE],
                messages=3, c2d_timeout=STEP_TIMEOUT, timeout=STEP_TIMEOUT,
            )  # fmt: skip
            results["amqp"] = amqp_device.run(settings, collect(amqp_report, AMQP_DEVICE))

        def run_mqtt() -> None:
            settings = mqtt_device.Settings(
                LOOPBACK, ports.mqtt, HUB_HOST, MQTT_DEVICE, self.keys[MQTT_DEVICE],
                messages=2, method_timeout=STEP_TIMEOUT, timeout=STEP_TIMEOUT,
            )  # fmt: skip
            results["mqtt"] = mqtt_device.run(
                settings, collect(mqtt_report, MQTT_DEVICE), on_method_wait
            )

        def run_dps() -> None:
            settings = dps_device.Settings(
                LOOPBACK, ports.mqtt, DPS_SCOPE, DPS_DEVICE, derive_key(self.group_key, DPS_DEVICE),
                messages=2, timeout=STEP_TIMEOUT,
            )  # fmt: skip
            results["dps"] = dps_device.run(settings, collect(dps_report, DPS_DEVICE))

        threads = []
        if ready.is_open(ports.amqp):
            threads.append(threading.Thread(target=run_amqp, name="amqp-device", daemon=True))
        else:
            amqp_report.problems.append(
                f"the gateway is not listening for AMQP on {LOOPBACK}:{ports.amqp}; "
                "the AMQP device was not run"
            )
        if ready.is_open(ports.mqtt):
            threads.append(threading.Thread(target=run_mqtt, name="mqtt-device", daemon=True))
            threads.append(threading.Thread(target=run_dps, name="dps-device", daemon=True))
        else:
            mqtt_report.problems.append(
                f"the gateway is not listening for MQTT on {LOOPBACK}:{ports.mqtt}; "
                "the MQTT device was not run"
            )
        deadline = time.monotonic() + DEVICES_TIMEOUT
        for thread in threads:
            thread.start()
        for thread in threads + callers:
            thread.join(max(0.0, deadline - time.monotonic()))
        for caller in callers:  # started while the device threads ran
            caller.join(max(0.0, deadline - time.monotonic()))

        if ready.is_open(ports.amqp):
            check_amqp(amqp_report, hub, AMQP_DEVICE, results.get("amqp"), c2d_id)
        if ready.is_open(ports.mqtt):
            check_mqtt(
                mqtt_report, hub, MQTT_DEVICE, results.get("mqtt"),
                method_results[0] if method_results else None,
            )  # fmt: skip
            check_dps(dps_report, hub, DPS_DEVICE, results.get("dps"))
        else:
            dps_report.problems.append("the gateway is not listening for MQTT; not run")
        return [amqp_report, mqtt_report, dps_report]

    # -- keep running --------------------------------------------------------------------

    def _keep_running(self) -> bool:
        assert self.hub is not None and self.gateway is not None and self.ports is not None
        hub, ports = self.hub, self.ports
        for n in range(EXTRA_COMMANDS):
            hub.send_c2d(AMQP_DEVICE, b'{"command":"blink","run":%d}' % (n + 2))
        amqp_key, mqtt_key = self.keys[AMQP_DEVICE], self.keys[MQTT_DEVICE]
        q = shlex.quote
        lines = [
            "",
            "The gateway and the hub emulator keep running (demo keys, random, valid only here):",
            f"  hub           {HUB_HOST}  amqps {LOOPBACK}:{hub.amqp_port}  "
            f"mqtts {LOOPBACK}:{hub.mqtt_port}  CA {hub.ca_file}",
            f"  gateway       amqp {LOOPBACK}:{ports.amqp}  mqtt {LOOPBACK}:{ports.mqtt}  "
            f"admin http://{LOOPBACK}:{ports.admin}",
            f"  {AMQP_DEVICE} key {amqp_key}",
            f"  {MQTT_DEVICE} key {mqtt_key}",
            "",
            "Try:",
            f"  python -m gateway.samples.amqp_device --port {ports.amqp} --hub-host {HUB_HOST} "
            f"--device-id {AMQP_DEVICE} --key {q(amqp_key)}",
            f"      ({EXTRA_COMMANDS} more C2D commands are queued for {AMQP_DEVICE})",
            f"  python -m gateway.samples.mqtt_device --port {ports.mqtt} --hub-host {HUB_HOST} "
            f"--device-id {MQTT_DEVICE} --key {q(mqtt_key)} --method-timeout 0",
            f"  python -m gateway.samples.dps_device --port {ports.mqtt} --id-scope {DPS_SCOPE} "
            f"--registration-id dps-sensor-2 --key {q(derive_key(self.group_key, 'dps-sensor-2'))}",
            f"      (any registration id: its key derives from the {DPS_GROUP} group key "
            f"{q(self.group_key)})",
            f"  iot-gateway sas --host {HUB_HOST} --device-id {MQTT_DEVICE} --key {q(mqtt_key)} "
            "--ttl 1h",
            f"  iot-gateway status --admin http://{LOOPBACK}:{ports.admin}",
            f"  curl -s http://{LOOPBACK}:{ports.admin}/metrics",
            f"  tail -f {self.gateway.log_file}",
            "",
            "Press Ctrl-C to stop.",
        ]
        for line in lines:
            self.say(line)
        try:
            status = self.gateway.wait()
        except KeyboardInterrupt:
            self.say("stopping")
            return True
        if status == 0:  # Ctrl-C in the terminal reaches the gateway too; it stopped cleanly
            self.say("the gateway stopped")
            return True
        self.say(f"FAILED: the gateway exited with status {status}")
        self._show_log_tail()
        return False

    # -- teardown ------------------------------------------------------------------------

    def _show_log_tail(self) -> None:
        if self.gateway is None:
            return
        tail = self.gateway.tail()
        if not tail:
            self.say(f"  (the gateway wrote nothing to {self.gateway.log_file})")
            return
        self.say(f"  last lines of {self.gateway.log_file}:")
        for line in tail:
            self.say(f"    {line}")

    def _teardown(self, keep_files: bool) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            if self.gateway.killed:
                self.say("warning: the gateway did not stop within 5 s of SIGTERM; killed it")
            elif self.gateway.stop_seconds is not None and self.gateway.stop_status != 0:
                self.say(f"warning: the gateway exited with status {self.gateway.stop_status}")
        if self.hub is not None:
            self.hub.close()
        if keep_files:
            self.say(f"files kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _random_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()
