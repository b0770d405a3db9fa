"""What both sample devices share: the SAS token, the command line and the output."""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote_plus

Say = Callable[[str], None]


def sas_token(resource_uri: str, key_b64: str, ttl_seconds: int = 3600) -> str:
    """An IoT Hub SAS token for ``resource_uri``, signed with the device key.

    sig = base64(HMAC-SHA256(key, url-encoded resource + "\\n" + expiry)).
    """
    expiry = int(time.time()) + ttl_seconds
    encoded_uri = quote_plus(resource_uri)
    signed = f"{encoded_uri}\n{expiry}".encode()
    digest = hmac.new(base64.b64decode(key_b64), signed, hashlib.sha256).digest()
    signature = quote_plus(base64.b64encode(digest).decode())
    return f"SharedAccessSignature sr={encoded_uri}&sig={signature}&se={expiry}"


@dataclass
class DeviceSettings:
    """Where a sample connects and who it is; each sample adds its own steps' settings."""

    host: str
    port: int
    hub_host: str
    device_id: str
    key: str
    ca_file: str | None = None  # given: TLS straight to host:port, trusting this CA


def device_arguments(
    prog: str, description: str, *, protocol: str, port: int, messages: int
) -> argparse.ArgumentParser:
    """A parser with the options every sample takes: where to connect and who the device is."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1", help="gateway host (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=port, help=f"gateway {protocol} port (default {port})"
    )
    parser.add_argument(
        "--hub-host", required=True, help="the IoT Hub host, e.g. myhub.azure-devices.net"
    )
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--key", required=True, help="the device's base64 symmetric key")
    parser.add_argument("--ca-file", help="connect with TLS, trusting this CA (no gateway)")
    parser.add_argument("--messages", type=int, default=messages, help="telemetry messages to send")
    return parser


def device_say(device_id: str) -> Say:
    """Prints each line tagged with the device id, at once (the demo interleaves devices)."""
    return lambda line: print(f"[{device_id}] {line}", flush=True)
