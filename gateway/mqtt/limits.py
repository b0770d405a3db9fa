"""What a device may send before it is authenticated: bounds on the CONNECT.

A device is authenticated by the hub, after its CONNECT went upstream; until
then anyone on the LAN can send one. IoT Hub accepts only small fields there,
so the relay refuses anything larger before it is buffered whole:

- client id: IoT Hub device and module ids are at most 128 characters each,
  the client id is ``{deviceId}`` or ``{deviceId}/{moduleId}`` (257), a DPS
  registration id at most 128: `MAX_CLIENT_ID` is 512 bytes.
- user name: ``{hub host}/{deviceId}[/{moduleId}]/?api-version=...`` plus SDK
  query parameters (``DeviceClientType``, ``model-id``: a DTMI, URL-encoded):
  a host name of at most 253 characters, the ids and a long query fit in
  `MAX_USERNAME`, 4096 bytes.
- password: a SAS token (``SharedAccessSignature sr={URL-encoded resource
  URI}&sig=...&se=...&skn=...``), about 1 KB for the longest ids; X.509 devices
  send none: `MAX_PASSWORD`, 4096 bytes.
- the whole CONNECT (Will topic and payload included): the listener's
  ``max_connect_size``, `DEFAULT_MAX_CONNECT_SIZE` (16 KiB) unless configured.
  A larger one is refused as soon as its fixed header is read.

`check_connect` judges a parsed CONNECT against the field limits.
"""

from __future__ import annotations

from .constants import ConnackCode
from .packets import Connect

__all__ = [
    "DEFAULT_MAX_CONNECT_SIZE",
    "MAX_CLIENT_ID",
    "MAX_PASSWORD",
    "MAX_USERNAME",
    "check_connect",
    "connect_level",
]

MAX_CLIENT_ID = 512
MAX_USERNAME = 4096
MAX_PASSWORD = 4096
DEFAULT_MAX_CONNECT_SIZE = 16384


def check_connect(connect: Connect) -> tuple[ConnackCode, str] | None:
    """None if the CONNECT's fields are within the limits, else the 3.1.1 CONNACK
    code to refuse it with and why (lengths only: never the values)."""
    client_id = len(connect.client_id.encode("utf-8", "surrogatepass"))
    if client_id > MAX_CLIENT_ID:
        return (
            ConnackCode.IDENTIFIER_REJECTED,
            f"client id of {client_id} bytes (limit {MAX_CLIENT_ID})",
        )
    if connect.username is not None:
        size = len(connect.username.encode("utf-8", "surrogatepass"))
        if size > MAX_USERNAME:
            return (
                ConnackCode.BAD_USERNAME_OR_PASSWORD,
                f"user name of {size} bytes (limit {MAX_USERNAME})",
            )
    password = connect.password
    if password is not None and len(password) > MAX_PASSWORD:
        return (
            ConnackCode.BAD_USERNAME_OR_PASSWORD,
            f"password of {len(password)} bytes (limit {MAX_PASSWORD})",
        )
    return None


def connect_level(data: bytes | bytearray | memoryview) -> int | None:
    """The protocol level of the CONNECT at the start of `data`, None if `data` does
    not hold that far or is not a CONNECT (to answer an oversized one in its version)."""
    if len(data) < 2 or data[0] != 0x10:
        return None
    i = 1
    for _ in range(4):  # the remaining length: 1 to 4 bytes
        if i >= len(data):
            return None
        i += 1
        if not data[i - 1] & 0x80:
            break
    else:
        return None
    if i + 2 > len(data):
        return None
    name_length = (data[i] << 8) | data[i + 1]
    level_at = i + 2 + name_length
    return data[level_at] if level_at < len(data) and name_length <= 6 else None
