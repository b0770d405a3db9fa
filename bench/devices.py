"""Bench device identities and their SAS tokens (computed here with hmac, as a device would)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from urllib.parse import quote_plus

HUB_HOST = "myhub.azure-devices.net"
CBS_TOKEN_TYPE = "servicebus.windows.net:sastoken"
MQTT_API_VERSION = "2021-04-12"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def device_id(index: int) -> str:
    return f"bench-{index:05d}"


def device_uri(device: str, hub_host: str = HUB_HOST) -> str:
    return f"{hub_host}/devices/{device}"


def sas_token(resource: str, key_b64: str, ttl: float = 3600) -> str:
    expiry = int(time.time() + ttl)
    sr = quote_plus(resource)
    digest = hmac.new(base64.b64decode(key_b64), f"{sr}\n{expiry}".encode(), hashlib.sha256)
    sig = quote_plus(base64.b64encode(digest.digest()).decode())
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}"


def mqtt_username(device: str, hub_host: str = HUB_HOST) -> str:
    return f"{hub_host}/{device}/?api-version={MQTT_API_VERSION}"


def telemetry_address(device: str) -> str:
    return f"/devices/{device}/messages/events"


def telemetry_topic(device: str) -> str:
    return f"devices/{device}/messages/events/"
