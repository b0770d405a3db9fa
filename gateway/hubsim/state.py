"""The hub's service-side state, shared by the AMQP and MQTT fronts.

Device registry and token checks, device twins, C2D queues with lock/complete/
reject/abandon, and direct-method calls. Everything here runs on the hub's I/O
thread; ``HubSim`` marshals API calls onto it.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote

from .records import DispositionRecord, FeedbackRecord, Recorder
from .sas import TokenError, parse_token, resource_covers, signature_ok

CBS_TOKEN_TYPES = ("servicebus.windows.net:sastoken", "azure-devices.net:sastoken")
SERVICE = "$service"  # identity a policy token for the hub itself authorises
MAX_DELIVERY_COUNT = 10  # the hub's default maxDeliveryCount
C2D_QUEUE_DEPTH = 50


class QueueFull(RuntimeError):
    pass


@dataclass
class C2DMessage:
    identity: str
    message_id: str
    body: bytes
    properties: dict[str, Any]  # message_id, correlation_id, content_type, content_encoding, user_id
    app_properties: dict[str, Any]
    delivery_count: int = 0
    holder: C2DConsumer | None = None  # the consumer holding the lock, if delivered


class C2DConsumer(Protocol):
    protocol: str

    def offer(self, msg: C2DMessage) -> bool:
        """Deliver now if possible; True once the message is on its way."""
        ...


class TwinWatcher(Protocol):
    def desired_changed(self, patch: dict[str, Any], version: int) -> None: ...


class MethodTarget(Protocol):
    def send_method(self, call: MethodCall) -> bool: ...


@dataclass
class MethodCall:
    identity: str
    name: str
    payload: bytes
    request_id: str
    future: concurrent.futures.Future[tuple[int, bytes]]


@dataclass
class Twin:
    desired: dict[str, Any] = field(default_factory=dict)
    reported: dict[str, Any] = field(default_factory=dict)
    desired_version: int = 1
    reported_version: int = 1

    def document(self) -> dict[str, Any]:
        return {
            "desired": {**self.desired, "$version": self.desired_version},
            "reported": {**self.reported, "$version": self.reported_version},
        }


def merge_patch(doc: dict[str, Any], patch: dict[str, Any]) -> None:
    """Twin patch semantics: nested merge, null deletes."""
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            doc.pop(key, None)
        elif isinstance(value, dict) and isinstance(doc.get(key), dict):
            merge_patch(doc[key], value)
        else:
            doc[key] = value


@dataclass(frozen=True)
class TokenCheck:
    status: int
    description: str
    identity: str | None = None
    expiry: float = 0.0


def identity_from_path(segments: list[str]) -> str | None:
    """`devices/{id}` or `devices/{id}/modules/{mid}` (already split and decoded)."""
    if len(segments) == 2 and segments[0] == "devices" and segments[1]:
        return segments[1]
    if (
        len(segments) == 4
        and segments[0] == "devices"
        and segments[2] == "modules"
        and segments[1]
        and segments[3]
    ):
        return f"{segments[1]}/{segments[3]}"
    return None


class HubState:
    def __init__(
        self,
        hub_host: str,
        devices: dict[str, str],
        policies: dict[str, str],
        recorder: Recorder,
        token_skew: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.hub_host = hub_host
        self.hub_name = hub_host.split(".", 1)[0]
        self.devices = dict(devices)
        self.policies = dict(policies)
        self.recorder = recorder
        self.token_skew = token_skew
        self.clock = clock
        self.twins: dict[str, Twin] = {}
        self.c2d: dict[str, deque[C2DMessage]] = {}
        self.c2d_consumers: dict[str, list[C2DConsumer]] = {}
        self.twin_watchers: dict[str, list[TwinWatcher]] = {}
        self.method_targets: dict[str, list[MethodTarget]] = {}
        self.pending_methods: dict[str, MethodCall] = {}
        self.feedback_sinks: list[Callable[[FeedbackRecord], None]] = []
        self._ids = itertools.count(1)

    # -- authentication -------------------------------------------------------

    def resource_of(self, identity: str) -> str:
        dev, _, mod = identity.partition("/")
        return f"{self.hub_host}/devices/{dev}" + (f"/modules/{mod}" if mod else "")

    def check_token(self, token: object, audience: str) -> TokenCheck:
        """Check a SAS token for an audience (a device/module URI or the hub itself)."""
        # The Node.js SDK percent-encodes its CBS audience; IoT Hub accepts either form.
        aud = unquote(audience)
        for scheme in ("amqps://", "mqtts://", "https://"):
            if aud.lower().startswith(scheme):
                aud = aud[len(scheme) :]
        host, _, path = aud.strip("/").partition("/")
        if host.lower() != self.hub_host.lower():
            return TokenCheck(404, f"audience {audience!r} is not on this hub")
        segments = [s for s in path.split("/") if s]
        identity = SERVICE if not segments else identity_from_path(segments)
        if identity is None:
            return TokenCheck(400, f"audience {audience!r} is not a device or module address")
        if identity != SERVICE and identity not in self.devices:
            return TokenCheck(404, f"device {identity!r} is not registered")
        if not isinstance(token, str):
            return TokenCheck(400, "token must be a string")
        try:
            parsed = parse_token(token)
        except TokenError as exc:
            return TokenCheck(exc.status, exc.description)
        if not resource_covers(parsed.resource, aud):
            return TokenCheck(401, "token resource does not cover the audience")
        if parsed.skn is not None:
            key = self.policies.get(parsed.skn)
            if key is None:
                return TokenCheck(401, f"unknown policy {parsed.skn!r}")
        elif identity == SERVICE:
            return TokenCheck(401, "a hub-level token needs a policy (skn)")
        else:
            key = self.devices[identity]
        if not signature_ok(parsed, key):
            return TokenCheck(401, "signature does not match")
        if parsed.expiry + self.token_skew <= self.clock():
            return TokenCheck(401, "token expired")
        return TokenCheck(200, "OK", identity, float(parsed.expiry))

    def put_token(self, operation: object, token_type: object, name: object, token: object) -> TokenCheck:
        if operation != "put-token":
            return TokenCheck(400, f"unsupported operation {operation!r}")
        if token_type not in CBS_TOKEN_TYPES:
            return TokenCheck(400, f"unsupported token type {token_type!r}")
        if not isinstance(name, str) or not name:
            return TokenCheck(400, "missing audience (name)")
        return self.check_token(token, name)

    def token_valid_until(self, expiry: float) -> float:
        return expiry + self.token_skew

    # -- twins ------------------------------------------------------------------

    def twin(self, identity: str) -> Twin:
        return self.twins.setdefault(identity, Twin())

    def patch_reported(self, identity: str, body: bytes) -> tuple[int, int]:
        """Returns (status, version)."""
        twin = self.twin(identity)
        try:
            patch = json.loads(body or b"{}")
        except ValueError:
            return 400, twin.reported_version
        if not isinstance(patch, dict):
            return 400, twin.reported_version
        merge_patch(twin.reported, patch)
        twin.reported_version += 1
        self.recorder.add("twin-reported", (identity, patch, twin.reported_version))
        return 204, twin.reported_version

    def update_desired(self, identity: str, patch: dict[str, Any]) -> int:
        twin = self.twin(identity)
        merge_patch(twin.desired, patch)
        twin.desired_version += 1
        self.recorder.add("twin-desired", (identity, patch, twin.desired_version))
        for watcher in list(self.twin_watchers.get(identity, ())):
            watcher.desired_changed({**patch, "$version": twin.desired_version}, twin.desired_version)
        return twin.desired_version

    def watch_desired(self, identity: str, watcher: TwinWatcher) -> None:
        watchers = self.twin_watchers.setdefault(identity, [])
        if watcher not in watchers:
            watchers.append(watcher)

    def unwatch_desired(self, identity: str, watcher: TwinWatcher) -> None:
        watchers = self.twin_watchers.get(identity, [])
        if watcher in watchers:
            watchers.remove(watcher)

    # -- cloud-to-device ----------------------------------------------------------

    def enqueue_c2d(
        self,
        identity: str,
        body: bytes,
        properties: dict[str, Any] | None,
        app_properties: dict[str, Any] | None,
    ) -> str:
        queue = self.c2d.setdefault(identity, deque())
        if len(queue) >= C2D_QUEUE_DEPTH:
            raise QueueFull(f"C2D queue of {identity!r} holds {C2D_QUEUE_DEPTH} messages")
        props = dict(properties or {})
        message_id = str(props.setdefault("message_id", str(uuid.uuid4())))
        queue.append(C2DMessage(identity, message_id, body, props, dict(app_properties or {})))
        self.recorder.add("c2d-enqueued", (identity, message_id))
        self.pump_c2d(identity)
        return message_id

    def add_c2d_consumer(self, identity: str, consumer: C2DConsumer) -> None:
        consumers = self.c2d_consumers.setdefault(identity, [])
        if consumer not in consumers:
            consumers.append(consumer)
        self.pump_c2d(identity)

    def remove_c2d_consumer(self, identity: str, consumer: C2DConsumer) -> None:
        consumers = self.c2d_consumers.get(identity, [])
        if consumer in consumers:
            consumers.remove(consumer)
        # Locked messages of a vanished consumer go back to the queue (abandoned).
        for msg in self.c2d.get(identity, ()):
            if msg.holder is consumer:
                msg.holder = None
                self._record_disposition(msg, consumer.protocol, None, "lost")
        self.pump_c2d(identity)

    def pump_c2d(self, identity: str) -> None:
        consumers = self.c2d_consumers.get(identity)
        if not consumers:
            return
        for msg in list(self.c2d.get(identity, ())):
            if msg.holder is not None:
                continue
            # The newest consumer first: a reconnecting device takes over.
            for consumer in reversed(consumers):
                if consumer.offer(msg):
                    msg.holder = consumer
                    break
            else:
                return

    def settle_c2d(
        self,
        msg: C2DMessage,
        protocol: str,
        lock_token: bytes | None,
        outcome: str,
        holder: C2DConsumer | None = None,
    ) -> None:
        """Apply a device's outcome: complete, reject (dead-letter) or abandon.

        With ``holder``, an outcome for a lock that was lost meanwhile (the link
        went away and the message was requeued) is ignored, as the hub ignores
        a stale lock token.
        """
        queue = self.c2d.get(msg.identity, deque())
        if msg not in queue or (holder is not None and msg.holder is not holder):
            return
        self._record_disposition(msg, protocol, lock_token, outcome)
        msg.holder = None
        if outcome in ("accepted", "puback"):
            queue.remove(msg)
            self._feedback(msg, "Success")
        elif outcome == "rejected":
            queue.remove(msg)
            self._feedback(msg, "Rejected")
        else:  # released, modified: abandoned, delivered again with a higher count
            msg.delivery_count += 1
            if msg.delivery_count >= MAX_DELIVERY_COUNT:
                queue.remove(msg)
                self._feedback(msg, "DeliveryCountExceeded")
        self.pump_c2d(msg.identity)

    def _record_disposition(
        self, msg: C2DMessage, protocol: str, lock_token: bytes | None, outcome: str
    ) -> None:
        self.recorder.add(
            "disposition",
            DispositionRecord(
                msg.identity, protocol, msg.message_id, lock_token, outcome, msg.delivery_count  # type: ignore[arg-type]
            ),
        )

    def _feedback(self, msg: C2DMessage, status: str) -> None:
        record = FeedbackRecord(msg.identity, msg.message_id, status)
        self.recorder.add("feedback", record)
        for sink in list(self.feedback_sinks):
            sink(record)

    # -- direct methods -------------------------------------------------------------

    def add_method_target(self, identity: str, target: MethodTarget) -> None:
        targets = self.method_targets.setdefault(identity, [])
        if target not in targets:
            targets.append(target)

    def remove_method_target(self, identity: str, target: MethodTarget) -> None:
        targets = self.method_targets.get(identity, [])
        if target in targets:
            targets.remove(target)

    def start_method(
        self,
        identity: str,
        name: str,
        payload: bytes,
        future: concurrent.futures.Future[tuple[int, bytes]],
    ) -> str:
        call = MethodCall(identity, name, payload, f"{next(self._ids):x}", future)
        for target in reversed(self.method_targets.get(identity, [])):
            self.pending_methods[call.request_id] = call
            if target.send_method(call):
                self.recorder.add("method-request", (identity, name, call.request_id))
                return call.request_id
            del self.pending_methods[call.request_id]
        future.set_result((404, b'{"message":"device is not online or not subscribed to methods"}'))
        return call.request_id

    def complete_method(self, request_id: str, status: int, payload: bytes) -> None:
        call = self.pending_methods.pop(request_id, None)
        if call is None:
            self.recorder.add("method-response-unmatched", (request_id, status))
            return
        self.recorder.add("method-response", (call.identity, call.name, status, payload))
        if not call.future.done():
            call.future.set_result((status, payload))

    def forget_method(self, request_id: str) -> None:
        self.pending_methods.pop(request_id, None)
