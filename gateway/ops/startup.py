"""Start-up failures of ``iot-gateway run``: one line each, and the exit status.

Everything that can fail at start (binding a listener or the admin endpoint,
loading a TLS certificate or key, reading a file the configuration names) is
done before the gateway serves anything; a failure becomes a `StartupError`
whose message names what failed (the listener and its address, the TLS
profile, the file) and why, and whose ``status`` is the process exit status
(docs/operations.md, "Exit status"):

    0  stopped normally (SIGTERM/SIGINT)
    1  an unexpected error (a bug: the log has its traceback)
    2  the configuration is invalid, or refused (placeholders, credentials, admin token)
    3  a listen address is in use, or not an address of this host
    4  permission denied: a port below 1024 without CAP_NET_BIND_SERVICE, or a file
       the daemon's user may not read
    5  a TLS certificate or private key cannot be loaded
    6  another start-up I/O error (a file or directory that cannot be used)
"""

from __future__ import annotations

import errno
import os
import socket
import ssl

__all__ = [
    "EXIT_ADDRESS",
    "EXIT_CONFIG",
    "EXIT_IO",
    "EXIT_OK",
    "EXIT_PERMISSION",
    "EXIT_RUNTIME",
    "EXIT_TLS",
    "StartupError",
    "bind_error",
    "file_error",
    "tls_error",
]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_ADDRESS = 3
EXIT_PERMISSION = 4
EXIT_TLS = 5
EXIT_IO = 6

_ADDRESS_ERRNOS = {errno.EADDRINUSE, errno.EADDRNOTAVAIL}
_PERMISSION_ERRNOS = {errno.EACCES, errno.EPERM}


class StartupError(Exception):
    """The gateway cannot start: ``str(exc)`` is the one line to show, ``status`` the
    exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _reason(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def bind_error(what: str, address: str, port: int, exc: OSError) -> StartupError:
    """``what`` (e.g. ``listener 'amqp'``) could not bind ``address``."""
    where = f"{what} on {address}"
    if exc.errno == errno.EADDRINUSE:
        return StartupError(
            f"{where}: address already in use (another process listens on port {port}; "
            f"`ss -ltnp 'sport = :{port}'` shows which)",
            EXIT_ADDRESS,
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(
            f"{where}: address not available (not an address of this host)", EXIT_ADDRESS
        )
    if exc.errno in _PERMISSION_ERRNOS:
        hint = (
            "; ports below 1024 need CAP_NET_BIND_SERVICE (see docs/operations.md, "
            "\"Exit status\")"
            if 0 < port < 1024
            else ""
        )
        return StartupError(f"{where}: permission denied{hint}", EXIT_PERMISSION)
    if isinstance(exc, socket.gaierror):
        return StartupError(f"{where}: cannot resolve the host: {exc.strerror}", EXIT_ADDRESS)
    return StartupError(f"{where}: cannot listen: {_reason(exc)}", EXIT_IO)


def file_error(what: str, path: str | os.PathLike[str], exc: OSError) -> StartupError:
    """``what`` (e.g. ``store``) could not use the file at ``path``."""
    if exc.errno in _PERMISSION_ERRNOS:
        return StartupError(
            f"{what}: {path}: permission denied (the gateway runs as uid {os.getuid()})",
            EXIT_PERMISSION,
        )
    return StartupError(f"{what}: {path}: {_reason(exc)}", EXIT_IO)


def tls_error(what: str, files: str, exc: Exception) -> StartupError:
    """Loading the TLS material ``files`` of ``what`` (e.g. ``listener 'amqps' tls_profile
    'local'``) failed with ``exc``."""
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if reason == "KEY_VALUES_MISMATCH":
            detail = "the private key does not belong to the certificate"
        elif "PEM" in reason or "NO_START_LINE" in reason or "ASN1" in reason or not reason:
            detail = "not a PEM certificate and private key (or the key is encrypted)"
        else:
            detail = f"{exc.reason}"
        return StartupError(f"{what}: cannot load {files}: {detail}", EXIT_TLS)
    if isinstance(exc, OSError):
        if exc.errno in _PERMISSION_ERRNOS:
            return StartupError(
                f"{what}: cannot read {files}: permission denied (the gateway runs as uid "
                f"{os.getuid()})",
                EXIT_PERMISSION,
            )
        return StartupError(f"{what}: cannot read {files}: {_reason(exc)}", EXIT_TLS)
    return StartupError(f"{what}: cannot load {files}: {exc}", EXIT_TLS)
