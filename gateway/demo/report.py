"""What the demo devices did, checked against what the hub recorded (the hub's word)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, TypeGuard, TypeVar

from gateway.hubsim import HubSim
from gateway.samples import amqp_device, dps_device, mqtt_device

RECORD_TIMEOUT = 3.0  # the hub records an outcome right after the device sent it

DeviceResult = TypeVar("DeviceResult", amqp_device.Result, mqtt_device.Result, dps_device.Result)


@dataclass
class DeviceReport:
    """One device's part of the summary: its own lines, the hub's, and what went wrong."""

    title: str
    device_lines: list[str] = field(default_factory=list)
    hub_lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> list[str]:
        lines = [self.title]
        lines += [f"  device  {line}" for line in self.device_lines]
        lines += [f"  hub     {line}" for line in self.hub_lines]
        if self.ok:
            lines.append("  result  OK")
        else:
            lines += [f"  FAILED  {problem}" for problem in self.problems]
        return lines


def short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _device_finished(result: DeviceResult | None, report: DeviceReport) -> TypeGuard[DeviceResult]:
    """Notes a device that did not finish or stopped with an error; False if it did not finish."""
    if result is None:
        report.problems.append("the device did not finish")
        return False
    if result.error:
        report.problems.append(f"device: {result.error}")
    return True


def _connections_line(hub: HubSim, protocol: str, how: str) -> str:
    opened = hub.recorder.connections[protocol].opened
    return f"TLS connections from the gateway: {opened} ({how})"


def check_amqp(
    report: DeviceReport,
    hub: HubSim,
    device_id: str,
    result: amqp_device.Result | None,
    c2d_message_id: str,
) -> None:
    """Compare the AMQP device's view with the hub's records."""
    if not _device_finished(result, report):
        return
    rec = hub.recorder

    report.hub_lines.append(_connections_line(hub, "amqp", "AMQP, pooled"))
    cbs = [c for c in rec.cbs if c.device_id == device_id]
    for decision in cbs:
        report.hub_lines.append(
            f"CBS put-token for {decision.audience}: {decision.status} {decision.description}"
        )
    if not cbs:
        report.problems.append("the hub recorded no CBS put-token for this device")

    received = [d for d in rec.d2c if d.device_id == device_id and d.protocol == "amqp"]
    raws = [d.raw for d in received]
    report.hub_lines.append(f"D2C: {len(received)} message(s) from {device_id}")
    for record in received:
        report.hub_lines.append(
            f"  {record.properties.get('message-id')}: {len(record.raw)} bytes, "
            f"sha256 {short_hash(record.raw)}, properties {_compact(_app_properties(record))}"
        )
    for sent in result.sent:
        if sent.outcome != "accepted":
            continue
        if sent.encoded in raws:
            continue
        report.problems.append(
            f"telemetry {sent.message_id}: accepted, but the hub holds no byte-identical copy"
        )
    accepted = [s for s in result.sent if s.outcome == "accepted"]
    if accepted and all(s.encoded in raws for s in accepted):
        report.hub_lines.append(
            f"  byte-identical to what the device sent: yes ({len(accepted)}/{len(accepted)})"
        )

    if result.command is not None:
        try:
            outcome = rec.wait_for(
                lambda: next((d for d in rec.dispositions if d.message_id == c2d_message_id), None),
                RECORD_TIMEOUT,
            )
        except TimeoutError:
            report.problems.append(f"C2D {c2d_message_id}: the hub recorded no outcome")
        else:
            feedback = next((f for f in rec.feedback if f.message_id == c2d_message_id), None)
            report.hub_lines.append(
                f"C2D {c2d_message_id}: outcome {outcome.outcome}"
                + (f", feedback {feedback.status}" if feedback else "")
            )
            if outcome.outcome != result.command.outcome:
                report.problems.append(
                    f"C2D: the device {result.command.outcome} it, the hub recorded "
                    f"{outcome.outcome}"
                )


def check_mqtt(
    report: DeviceReport,
    hub: HubSim,
    device_id: str,
    result: mqtt_device.Result | None,
    method_result: tuple[int, bytes] | None,
) -> None:
    """Compare the MQTT device's view with the hub's records."""
    if not _device_finished(result, report):
        return
    rec = hub.recorder

    report.hub_lines.append(_connections_line(hub, "mqtt", "MQTT, one per device"))
    connects = [a for a in rec.auth if a.protocol == "mqtt" and a.device_id == device_id]
    for auth in connects:
        verdict = "accepted" if auth.ok else f"refused, CONNACK {auth.code}: {auth.description}"
        report.hub_lines.append(f"CONNECT ({auth.mechanism} token): {verdict}")
    if result.connack is not None and not connects:
        report.problems.append("the hub recorded no CONNECT for this device")

    received = [d for d in rec.d2c if d.device_id == device_id and d.protocol == "mqtt"]
    report.hub_lines.append(f"D2C: {len(received)} message(s) from {device_id}")
    for record in received:
        report.hub_lines.append(
            f"  QoS {record.qos}, {len(record.raw)} bytes, sha256 {short_hash(record.raw)}, "
            f"properties {_compact(record.properties)}"
        )
    at_hub = [(d.topic, d.raw) for d in received]
    acknowledged = [t for t in result.telemetry if t.acknowledged]
    missing = [t for t in acknowledged if (t.topic, t.payload) not in at_hub]
    for _ in missing:
        report.problems.append("telemetry: PUBACK received, but the hub holds no identical copy")
    if acknowledged and not missing:
        report.hub_lines.append(
            f"  topic and payload identical to what the device sent: yes "
            f"({len(acknowledged)}/{len(acknowledged)})"
        )

    if result.reported_status is not None:
        reported = hub.twin(device_id).get("reported", {})
        report.hub_lines.append(f"twin reported properties: {_compact(reported)}")
        if any(reported.get(k) != v for k, v in result.reported.items()):
            report.problems.append("twin: the hub's reported properties miss the device's PATCH")

    if result.method is not None:
        if method_result is None:
            report.problems.append("direct method: the service call did not return")
        else:
            status, payload = method_result
            report.hub_lines.append(
                f"direct method {result.method.name}: status {status}, "
                f"payload {payload.decode(errors='replace')}"
            )
            if (status, payload) != (result.method.status, result.method.response):
                report.problems.append(
                    "direct method: the service got a different answer than the device sent"
                )


def check_dps(
    report: DeviceReport, hub: HubSim, registration_id: str, result: dps_device.Result | None
) -> None:
    """The provisioned device's view against the provisioning service's and the hub's records."""
    if not _device_finished(result, report):
        return
    rec = hub.recorder
    steps = [r for r in rec.dps if r.registration_id == registration_id]
    for step in steps:
        what = {"connect": "CONNECT (registration token)", "register": "register",
                "status": "operation status"}.get(step.operation, step.operation)  # fmt: skip
        report.hub_lines.append(f"provisioning service: {what} -> {step.status}")
    if not any(s.operation == "register" and s.status == 202 for s in steps):
        report.problems.append("the provisioning service recorded no registration")
    if result.assigned_hub is not None:
        if result.assigned_hub != hub.hub_host or result.device_id != registration_id:
            report.problems.append(
                f"assigned {result.assigned_hub}/{result.device_id}, expected "
                f"{hub.hub_host}/{registration_id}"
            )
    received = [d for d in rec.d2c if d.device_id == registration_id]
    report.hub_lines.append(f"D2C: {len(received)} message(s) from {registration_id}")
    at_hub = [(d.topic, d.raw) for d in received]
    acknowledged = [t for t in result.telemetry if t.acknowledged]
    missing = [t for t in acknowledged if (t.topic, t.payload) not in at_hub]
    for _ in missing:
        report.problems.append("telemetry: PUBACK received, but the hub holds no identical copy")
    if acknowledged and not missing:
        report.hub_lines.append(
            f"  topic and payload identical to what the device sent: yes "
            f"({len(acknowledged)}/{len(acknowledged)})"
        )


def _app_properties(record: Any) -> dict[str, Any]:
    return dict(record.app_properties) or {
        k: v for k, v in record.properties.items() if k != "message-id"
    }


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "), default=str, sort_keys=False)
