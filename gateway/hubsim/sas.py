"""SAS token parsing and verification as IoT Hub does it.

Written independently of ``gateway.auth`` on purpose: the emulator must not
share a bug with the code it tests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import quote_plus, unquote

PREFIX = "SharedAccessSignature "


class TokenError(ValueError):
    """A token that cannot be accepted; ``status`` is the CBS status to answer."""

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


@dataclass(frozen=True)
class SasToken:
    sr_raw: str  # `sr` exactly as sent (signed as sent, never re-encoded)
    sig: bytes
    expiry: int
    skn: str | None

    @property
    def resource(self) -> str:
        return unquote(self.sr_raw)


def parse_token(token: str) -> SasToken:
    if not token.startswith(PREFIX):
        raise TokenError(401, "not a SharedAccessSignature token")
    fields: dict[str, str] = {}
    for part in token[len(PREFIX) :].split("&"):
        name, sep, value = part.partition("=")
        if not sep or name in fields:
            raise TokenError(401, "malformed token")
        fields[name] = value
    if not {"sr", "sig", "se"} <= fields.keys():
        raise TokenError(401, "token lacks sr, sig or se")
    try:
        sig = base64.b64decode(unquote(fields["sig"]), validate=True)
        expiry = int(fields["se"])
    except (binascii.Error, ValueError) as exc:
        raise TokenError(401, "malformed token") from exc
    return SasToken(fields["sr"], sig, expiry, fields.get("skn"))


def signature_ok(token: SasToken, key_b64: str) -> bool:
    try:
        key = base64.b64decode(key_b64, validate=True)
    except binascii.Error:
        return False
    text = f"{token.sr_raw}\n{token.expiry}".encode()
    expected = hmac.new(key, text, hashlib.sha256).digest()
    return hmac.compare_digest(expected, token.sig)


def resource_covers(resource: str, target: str) -> bool:
    """Segment-prefix scope: `h/devices/a` covers `h/devices/a/modules/m`, not `h/devices/ab`.

    The host part compares case-insensitively, the path case-sensitively.
    """

    def split(uri: str) -> tuple[str, list[str]]:
        host, _, path = uri.strip("/").partition("/")
        return host.lower(), [s for s in path.split("/") if s]

    r_host, r_path = split(resource)
    t_host, t_path = split(target)
    return r_host == t_host and t_path[: len(r_path)] == r_path


def make_token(resource_uri: str, key_b64: str, expiry: int, policy: str | None = None) -> str:
    """Build a token the way the SDKs do (used by the CLI help and local tooling)."""
    sr = quote_plus(resource_uri)
    key = base64.b64decode(key_b64)
    sig = base64.b64encode(hmac.new(key, f"{sr}\n{expiry}".encode(), hashlib.sha256).digest())
    token = f"{PREFIX}sr={sr}&sig={quote_plus(sig.decode())}&se={expiry}"
    return token + (f"&skn={policy}" if policy else "")
