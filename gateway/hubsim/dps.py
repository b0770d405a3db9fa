"""The emulated Device Provisioning Service: enrollments, registration tokens, operations.

Shared by the DPS fronts (``dps_amqp``, ``dps_mqtt``); runs on the hub's I/O
thread like ``HubState``. A device registers under the one ID scope with a SAS
token (``sr={scope}/registrations/{regId}``, ``skn=registration``) signed with
its individual enrollment key or with the key DPS derives from a symmetric-key
enrollment group; registering answers 202 ``assigning`` with an operation id,
polling that operation answers 200 ``assigned`` with this hub as
``assignedHub`` and the registration id as the device id, and from then on the
device can connect to the hub with the same key.

The key derivation is written here again, not imported from ``gateway.auth``:
the emulator must not share a bug with the code it tests.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .records import Recorder
from .sas import TokenError, parse_token, signature_ok

log = logging.getLogger("gateway.hubsim.dps")

DEFAULT_SCOPE = "0ne00000001"
KEY_NAME = "registration"  # the skn every SDK puts in a registration token
API_VERSION = "2019-03-31"


def derive_key(group_key_b64: str, registration_id: str) -> str:
    """DPS's device key for a symmetric-key enrollment group."""
    key = base64.b64decode(group_key_b64, validate=True)
    return base64.b64encode(hmac.new(key, registration_id.encode(), hashlib.sha256).digest()).decode()


def split_registration(text: str) -> tuple[str, str] | None:
    """``{scope}/registrations/{regId}`` (optionally followed by ``/...``) -> (scope, regId)."""
    parts = text.strip("/").split("/")
    if len(parts) >= 3 and parts[1] == "registrations" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


@dataclass(frozen=True)
class DpsRecord:
    """One provisioning request as the service saw it, and its answer."""

    protocol: str  # dps-amqp | dps-mqtt
    scope: str
    registration_id: str
    operation: str  # register | status | connect
    status: int  # the answer's status (HTTP-like); 401 for a refused connect
    connection: int
    operation_id: str | None = None
    payload: Any = None  # the device's custom allocation payload, if any
    at: float = field(default_factory=time.monotonic)


@dataclass
class Operation:
    operation_id: str
    registration_id: str
    created: str
    payload: Any
    polls: int = 0
    assigned: bool = False


@dataclass(frozen=True)
class DpsAnswer:
    status: int
    body: dict[str, Any]
    retry_after: int | None = None

    def encoded(self) -> bytes:
        return json.dumps(self.body).encode()


def payload_of(body: bytes) -> Any:
    """The custom allocation ``payload`` of a registration request body, if any."""
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        return None
    return doc.get("payload") if isinstance(doc, dict) else None


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z", time.gmtime())


class DpsState:
    def __init__(
        self,
        scope: str,
        hub_host: str,
        hub_devices: dict[str, str],
        recorder: Recorder,
        *,
        group_keys: dict[str, str] | None = None,
        device_keys: dict[str, str] | None = None,
        retry_after: int = 1,
        token_skew: float = 300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.scope = scope
        self.hub_host = hub_host
        self.hub_devices = hub_devices  # the hub's registry: assignment adds the device here
        self.recorder = recorder
        self.group_keys = dict(group_keys or {})
        self.device_keys = dict(device_keys or {})
        self.retry_after = retry_after
        self.token_skew = token_skew
        self.clock = clock
        self.operations: dict[str, Operation] = {}
        self.registrations: dict[str, dict[str, Any]] = {}
        self._keys_pending: dict[str, str] = {}  # operation id -> the key the device proved

    def key_for(self, registration_id: str, token: str) -> str | None:
        """The enrollment key that signed ``token`` for this registration, if any."""
        try:
            parsed = parse_token(token)
        except TokenError:
            return None
        candidates = []
        if registration_id in self.device_keys:
            candidates.append(self.device_keys[registration_id])
        candidates += [derive_key(k, registration_id) for k in self.group_keys.values()]
        for key in candidates:
            if signature_ok(parsed, key):
                return key
        return None

    def check_token(self, scope: str, registration_id: str, token: object) -> tuple[bool, str]:
        """Is ``token`` a valid registration token for (scope, regId)? (ok, why not)."""
        if scope != self.scope:
            return False, f"unknown ID scope {scope!r}"
        if not isinstance(token, str):
            return False, "no SAS token"
        try:
            parsed = parse_token(token)
        except TokenError as exc:
            return False, exc.description
        if parsed.resource != f"{scope}/registrations/{registration_id}":
            return False, "token resource is not this registration"
        if parsed.skn not in (None, KEY_NAME):
            return False, f"token key name {parsed.skn!r} is not {KEY_NAME!r}"
        if self.key_for(registration_id, token) is None:
            return False, "signature does not match an enrollment"
        if parsed.expiry + self.token_skew <= self.clock():
            return False, "token expired"
        return True, "OK"

    def record(self, rec: DpsRecord) -> None:
        self.recorder.add("dps", rec)
        log.info(
            "%s conn %d: %s %s/%s -> %d",
            rec.protocol, rec.connection, rec.operation, rec.scope, rec.registration_id, rec.status,
        )

    # -- operations ---------------------------------------------------------------

    def register(self, registration_id: str, key: str, body: bytes) -> DpsAnswer:
        """A registration request; the device proved ``key`` when it connected."""
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            request = None
        if not isinstance(request, dict):
            return DpsAnswer(400, {"errorCode": 400004, "message": "request body is not a JSON object"})
        if request.get("registrationId", registration_id) != registration_id:
            return DpsAnswer(400, {"errorCode": 400004, "message": "registrationId does not match"})
        op = Operation(str(uuid.uuid4()), registration_id, _now_iso(), request.get("payload"))
        self.operations[op.operation_id] = op
        self._keys_pending[op.operation_id] = key
        return DpsAnswer(
            202, {"operationId": op.operation_id, "status": "assigning"}, self.retry_after
        )

    def operation_status(self, registration_id: str, operation_id: str) -> DpsAnswer:
        op = self.operations.get(operation_id)
        if op is None or op.registration_id != registration_id:
            return DpsAnswer(404, {"errorCode": 404201, "message": "operation not found"})
        op.polls += 1
        if not op.assigned:
            op.assigned = True
            # Assigned to this hub: the device may now connect with its enrollment key.
            self.hub_devices[registration_id] = self._keys_pending.pop(operation_id)
            state: dict[str, Any] = {
                "registrationId": registration_id,
                "createdDateTimeUtc": op.created,
                "assignedHub": self.hub_host,
                "deviceId": registration_id,
                "status": "assigned",
                "substatus": "initialAssignment",
                "lastUpdatedDateTimeUtc": _now_iso(),
                "etag": f'"{uuid.uuid4().hex[:16]}"',
            }
            if op.payload is not None:
                state["payload"] = op.payload
            self.registrations[registration_id] = state
        return DpsAnswer(
            200,
            {
                "operationId": op.operation_id,
                "status": "assigned",
                "registrationState": self.registrations[registration_id],
            },
        )
