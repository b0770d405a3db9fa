"""Device keys derived from a group (enrollment) key, as the Device Provisioning Service does.

``device_key = base64(HMAC-SHA256(base64decode(group_key), utf8(registration_id)))``;
for IoT Hub the registration id is the device id. A device provisioned through
a symmetric-key enrollment group holds exactly this key, so the gateway can
hold one group key for a whole fleet instead of one key per device.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac


def derive_device_key(group_key_b64: str, registration_id: str) -> str:
    """The base64 device key for ``registration_id`` under ``group_key_b64``."""
    try:
        group_key = base64.b64decode(group_key_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the group key is not valid base64") from None
    digest = hmac.new(group_key, registration_id.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def registration_of(username: str | None) -> tuple[str, str] | None:
    """``{idScope}/registrations/{regId}[/...]`` -> (idScope, regId), else None.

    The MQTT user name of a provisioning client is
    ``{idScope}/registrations/{regId}/api-version=...``; its AMQP SASL PLAIN user
    and link address are ``{idScope}/registrations/{regId}``. A hub's user name
    starts with the hub's host name, which has dots, where an ID scope has none.
    """
    parts = (username or "").split("?", 1)[0].split("/")
    if len(parts) < 3 or parts[1] != "registrations" or not parts[0] or not parts[2]:
        return None
    if "." in parts[0]:
        return None
    return parts[0], parts[2]


def registration_resource(id_scope: str, registration_id: str) -> str:
    """The resource a registration's SAS token signs (``sr``, before percent-encoding)."""
    return f"{id_scope}/registrations/{registration_id}"
