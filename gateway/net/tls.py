"""TLS for both protocols: contexts from `tls_profiles`, connecting, failure reasons.

Client side (towards the hub): verification is always on (the profile's CA
file or the system store), host name checked against `server_name` or the
connector host, TLS 1.2 minimum, optional client certificate. Server side
(device-side TLS on a listener): the profile's cert/key, and client
certificates required only when the profile names a `ca_file`.

Profiles are duck-typed (`ca_file`, `cert_file`, `key_file`, `server_name`,
`min_version`, `ciphers`), matching `gateway.config.TlsProfile`.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Protocol

import trio

__all__ = [
    "ClientContextCache",
    "TLSConnectError",
    "TlsProfileLike",
    "classify_tls_error",
    "client_context",
    "server_context",
    "server_name_for",
]

_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# OpenSSL X509_V_ERR_HOSTNAME_MISMATCH / X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH_CODES = {62, 64}


class TlsProfileLike(Protocol):
    ca_file: Any
    cert_file: Any
    key_file: Any
    server_name: str | None
    min_version: str
    ciphers: str | None


def _path(value: Any) -> str | None:
    return None if value is None else str(value)


def _min_version(profile: TlsProfileLike | None) -> ssl.TLSVersion:
    version = str(getattr(profile, "min_version", None) or "1.2")
    try:
        return _MIN_VERSIONS[version]
    except KeyError:
        raise ValueError(f"unsupported TLS min_version {version!r} (use 1.2 or 1.3)") from None


def strict_eof(ctx: ssl.SSLContext) -> None:
    """A connection cut without close_notify is an error (SSLEOFError), not an end of stream.

    Python 3.11.0-3.11.2 with OpenSSL 3 (Debian 12 and Raspberry Pi OS 12 ship 3.11.2) set
    OP_IGNORE_UNEXPECTED_EOF by default, which makes a truncated stream look cleanly closed.
    """
    ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF


def client_context(
    profile: TlsProfileLike | None, *, default_server_name: str | None = None
) -> ssl.SSLContext:
    """A context for connecting to the hub.

    `default_server_name` is the name verified when the profile has no
    `server_name`; it is not stored in the context (pass `server_name_for(...)`
    to the handshake, as `gateway.net.dial` does), but an empty one is refused here
    so a misconfigured caller fails early instead of skipping the name check.
    """
    if default_server_name is not None and not default_server_name:
        raise ValueError("empty server name: the hub's host name must be verified")
    ca_file = _path(getattr(profile, "ca_file", None))
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    strict_eof(ctx)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = _min_version(profile)
    cert_file = _path(getattr(profile, "cert_file", None))
    if cert_file:
        ctx.load_cert_chain(cert_file, _path(getattr(profile, "key_file", None)))
    ciphers = getattr(profile, "ciphers", None)
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def server_context(profile: TlsProfileLike) -> ssl.SSLContext:
    """A context for terminating device-side TLS on a listener."""
    cert_file = _path(getattr(profile, "cert_file", None))
    if not cert_file:
        raise ValueError("device-side TLS needs a tls_profile with cert_file and key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    strict_eof(ctx)
    ctx.minimum_version = _min_version(profile)
    ctx.load_cert_chain(cert_file, _path(getattr(profile, "key_file", None)))
    ciphers = getattr(profile, "ciphers", None)
    if ciphers:
        ctx.set_ciphers(ciphers)
    ca_file = _path(getattr(profile, "ca_file", None))
    if ca_file:
        # A CA on a listener profile means: devices must present a certificate it signed.
        ctx.load_verify_locations(cafile=ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_name_for(connector: Any, profile: TlsProfileLike | None) -> str:
    """SNI and the name checked in the hub's certificate: the profile's override, else the host."""
    name = getattr(profile, "server_name", None) if profile is not None else None
    return name or connector.host


class ClientContextCache:
    """Client contexts shared by every connection using the same profile settings.

    Building a context reads CA files (the system store takes milliseconds), so
    one per upstream connection would be wasteful. Certificates are read once;
    a rotated CA or client certificate takes effect on restart.
    """

    def __init__(self) -> None:
        self._contexts: dict[tuple[str | None, ...], ssl.SSLContext] = {}

    def get(self, profile: TlsProfileLike | None) -> ssl.SSLContext:
        key = (
            _path(getattr(profile, "ca_file", None)),
            _path(getattr(profile, "cert_file", None)),
            _path(getattr(profile, "key_file", None)),
            str(getattr(profile, "min_version", None) or "1.2"),
            getattr(profile, "ciphers", None),
        )
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._contexts[key] = client_context(profile)
        return ctx


class TLSConnectError(Exception):
    """Opening a connection to an upstream failed.

    `reason` is one word from a small fixed set, fit for a metric label:
    timeout, refused, dns, network, certificate_verify_failed,
    hostname_mismatch, peer_rejected_certificate, protocol, closed, error;
    subclasses add proxy_auth_required, proxy_refused, proxy_protocol
    (`gateway.net.http_proxy`) and websocket_refused, websocket_protocol
    (`gateway.net.websocket_stream`).
    `detail` is a readable description for logs.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            # open_tcp_stream reports every failed attempt in a group; the first speaks for all.
            current = current.exceptions[0]
        else:
            current = current.__cause__ or current.__context__
    return seen


def classify_tls_error(exc: BaseException) -> str:
    """A short, fixed reason for a failed connect or TLS handshake (see TLSConnectError)."""
    for err in _chain(exc):
        if isinstance(err, trio.TooSlowError):
            return "timeout"
        if isinstance(err, ssl.SSLCertVerificationError):
            message = str(getattr(err, "verify_message", "")).lower()
            if getattr(err, "verify_code", None) in _NAME_MISMATCH_CODES or "mismatch" in message:
                return "hostname_mismatch"
            return "certificate_verify_failed"
        if isinstance(err, ssl.SSLEOFError):
            return "closed"
        if isinstance(err, ssl.SSLError):
            reason = str(getattr(err, "reason", "") or "").upper()
            if any(
                word in reason
                for word in (
                    "UNKNOWN_CA",
                    "BAD_CERTIFICATE",
                    "CERTIFICATE_REQUIRED",
                    "CERTIFICATE_UNKNOWN",
                    "ACCESS_DENIED",
                )
            ):
                return "peer_rejected_certificate"
            return "protocol"
        if isinstance(err, socket.gaierror):
            return "dns"
        if isinstance(err, ConnectionRefusedError):
            return "refused"
        if isinstance(err, ConnectionResetError | BrokenPipeError):
            return "closed"
    for err in _chain(exc):
        if isinstance(err, OSError):
            return "network"
    for err in _chain(exc):
        if isinstance(err, trio.BrokenResourceError | trio.ClosedResourceError):
            return "closed"
    return "error"
