"""What to tell an operator when the hub's certificate is not trusted.

Behind a corporate proxy or firewall that inspects TLS, the gateway is shown a
certificate the proxy made, signed by the proxy's own CA, and verification
fails with "unable to get local issuer certificate". OpenSSL's message does
not say which CA that was. `untrusted_ca_hint` connects once more the same way
(through the proxy, if any), completes a handshake without verification only
to read the certificate presented, sends nothing, and returns a hint naming its
issuer and the setting to add that CA to (``tls_profiles.NAME.ca_file``).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .tls_stream import open_tls_stream

__all__ = ["PROBE_TIMEOUT", "issuer_of", "untrusted_ca_hint"]

PROBE_TIMEOUT = 5.0

# OpenSSL names the stdlib uses in decoded certificates, shortened as in a DN.
_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}


def issuer_of(der: bytes) -> str | None:
    """The issuer DN of a DER certificate ("CN=..., O=..."), or None if unreadable."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(ssl.DER_cert_to_PEM_cert(der))
        decoded = decode(path)
    except (ValueError, OSError, ssl.SSLError):
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    parts = []
    for rdn in decoded.get("issuer", ()):
        for key, value in rdn:
            parts.append(f"{_SHORT.get(key, key)}={value}")
    return ", ".join(parts) or None


def _probe_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only to read the certificate; nothing is sent
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def untrusted_ca_hint(
    open_tcp: Callable[[Any, float], Awaitable[tuple[trio.SocketStream, str]]],
    endpoint: Any,
    server_name: str | None,
    profile_name: str | None,
    timeout: float = PROBE_TIMEOUT,
) -> str:
    """A sentence (starting "; ") to append to a certificate verification failure."""
    where = f"tls_profiles.{profile_name}.ca_file" if profile_name else "the tls_profile's ca_file"
    issuer: str | None = None
    with trio.move_on_after(timeout):
        try:
            tcp, _ = await open_tcp(endpoint, timeout)
            stream = await open_tls_stream(tcp, _probe_context(), server_name)
            try:
                der = stream.getpeercert(binary_form=True)
            finally:
                await trio.aclose_forcefully(stream)
            if der:
                issuer = issuer_of(der)
        except Exception:  # a best-effort look: the original error is what is reported
            issuer = None
    if issuer:
        return (
            f"; the certificate presented for {server_name or endpoint.host} was issued by "
            f"'{issuer}', which is not trusted: if a proxy or firewall inspects TLS, add that "
            f"CA's certificate (PEM) to {where}"
        )
    return f"; if a proxy or firewall inspects TLS, add its CA certificate (PEM) to {where}"
