"""IoT Hub shared access signature (SAS) tokens: generate, parse, verify.

Token form: ``SharedAccessSignature sr={enc-uri}&sig={enc-sig}&se={expiry}[&skn={policy}]``
where ``sig = base64(HMAC-SHA256(base64decode(key), enc-uri + "\\n" + expiry))`` and
``enc-uri`` is the resource URI percent-encoded with ``quote_plus`` (``/`` -> ``%2F``).
A verifier signs ``sr`` exactly as sent (SDKs differ in the case of ``%2f``) and
URL-decodes ``sig``; it never re-encodes anything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass, field
from urllib.parse import quote_plus, unquote, unquote_plus

SAS_PREFIX = "SharedAccessSignature "


class SasTokenError(ValueError):
    """A token that is malformed or fails verification; ``reason`` is a short code:
    ``malformed``, ``expired``, ``audience`` or ``signature``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SasToken:
    sr: str  # the resource URI exactly as sent (percent-encoded)
    sig: str = field(repr=False)  # as sent (percent-encoded); replayable, so kept out of repr
    se: int
    skn: str | None = None

    @property
    def resource_uri(self) -> str:
        """The decoded resource URI, e.g. ``myhub.azure-devices.net/devices/dev1``."""
        return unquote_plus(self.sr)

    @property
    def signature(self) -> str:
        """The base64 signature, URL-decoded (``+`` left as is: it is base64, not a space)."""
        return unquote(self.sig)


def _key_bytes(key_b64: str) -> bytes:
    try:
        return base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key is not valid base64") from None


def _sign(key: bytes, encoded_uri: str, expiry: int) -> str:
    message = f"{encoded_uri}\n{expiry}".encode()
    return base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode("ascii")


def device_resource_uri(host: str, device_id: str, module_id: str | None = None) -> str:
    """``{host}/devices/{device_id}[/modules/{module_id}]``, not encoded (the token encodes it)."""
    uri = f"{host}/devices/{device_id}"
    if module_id:
        uri += f"/modules/{module_id}"
    return uri


def generate_sas_token(
    resource_uri: str, key_b64: str, expiry: int, policy_name: str | None = None
) -> str:
    """A SAS token for ``resource_uri`` valid until ``expiry`` (Unix seconds).

    With ``policy_name`` the token carries ``skn`` (a shared access policy token);
    ``sr`` stays the device URI. ``skn`` is not part of the signed text.
    """
    expiry = int(expiry)
    encoded_uri = quote_plus(resource_uri)
    sig = _sign(_key_bytes(key_b64), encoded_uri, expiry)
    token = f"{SAS_PREFIX}sr={encoded_uri}&sig={quote_plus(sig)}&se={expiry}"
    if policy_name:
        token += f"&skn={quote_plus(policy_name)}"
    return token


def parse_sas_token(token: str) -> SasToken:
    """Split a token into its fields (in any order: split on ``&``, then the first ``=``)."""
    if not token.startswith(SAS_PREFIX):
        raise SasTokenError("malformed", "not a SharedAccessSignature token")
    fields: dict[str, str] = {}
    for part in token[len(SAS_PREFIX) :].strip().split("&"):
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise SasTokenError("malformed", f"malformed token field {name[:16]!r}")
        if name in fields:
            raise SasTokenError("malformed", f"duplicate token field {name!r}")
        fields[name] = value
    missing = [name for name in ("sr", "sig", "se") if not fields.get(name)]
    if missing:
        raise SasTokenError("malformed", f"token lacks {', '.join(missing)}")
    try:
        expiry = int(fields["se"])
    except ValueError:
        raise SasTokenError("malformed", "token expiry (se) is not an integer") from None
    skn = fields.get("skn")
    return SasToken(
        sr=fields["sr"],
        sig=fields["sig"],
        se=expiry,
        skn=unquote_plus(skn) if skn else None,
    )


def _covers(scope: str, audience: str) -> bool:
    """``scope`` covers ``audience`` if it is a whole-segment prefix of it.

    The host (first segment) compares case-insensitively; ids are case-sensitive.
    """
    scope_parts = scope.strip("/").split("/")
    audience_parts = audience.strip("/").split("/")
    if len(scope_parts) > len(audience_parts):
        return False
    if scope_parts[0].lower() != audience_parts[0].lower():
        return False
    return scope_parts[1:] == audience_parts[1 : len(scope_parts)]


def check_sas_token(
    token: str, key_b64: str, now: float, audience: str | None = None, *, skew: float = 0.0
) -> SasToken:
    """Verify a token and return it parsed; raise SasTokenError(reason) otherwise.

    ``audience`` (a decoded resource URI, e.g. ``host/devices/dev1``) must be
    covered by the token's ``sr``. ``skew`` seconds of clock difference are allowed.
    """
    parsed = parse_sas_token(token)
    if parsed.se + skew <= now:
        raise SasTokenError("expired", f"token expired at {parsed.se}")
    if audience is not None and not _covers(parsed.resource_uri, audience):
        raise SasTokenError("audience", "token resource (sr) does not cover the audience")
    expected = _sign(_key_bytes(key_b64), parsed.sr, parsed.se)
    if not hmac.compare_digest(expected.encode(), parsed.signature.encode()):
        raise SasTokenError("signature", "token signature does not match the key")
    return parsed


def verify_sas_token(
    token: str, key_b64: str, now: float, audience: str | None = None, *, skew: float = 0.0
) -> bool:
    """True if the token is well formed, unexpired, covers ``audience`` and is signed by the key."""
    try:
        check_sas_token(token, key_b64, now, audience, skew=skew)
    except SasTokenError:
        return False
    return True
