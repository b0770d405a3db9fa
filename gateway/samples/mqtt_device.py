"""A sample MQTT 3.1.1 device on paho-mqtt, talking to IoT Hub through iot-gateway.

The device speaks plaintext MQTT to the gateway (or, given --ca-file, TLS straight
to a hub) and does what the Azure IoT SDKs do over MQTT:

1. CONNECT with client id = device id, username
   ``{hub}/{device}/?api-version=2021-04-12`` and a SAS token computed here from
   the device key as password.
2. Telemetry at QoS 1 on ``devices/{id}/messages/events/{property bag}``: the
   bag carries system properties (``$.ct`` content type, ``$.ce`` encoding)
   and application properties, percent-encoded.
3. Device twin: GET the twin, then PATCH reported properties; the hub answers on
   ``$iothub/twin/res/{status}/?$rid={request id}``.
4. A direct method: it waits for ``$iothub/methods/POST/{name}/?$rid=...`` and
   answers on ``$iothub/methods/res/{status}/?$rid=...``.

    python -m gateway.samples.mqtt_device --host 127.0.0.1 --port 1883 \\
        --hub-host myhub.azure-devices.net --device-id dev2 --key BASE64KEY
"""

from __future__ import annotations

import json
import queue
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import paho.mqtt.client as mqtt

from .common import DeviceSettings, Say, device_arguments, device_say, sas_token

API_VERSION = "2021-04-12"


def property_bag(properties: dict[str, str]) -> str:
    """``k=v&k2=v2`` with names and values percent-encoded (``$`` kept, as the hub reads it)."""
    return "&".join(f"{quote(k, safe='$.')}={quote(v, safe='')}" for k, v in properties.items())


def split_topic(topic: str) -> tuple[list[str], dict[str, str]]:
    """``$iothub/twin/res/204/?$rid=2&$version=3`` -> (["$iothub", ...], {"$rid": "2", ...})."""
    path, _, query = topic.partition("?")
    params = {}
    for pair in filter(None, query.split("&")):
        name, _, value = pair.partition("=")
        params[unquote(name)] = unquote(value)
    return [part for part in path.split("/") if part], params


@dataclass
class Settings(DeviceSettings):
    messages: int = 2
    method_timeout: float = 10.0  # how long to wait for a direct method; 0 = do not wait
    timeout: float = 10.0  # every other step
    keepalive: int = 60


@dataclass
class Telemetry:
    topic: str
    payload: bytes
    acknowledged: bool  # PUBACK received


@dataclass
class MethodCall:
    name: str
    request_id: str
    payload: bytes
    status: int  # what the device answered
    response: bytes


@dataclass
class Result:
    """What the device did and saw; ``error`` says where it stopped, if it did."""

    connack: str | None = None
    telemetry: list[Telemetry] = field(default_factory=list)
    twin: dict[str, Any] | None = None  # the document GET returned
    twin_get_status: int | None = None
    reported: dict[str, Any] = field(default_factory=dict)
    reported_status: int | None = None
    reported_version: int | None = None
    method: MethodCall | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class DeviceError(Exception):
    pass


class Device:
    """A paho client whose callbacks land in a queue the steps read with timeouts."""

    def __init__(self, settings: Settings, say: Say) -> None:
        self.settings = settings
        self.say = say
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=settings.device_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,  # as the SDKs: subscriptions and queued C2D survive reconnects
            reconnect_on_failure=False,
        )
        username = f"{settings.hub_host}/{settings.device_id}/?api-version={API_VERSION}"
        resource = f"{settings.hub_host}/devices/{settings.device_id}"
        self.client.username_pw_set(username, sas_token(resource, settings.key))
        if settings.ca_file:
            self.client.tls_set(ca_certs=settings.ca_file)
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.events.put(("connect", rc))
        self.client.on_subscribe = lambda _c, _u, _m, rcs, _p: self.events.put(("suback", rcs))
        self.client.on_message = lambda _c, _u, msg: self.events.put(("message", msg))
        self.client.on_disconnect = lambda _c, _u, _f, rc, _p: self.events.put(("disconnect", rc))
        self._next_rid = 0

    def expect(
        self,
        kind: str,
        what: str,
        match: Callable[[Any], bool] = lambda _: True,
        timeout: float | None = None,
    ) -> Any:
        """The next event of ``kind`` that matches; a disconnect or the timeout fails."""
        deadline = time.monotonic() + (self.settings.timeout if timeout is None else timeout)
        while True:
            try:
                event, value = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DeviceError(f"timed out waiting for {what}") from None
            if event == kind and match(value):
                return value
            if event == "disconnect":
                raise DeviceError(f"disconnected while waiting for {what} ({value})")

    def request_id(self) -> str:
        self._next_rid += 1
        return str(self._next_rid)

    def publish(self, topic: str, payload: bytes, qos: int) -> bool:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(self.settings.timeout)  # QoS 1: until PUBACK; QoS 0: until sent
        return info.is_published()


def run(
    settings: Settings, say: Say = print, on_method_wait: Callable[[], None] | None = None
) -> Result:
    """Run the whole sample; never raises for a network or protocol failure.

    ``on_method_wait`` is called when the device starts waiting for a direct method.
    """
    result = Result()
    device = Device(settings, say)
    started = False
    try:
        connect(device, result)
        started = True
        subscribe(device)
        send_telemetry(device, result)
        twin_get(device, result)
        twin_report(device, result)
        if settings.method_timeout > 0:
            answer_method(device, result, on_method_wait)
    except DeviceError as exc:
        result.error = str(exc)
    except Exception as exc:  # socket errors and the like
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if started:
            device.client.disconnect()
            device.client.loop_stop()
    if result.error:
        say(f"failed: {result.error}")
    return result


def connect(device: Device, result: Result) -> None:
    s = device.settings
    device.client.connect(s.host, s.port, keepalive=s.keepalive)
    device.client.loop_start()
    code = device.expect("connect", "CONNACK")
    result.connack = str(code)
    transport = "TLS" if s.ca_file else "plaintext"
    device.say(f"connected to {s.host}:{s.port} ({transport}) as {s.device_id}: CONNACK {code}")
    if code.is_failure:
        raise DeviceError(f"connection refused: CONNACK {code}")


def subscribe(device: Device) -> None:
    filters = ["$iothub/twin/res/#", "$iothub/methods/POST/#"]
    device.client.subscribe([(topic, 1) for topic in filters])
    codes = device.expect("suback", "SUBACK")
    if any(code.is_failure for code in codes):
        raise DeviceError(f"subscription refused: {[str(c) for c in codes]}")
    device.say(f"subscribed to {', '.join(filters)}")


def send_telemetry(device: Device, result: Result) -> None:
    s = device.settings
    bag = property_bag({"$.ct": "application/json", "$.ce": "utf-8", "temperatureAlert": "false"})
    topic = f"devices/{s.device_id}/messages/events/{bag}"
    for n in range(1, s.messages + 1):
        reading = {"deviceId": s.device_id, "seq": n, "humidity": 40 + n}
        payload = json.dumps(reading, separators=(",", ":")).encode()
        acknowledged = device.publish(topic, payload, qos=1)
        result.telemetry.append(Telemetry(topic, payload, acknowledged))
        device.say(
            f"telemetry {n} ({len(payload)} bytes, QoS 1): {'PUBACK' if acknowledged else 'no PUBACK'}"
        )
        if not acknowledged:
            raise DeviceError(f"telemetry {n} was not acknowledged")


def twin_response(device: Device, rid: str, what: str) -> tuple[int, dict[str, str], bytes]:
    def is_response(msg: Any) -> bool:
        parts, params = split_topic(msg.topic)
        return parts[:3] == ["$iothub", "twin", "res"] and params.get("$rid") == rid

    msg = device.expect("message", what, is_response)
    parts, params = split_topic(msg.topic)
    return int(parts[3]), params, msg.payload


def twin_get(device: Device, result: Result) -> None:
    rid = device.request_id()
    device.publish(f"$iothub/twin/GET/?$rid={rid}", b"", qos=0)
    status, _, payload = twin_response(device, rid, "the twin")
    result.twin_get_status = status
    if status != 200:
        raise DeviceError(f"twin GET answered {status}")
    result.twin = json.loads(payload)
    device.say(f"twin GET: {status}, desired {json.dumps(result.twin.get('desired', {}))}")


def twin_report(device: Device, result: Result) -> None:
    result.reported = {"firmwareVersion": "1.0.3", "telemetryInterval": 5}
    rid = device.request_id()
    device.publish(
        f"$iothub/twin/PATCH/properties/reported/?$rid={rid}",
        json.dumps(result.reported).encode(),
        qos=0,
    )
    status, params, _ = twin_response(device, rid, "the reported-properties answer")
    result.reported_status = status
    version = params.get("$version")
    result.reported_version = int(version) if version and version.isdigit() else None
    device.say(f"twin reported PATCH {json.dumps(result.reported)}: {status}, version {version}")
    if status not in (200, 204):
        raise DeviceError(f"reported-properties PATCH answered {status}")


def answer_method(
    device: Device, result: Result, on_method_wait: Callable[[], None] | None
) -> None:
    s = device.settings
    device.say(f"waiting up to {s.method_timeout:g} s for a direct method")
    if on_method_wait is not None:
        on_method_wait()

    def is_method(msg: Any) -> bool:
        return split_topic(msg.topic)[0][:3] == ["$iothub", "methods", "POST"]

    msg = device.expect("message", "a direct method call", is_method, timeout=s.method_timeout)
    parts, params = split_topic(msg.topic)
    name, rid = parts[3], params.get("$rid", "")
    status = 200
    response = json.dumps({"result": f"{name} done", "device": s.device_id}).encode()
    device.publish(f"$iothub/methods/res/{status}/?$rid={rid}", response, qos=0)
    result.method = MethodCall(name, rid, bytes(msg.payload), status, response)
    device.say(f"direct method {name} {msg.payload.decode(errors='replace')}: answered {status}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = device_arguments(
        "python -m gateway.samples.mqtt_device",
        "Sample MQTT device: SAS CONNECT, telemetry with a property bag, "
        "twin GET and reported PATCH, a direct method answered.",
        protocol="MQTT",
        port=1883,
        messages=2,
    )
    parser.add_argument(
        "--method-timeout", type=float, default=10.0,
        help="seconds to wait for a direct method call (0: do not wait)",
    )  # fmt: skip
    settings = Settings(**vars(parser.parse_args(argv)))
    result = run(settings, say=device_say(settings.device_id))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
