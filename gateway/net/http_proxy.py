"""Reaching the hub through an HTTP proxy: CONNECT host:port, then TLS as usual.

Sites whose firewall opens outbound 443 only often force traffic through an
HTTP proxy. `open_tunnel` connects to the proxy, asks it for a tunnel with
``CONNECT host:port`` (Basic auth when configured) and returns the TCP stream,
on which the caller runs TLS (and WebSocket) exactly as on a direct connection.

The response is parsed with h11, which knows CONNECT: a 2xx answer switches
the connection to the tunnel and leaves any bytes after the header in
``trailing_data``. A proxy that answers 200 with a body (a web server or a
captive portal, not a tunnel) is refused on the spot rather than left to fail
later as garbage in the TLS handshake.

Which proxy: `resolve_proxy` takes the connector's ``proxy`` setting (an
explicit `url`/`username`/`password_file`, ``env``, or ``none``). With
``env``, ``https_proxy``/``HTTPS_PROXY`` name the proxy and
``no_proxy``/``NO_PROXY`` the hosts reached directly (``*``, exact names or
addresses, and domain suffixes: ``example.com`` and ``.example.com`` both
cover ``hub.example.com``; ``host:port`` entries match that port only).

Passwords are read from ``password_file`` at each connect (a rotated file is
picked up) and never appear in logs, errors or `repr`.
"""

from __future__ import annotations

import base64
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio

from gateway.config.proxy_url import parse_proxy_url, redact_proxy_url

from .tls import TLSConnectError, classify_tls_error

__all__ = [
    "ProxyConnectError",
    "ProxyEndpoint",
    "no_proxy_matches",
    "open_tunnel",
    "parse_proxy_url",
    "proxy_from_env",
    "proxy_tcp_opener",
    "redact_proxy_url",
    "resolve_proxy",
]

# A proxy's answer to CONNECT is a status line and a few headers; more is garbage.
MAX_RESPONSE_HEAD = 16384
_READ_SIZE = 4096


class ProxyConnectError(TLSConnectError):
    """The proxy did not give us a tunnel.

    ``reason``: ``proxy_auth_required`` (407, or 401 as tinyproxy sends for
    wrong credentials), ``proxy_refused`` (any other
    non-2xx status, e.g. 403 for a port the proxy does not allow, 502 when it
    cannot reach the hub), ``proxy_protocol`` (an answer that is not HTTP, a 200
    with a body, a proxy that hung up), or, for reaching the proxy itself, the
    usual connect reasons (``refused``, ``dns``, ``timeout``...).
    ``status_line`` is the proxy's status line when it sent one.
    """

    def __init__(
        self, reason: str, detail: str, *, status: int | None = None, status_line: str = ""
    ) -> None:
        super().__init__(reason, detail)
        self.status = status
        self.status_line = status_line


@dataclass(frozen=True)
class ProxyEndpoint:
    """One HTTP proxy: where it is and how to authenticate (Basic)."""

    host: str
    port: int
    username: str | None = None
    password_file: Path | None = None
    # Only for credentials given in an HTTPS_PROXY URL; never shown.
    password: str | None = field(default=None, repr=False)
    source: str = "config"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def read_password(self) -> str | None:
        if self.password is not None:
            return self.password
        if self.password_file is None:
            return None
        try:
            text = Path(self.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ProxyConnectError(
                "error", f"cannot read proxy password_file {self.password_file}: {exc.strerror}"
            ) from None
        return text.rstrip("\r\n")

    def authorization(self) -> bytes | None:
        """The Proxy-Authorization header value, or None without a user name."""
        if not self.username:
            return None
        password = self.read_password() or ""
        token = base64.b64encode(f"{self.username}:{password}".encode())
        return b"Basic " + token


def no_proxy_matches(host: str, port: int, no_proxy: str) -> bool:
    """Whether `host` is reached directly according to a NO_PROXY value."""
    name = host.strip("[]").rstrip(".").lower()
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry_port: int | None = None
        if entry.startswith("["):  # [v6]:port or [v6]
            addr, _, rest = entry[1:].partition("]")
            entry = addr
            if rest.startswith(":") and rest[1:].isdigit():
                entry_port = int(rest[1:])
        elif entry.count(":") == 1:
            entry, _, port_text = entry.partition(":")
            if not port_text.isdigit():
                continue
            entry_port = int(port_text)
        if entry_port is not None and entry_port != port:
            continue
        entry = entry.lstrip("*").lstrip(".").rstrip(".")
        if not entry:
            continue
        if name == entry or name.endswith("." + entry):
            return True
    return False


def proxy_from_env(
    host: str, port: int, environ: Mapping[str, str] | None = None
) -> ProxyEndpoint | None:
    """The proxy HTTPS_PROXY names for `host`, unless NO_PROXY exempts it."""
    env = os.environ if environ is None else environ
    url = env.get("https_proxy") or env.get("HTTPS_PROXY")
    if not url:
        return None
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY") or ""
    if no_proxy and no_proxy_matches(host, port, no_proxy):
        return None
    try:
        p_host, p_port, user, password = parse_proxy_url(url)
    except ValueError as exc:
        raise ProxyConnectError("error", f"HTTPS_PROXY: {exc}") from None
    return ProxyEndpoint(p_host, p_port, user, None, password, source="HTTPS_PROXY")


def resolve_proxy(
    setting: Any, host: str, port: int, environ: Mapping[str, str] | None = None
) -> ProxyEndpoint | None:
    """The proxy to use for `host:port` given a ``proxy`` setting.

    `setting` is None or ``"none"`` (direct), ``"env"`` (`proxy_from_env`), or an
    object with ``url``, ``username`` and ``password_file`` (the configuration's
    proxy section). Credentials in `url` are used when no ``username`` is set.
    """
    if setting is None or setting == "none":
        return None
    if setting == "env":
        return proxy_from_env(host, port, environ)
    try:
        p_host, p_port, url_user, url_password = parse_proxy_url(str(setting.url))
    except ValueError as exc:
        raise ProxyConnectError("error", f"proxy.url: {exc}") from None
    username = getattr(setting, "username", None)
    password_file = getattr(setting, "password_file", None)
    if username:
        return ProxyEndpoint(p_host, p_port, username, password_file)
    return ProxyEndpoint(p_host, p_port, url_user, None, url_password)


def _authority(host: str, port: int) -> str:
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{name}:{port}"


def _status_line(response: h11.Response) -> str:
    reason = response.reason.decode("latin-1", "replace")
    line = (
        f"HTTP/{response.http_version.decode('ascii', 'replace')} {response.status_code} {reason}"
    )
    return " ".join(line.split())[:200]


def _header(response: h11.Response, name: bytes) -> bytes | None:
    for key, value in response.headers:
        if key == name:
            return bytes(value)
    return None


async def open_tunnel(proxy: ProxyEndpoint, host: str, port: int) -> trio.SocketStream:
    """TCP to `proxy`, CONNECT `host:port`, and the stream once the tunnel is up.

    Raises `ProxyConnectError`. The caller bounds the time (the connector's
    connect timeout covers proxy, tunnel, TLS and WebSocket upgrade together).
    """
    try:
        tcp = await trio.open_tcp_stream(proxy.host, proxy.port)
    except OSError as exc:
        raise ProxyConnectError(
            classify_tls_error(exc), f"connect to proxy {proxy} failed: {exc.strerror or exc}"
        ) from exc
    try:
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        await _connect_request(tcp, proxy, host, port)
    except BaseException as exc:
        await trio.aclose_forcefully(tcp)
        if isinstance(exc, trio.BrokenResourceError | OSError):
            raise ProxyConnectError(
                "proxy_protocol",
                f"proxy {proxy} dropped the connection during CONNECT {_authority(host, port)}: "
                f"{exc.__cause__ or exc or type(exc).__name__}",
            ) from exc
        raise
    return tcp


async def _connect_request(
    tcp: trio.SocketStream, proxy: ProxyEndpoint, host: str, port: int
) -> None:
    target = _authority(host, port)
    headers = [(b"Host", target.encode("idna")), (b"User-Agent", b"iot-gateway")]
    authorization = proxy.authorization()
    if authorization is not None:
        headers.append((b"Proxy-Authorization", authorization))
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    request = conn.send(h11.Request(method=b"CONNECT", target=target.encode(), headers=headers))
    await tcp.send_all(request + (conn.send(h11.EndOfMessage()) or b""))
    where = f"proxy {proxy}"
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProxyConnectError(
                "proxy_protocol",
                f"{where} answered CONNECT {target} with something that is not HTTP ({exc})",
            ) from None
        if event is h11.NEED_DATA:
            data = await tcp.receive_some(_READ_SIZE)
            if not data:
                raise ProxyConnectError(
                    "proxy_protocol",
                    f"{where} closed the connection without answering CONNECT {target}",
                )
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            if 200 <= event.status_code < 300:
                _check_tunnel(conn, event, where, target)
                return
            # The status line says it all; the body (an HTML page) is not read.
            raise _refusal(event, where, target, authorization is not None)
        # h11.InformationalResponse (100 Continue and the like): wait for the final one.


def _check_tunnel(conn: h11.Connection, response: h11.Response, where: str, target: str) -> None:
    length = _header(response, b"content-length")
    chunked = _header(response, b"transfer-encoding")
    trailing, _ = conn.trailing_data
    if trailing or chunked is not None or (length is not None and length.strip() not in (b"0",)):
        status = _status_line(response)
        raise ProxyConnectError(
            "proxy_protocol",
            f"{where} answered CONNECT {target} with {status} and a body instead of a tunnel "
            "(is it an HTTP proxy? a captive portal or web server answers this way)",
            status=response.status_code,
            status_line=status,
        )


def _refusal(
    response: h11.Response, where: str, target: str, sent_credentials: bool
) -> ProxyConnectError:
    status = _status_line(response)
    code = response.status_code
    if code in (401, 407):  # tinyproxy answers wrong credentials with 401
        hint = (
            "the proxy refused the credentials (check proxy.username and proxy.password_file)"
            if sent_credentials
            else "the proxy needs credentials: set proxy.username and proxy.password_file"
        )
        return ProxyConnectError(
            "proxy_auth_required",
            f"{where} refused CONNECT {target}: {status}; {hint}",
            status=code,
            status_line=status,
        )
    if code in (403, 405):
        hint = (
            "; the proxy does not allow tunnels to this host or port "
            "(its administrator must allow CONNECT to port 443)"
        )
    elif code in (502, 503, 504):
        hint = "; the proxy could not reach the hub"
    else:
        hint = ""
    return ProxyConnectError(
        "proxy_refused",
        f"{where} refused CONNECT {target}: {status}{hint}",
        status=code,
        status_line=status,
    )


# The proxy's own deadline falls just short of the dial's, so a proxy that never
# answers is reported as such rather than as a bare connect timeout.
_PROXY_TIME_SHARE = 0.95


def proxy_tcp_opener(
    connector: Any,
    direct: Callable[[Any, float], Awaitable[tuple[trio.SocketStream, str]]],
    environ: Mapping[str, str] | None = None,
) -> Callable[[Any, float], Awaitable[tuple[trio.SocketStream, str]]] | None:
    """A TCP opener (see `gateway.net.dial`) for a connector with a ``proxy``.

    None when the connector has no proxy. With ``proxy: env`` the choice is
    made per endpoint at each connect (NO_PROXY may exempt one), falling back
    to `direct`. The address reported is the proxy's.
    """
    setting = getattr(connector, "proxy", None)
    if setting is None or setting == "none":
        return None

    async def open_tcp(endpoint: Any, timeout: float) -> tuple[trio.SocketStream, str]:
        proxy = resolve_proxy(setting, endpoint.host, endpoint.port, environ)
        if proxy is None:
            return await direct(endpoint, timeout)
        try:
            with trio.fail_after(timeout * _PROXY_TIME_SHARE):
                tcp = await open_tunnel(proxy, endpoint.host, endpoint.port)
        except trio.TooSlowError:
            raise ProxyConnectError(
                "timeout",
                f"proxy {proxy}: no tunnel to {_authority(endpoint.host, endpoint.port)} "
                f"within {timeout:g} s",
            ) from None
        return tcp, f"proxy {proxy}"

    return open_tcp
