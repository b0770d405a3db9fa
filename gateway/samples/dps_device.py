"""A sample device that provisions through iot-gateway, then sends telemetry to its hub.

It does over MQTT 3.1.1 (paho-mqtt) what the Azure IoT SDKs' provisioning clients do:

1. CONNECT to the Device Provisioning Service, client id = registration id, user
   name ``{idScope}/registrations/{regId}/api-version=2019-03-31``, password a
   registration SAS token (``sr={idScope}/registrations/{regId}``,
   ``skn=registration``) signed with the device key; SUBSCRIBE
   ``$dps/registrations/res/#``.
2. PUBLISH ``$dps/registrations/PUT/iotdps-register/?$rid=1`` with
   ``{"registrationId": ...}``; the service answers 202 ``assigning`` with an
   operation id on ``$dps/registrations/res/202/?$rid=1&retry-after=N``.
3. Poll ``$dps/registrations/GET/iotdps-get-operationstatus/?$rid=..&operationId=..``
   until 200 ``assigned``: the answer names the assigned hub and the device id.
4. CONNECT to that hub as that device (the same key) and send telemetry.

Both connections go to the gateway in plaintext; the gateway routes the first by
its user name to the provisioning service and the second by its hub host.
The device key of a symmetric-key enrollment group member is
``base64(HMAC-SHA256(group key, registration id))``.

    python -m gateway.samples.dps_device --port 1883 --id-scope 0ne000ABC \\
        --registration-id sensor-1 --key BASE64KEY
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import paho.mqtt.client as mqtt

from .common import Say, sas_token

DPS_API_VERSION = "2019-03-31"
HUB_API_VERSION = "2021-04-12"
MAX_POLLS = 20


@dataclass
class Settings:
    host: str
    port: int
    id_scope: str
    registration_id: str
    key: str
    payload: Any = None  # custom allocation data sent with the registration
    messages: int = 2
    timeout: float = 10.0  # each step
    ca_file: str | None = None  # given: TLS straight to host:port (no gateway)


@dataclass
class Telemetry:
    topic: str
    payload: bytes
    acknowledged: bool


@dataclass
class Result:
    registration_status: str | None = None
    operation_id: str | None = None
    polls: int = 0
    assigned_hub: str | None = None
    device_id: str | None = None
    telemetry: list[Telemetry] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class DeviceError(Exception):
    pass


class _Client:
    """A paho client whose callbacks land in a queue the steps read with timeouts."""

    def __init__(self, settings: Settings, client_id: str, username: str, password: str) -> None:
        self.settings = settings
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
            clean_session=True, reconnect_on_failure=False,
        )  # fmt: skip
        self.client.username_pw_set(username, password)
        if settings.ca_file:
            self.client.tls_set(ca_certs=settings.ca_file)
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.events.put(("connect", rc))
        self.client.on_subscribe = lambda _c, _u, _m, rcs, _p: self.events.put(("suback", rcs))
        self.client.on_message = lambda _c, _u, msg: self.events.put(("message", msg))
        self.client.on_disconnect = lambda _c, _u, _f, rc, _p: self.events.put(("disconnect", rc))

    def expect(self, kind: str, what: str) -> Any:
        deadline = time.monotonic() + self.settings.timeout
        while True:
            try:
                event, value = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DeviceError(f"timed out waiting for {what}") from None
            if event == kind:
                return value
            if event == "disconnect":
                raise DeviceError(f"disconnected while waiting for {what} ({value})")

    def connect(self, what: str) -> None:
        s = self.settings
        self.client.connect(s.host, s.port, keepalive=60)
        self.client.loop_start()
        code = self.expect("connect", f"CONNACK from {what}")
        if code.is_failure:
            raise DeviceError(f"{what} refused the connection: CONNACK {code}")

    def publish(self, topic: str, payload: bytes) -> bool:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(self.settings.timeout)
        return info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run(settings: Settings, say: Say = print) -> Result:
    """Provision, then send telemetry; never raises for a network or protocol failure."""
    result = Result()
    try:
        provision(settings, result, say)
        send_telemetry(settings, result, say)
    except DeviceError as exc:
        result.error = str(exc)
    except Exception as exc:  # socket errors and the like
        result.error = f"{type(exc).__name__}: {exc}"
    if result.error:
        say(f"failed: {result.error}")
    return result


def _answer(dps: _Client, rid: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    """The service's answer to request `rid`: (status, topic parameters, JSON body)."""
    while True:
        msg = dps.expect("message", f"the provisioning service's answer to request {rid}")
        path, _, query = msg.topic.partition("?")
        params = dict(parse_qsl(query))
        if params.get("$rid") == rid and path.startswith("$dps/registrations/res/"):
            status = int(path.rstrip("/").rsplit("/", 1)[1])
            return status, params, json.loads(msg.payload or b"{}")


def provision(s: Settings, result: Result, say: Say) -> None:
    username = f"{s.id_scope}/registrations/{s.registration_id}/api-version={DPS_API_VERSION}"
    resource = f"{s.id_scope}/registrations/{s.registration_id}"
    token = sas_token(resource, s.key) + "&skn=registration"
    dps = _Client(s, s.registration_id, username, token)
    dps.connect("the provisioning service")
    try:
        say(f"connected to the provisioning service as registration {s.registration_id} "
            f"(ID scope {s.id_scope})")  # fmt: skip
        dps.client.subscribe("$dps/registrations/res/#", qos=1)
        dps.expect("suback", "SUBACK")
        body: dict[str, Any] = {"registrationId": s.registration_id}
        if s.payload is not None:
            body["payload"] = s.payload
        dps.publish("$dps/registrations/PUT/iotdps-register/?$rid=1", json.dumps(body).encode())
        status, params, answer = _answer(dps, "1")
        say(f"register: {status} {answer.get('status')}")
        for poll in range(2, MAX_POLLS + 2):
            if status >= 300:
                raise DeviceError(f"the provisioning service answered {status}: {answer}")
            result.registration_status = answer.get("status")
            result.operation_id = answer.get("operationId") or result.operation_id
            if result.registration_status != "assigning":
                break
            time.sleep(min(float(params.get("retry-after", 1)), 5.0))  # the service's pace
            rid = str(poll)
            topic = (f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}"
                     f"&operationId={result.operation_id}")  # fmt: skip
            dps.publish(topic, b" ")
            result.polls += 1
            status, params, answer = _answer(dps, rid)
            say(f"operation status: {status} {answer.get('status')}")
        state = answer.get("registrationState") or {}
        if result.registration_status != "assigned" or not state.get("assignedHub"):
            raise DeviceError(f"registration ended {result.registration_status!r}")
        result.assigned_hub, result.device_id = state["assignedHub"], state["deviceId"]
        say(f"assigned to hub {result.assigned_hub} as device {result.device_id}")
    finally:
        dps.close()


def send_telemetry(s: Settings, result: Result, say: Say) -> None:
    assert result.assigned_hub is not None and result.device_id is not None
    hub, device = result.assigned_hub, result.device_id
    username = f"{hub}/{device}/?api-version={HUB_API_VERSION}"
    client = _Client(s, device, username, sas_token(f"{hub}/devices/{device}", s.key))
    client.connect(f"hub {hub}")
    try:
        say(f"connected to hub {hub} as {device}")
        for n in range(1, s.messages + 1):
            topic = f"devices/{device}/messages/events/"
            payload = json.dumps({"provisioned": True, "seq": n}).encode()
            acked = client.publish(topic, payload)
            result.telemetry.append(Telemetry(topic, payload, acked))
            say(f"telemetry {n}: {len(payload)} bytes, PUBACK {'received' if acked else 'missing'}")
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.samples.dps_device",
        description="Provision through the gateway (DPS over MQTT), then send telemetry.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="gateway host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="gateway MQTT port (default 1883)")
    parser.add_argument("--id-scope", required=True)
    parser.add_argument("--registration-id", required=True)
    parser.add_argument("--key", required=True, help="the device's base64 symmetric key")
    parser.add_argument("--ca-file", help="connect with TLS, trusting this CA (no gateway)")
    parser.add_argument("--messages", type=int, default=2)
    args = parser.parse_args(argv)
    settings = Settings(args.host, args.port, args.id_scope, args.registration_id, args.key,
                        messages=args.messages, ca_file=args.ca_file)  # fmt: skip
    result = run(settings, lambda line: print(f"[{args.registration_id}] {line}", flush=True))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
