"""Opening a connector's upstream stream: the one place both relays connect to a hub.

A connector lists one or more endpoints (``host``/``port``, or ``hosts:``).
One dial is a round over them, in order; the first that works is used:

1. resolve the endpoint's host again (`trio.socket.getaddrinfo`, never cached:
   a hub that failed over may have moved), and connect to each address in
   order, each with its share of the endpoint's time, until one answers;
2. TLS over that socket (SNI and certificate check against the TLS profile's
   ``server_name``, else the endpoint's own host), unless the connector is an
   allowed plaintext one;
3. optionally wrap the result (WebSockets).

Each endpoint gets ``connect_timeout`` for all of that, so a round takes at
most ``len(endpoints) x connect_timeout`` (`dial_budget`). Every endpoint that
fails is logged once with its reason; when all fail the dial raises
`DialError` (a `TLSConnectError`) and the caller's backoff applies (the AMQP
connector pool; an MQTT device is refused with "server unavailable" and
retries). What happened is reported through `gateway.net.hooks.report_dial`
for ``/api/connectors`` and ``iot-gateway status``.

Seams for other transports, per connector:

- ``tcp``: how a socket to an endpoint is opened. Default: direct TCP to the
  resolved addresses (`open_direct_tcp`). An HTTP CONNECT proxy replaces it
  (the proxy resolves the name, so the endpoint is handed over by name); see
  `tcp_opener_for`.
- ``wrap``: applied to the stream after TLS. Default: none. ``transport:
  websockets`` puts a WebSocket client here; see `stream_wrapper_for`.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from .hooks import report_dial
from .tls import ClientContextCache, TLSConnectError, classify_tls_error
from .tls_diagnose import PROBE_TIMEOUT, untrusted_ca_hint
from .tls_stream import open_tls_stream

__all__ = [
    "DialError",
    "DialReport",
    "Endpoint",
    "EndpointFailure",
    "Resolver",
    "StreamWrapper",
    "TcpOpener",
    "connector_endpoints",
    "dial_budget",
    "dial_connector",
    "make_direct_tcp",
    "open_connector_stream",
    "open_direct_tcp",
    "open_endpoint_stream",
    "stream_wrapper_for",
    "tcp_opener_for",
]

log = logging.getLogger("gateway.net.dial")

# The longest a connect to one address may take while others remain to be tried.
ADDRESS_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place a connector's hub may be reached."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class EndpointFailure:
    """Why one endpoint was skipped: ``reason`` is a `TLSConnectError` reason word,
    ``detail`` a short readable text naming the addresses tried."""

    endpoint: Endpoint
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.endpoint}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {"endpoint": str(self.endpoint), "reason": self.reason, "detail": self.detail}


@dataclass(slots=True)
class DialReport:
    """The outcome of one dial: the endpoint used (None: all failed), the address
    it was reached at, and the endpoints skipped before it, with why."""

    connector: str
    endpoint: Endpoint | None = None
    address: str | None = None
    skipped: list[EndpointFailure] = field(default_factory=list)


class DialError(TLSConnectError):
    """Every endpoint of a connector failed; ``failures`` holds one entry per endpoint.
    ``reason`` is the first endpoint's (a metric label), ``detail`` names them all."""

    def __init__(self, connector: str, failures: list[EndpointFailure]) -> None:
        self.connector = connector
        reason = failures[0].reason if failures else "error"
        if len(failures) == 1:
            detail = str(failures[0])
        else:
            detail = "every endpoint failed: " + ("; ".join(str(f) for f in failures) or "none")
        super().__init__(reason, detail)
        self.failures = failures


# (family, sockaddr) pairs for a host and port, in the order to try them.
Resolver = Callable[[str, int], Awaitable[list[tuple[int, Any]]]]
# Opens a socket towards an endpoint within `timeout` seconds. Returns the stream
# and the address it reached (for status), or raises _EndpointFailed / OSError.
TcpOpener = Callable[[Endpoint, float], Awaitable[tuple[trio.SocketStream, str]]]
# Wraps the (TLS) stream, e.g. a WebSocket client handshake; raises TLSConnectError.
StreamWrapper = Callable[[trio.abc.Stream, Endpoint, float], Awaitable[trio.abc.Stream]]


class _EndpointFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def connector_endpoints(connector: Any) -> list[Endpoint]:
    """The endpoints to try, in order: ``hosts:`` if given, else ``host``/``port``."""
    listed = getattr(connector, "endpoints", None)
    if listed:
        return [Endpoint(str(e.host), int(e.port)) for e in listed]
    return [Endpoint(str(connector.host), int(connector.port))]


# What a caller bounding a whole connect adds to the endpoints' time, so the
# dial's own per-endpoint timeout fires first and the endpoint is named.
DIAL_GRACE = 1.0


def dial_budget(connector: Any) -> float:
    """The longest one connect may take: ``connect_timeout`` per endpoint, and a little."""
    return float(connector.connect_timeout) * len(connector_endpoints(connector)) + DIAL_GRACE


async def system_resolver(host: str, port: int) -> list[tuple[int, Any]]:
    """getaddrinfo, asked afresh each time (the OS resolver's own TTL caching aside)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[tuple[int, Any]] = []
    for family, _, _, _, sockaddr in infos:
        if (family, sockaddr) not in seen:
            seen.append((family, sockaddr))
    return seen


def _address_text(sockaddr: Any) -> str:
    return str(sockaddr[0])


def _dns_detail(exc: socket.gaierror) -> str:
    if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)):
        return "dns: name not found"
    return f"dns: {exc.strerror or exc}"


def _connect_detail(exc: BaseException, address: str) -> tuple[str, str]:
    if isinstance(exc, trio.TooSlowError):
        return "timeout", f"connect timeout ({address})"
    if isinstance(exc, ConnectionRefusedError):
        return "refused", f"connect refused ({address})"
    if isinstance(exc, OSError):
        return "network", f"{exc.strerror or type(exc).__name__} ({address})".lower()
    return "error", f"{exc} ({address})"


def make_direct_tcp(resolver: Resolver | None = None) -> TcpOpener:
    """A TCP opener resolving with `resolver` (default: `system_resolver`)."""
    resolve = resolver or system_resolver

    async def open_tcp(endpoint: Endpoint, timeout: float) -> tuple[trio.SocketStream, str]:
        deadline = trio.current_time() + timeout
        try:
            with trio.fail_at(deadline):
                addresses = await resolve(endpoint.host, endpoint.port)
        except socket.gaierror as exc:
            raise _EndpointFailed("dns", _dns_detail(exc)) from exc
        except trio.TooSlowError:
            raise _EndpointFailed("timeout", "dns: timeout") from None
        if not addresses:
            raise _EndpointFailed("dns", "dns: no addresses")
        failures: list[tuple[str, str]] = []
        for i, (family, sockaddr) in enumerate(addresses):
            # Equal shares of what is left, at most ADDRESS_TIMEOUT, so one silent
            # address (say a broken IPv6 route) cannot use up the endpoint's time;
            # the last address gets all that remains.
            left = deadline - trio.current_time()
            share = (
                left
                if i == len(addresses) - 1
                else min(ADDRESS_TIMEOUT, left / (len(addresses) - i))
            )
            sock = trio.socket.socket(family, socket.SOCK_STREAM)
            try:
                with trio.fail_after(max(share, 0.0)):
                    await sock.connect(sockaddr)
            except (OSError, trio.TooSlowError) as exc:
                sock.close()
                failures.append(_connect_detail(exc, _address_text(sockaddr)))
                continue
            except BaseException:
                sock.close()
                raise
            return trio.SocketStream(sock), _address_text(sockaddr)
        reasons = {reason for reason, _ in failures}
        reason = failures[0][0] if len(reasons) == 1 else "network"
        raise _EndpointFailed(reason, "; ".join(detail for _, detail in failures))

    return open_tcp


open_direct_tcp: TcpOpener = make_direct_tcp()


# --------------------------------------------------------------------- seams


def tcp_opener_for(connector: Any) -> TcpOpener | None:
    """SEAM (HTTP CONNECT proxy): the opener for a connector with a ``proxy``.

    None means direct TCP (`open_direct_tcp`). A proxy opener hands the
    endpoint to the proxy by name (the proxy resolves it) and returns the
    tunnelled socket and the proxy's address as the address reached.
    """
    if getattr(connector, "proxy", None) in (None, "none"):
        return None
    # Imported only when a proxy is configured: h11 stays out of the daemon otherwise.
    from .http_proxy import proxy_tcp_opener

    return proxy_tcp_opener(connector, open_direct_tcp)


def stream_wrapper_for(connector: Any) -> StreamWrapper | None:
    """SEAM (``transport: websockets``): what wraps the TLS stream. None: nothing."""
    if getattr(connector, "transport", "tcp") != "websockets":
        return None
    # Imported only for WebSocket connectors: wsproto stays out of the daemon otherwise.
    from .websocket_stream import websocket_wrapper

    return websocket_wrapper(connector)


# ---------------------------------------------------------------------- dial


def server_name_for_endpoint(profile: Any, endpoint: Endpoint) -> str:
    """SNI and the name checked in the certificate: the profile's override, else the host."""
    name = getattr(profile, "server_name", None) if profile is not None else None
    return str(name or endpoint.host)


def _tls_detail(exc: BaseException) -> str:
    for err in _chain(exc):
        if isinstance(err, ssl.SSLCertVerificationError):
            return f"certificate verification failed: {err.verify_message}"
        if isinstance(err, ssl.SSLError | OSError):
            return str(err) or type(err).__name__
    return str(exc) or type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


_default_contexts = ClientContextCache()

_STREAM_ERRORS = (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError)


async def _dial_endpoint(
    endpoint: Endpoint,
    *,
    ssl_context: ssl.SSLContext | None,
    server_name: str | None,
    timeout: float,
    tcp: TcpOpener,
    wrap: StreamWrapper | None,
) -> tuple[trio.abc.Stream, str]:
    deadline = trio.current_time() + timeout
    try:
        # The opener keeps to `timeout` itself (and says which address timed
        # out); this only guards against one that does not.
        with trio.fail_at(deadline + 1.0):
            sock, address = await tcp(endpoint, timeout)
    except trio.TooSlowError:
        raise _EndpointFailed("timeout", "connect timeout") from None
    except TLSConnectError as exc:  # a proxy's refusal, say
        raise _EndpointFailed(exc.reason, exc.detail) from exc
    except OSError as exc:
        raise _EndpointFailed(*_connect_detail(exc, "socket")) from exc
    stream: trio.abc.Stream = sock
    try:
        # Small frames (acknowledgements, pings) go out at once, whoever opened the socket.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        with trio.fail_at(deadline):
            if ssl_context is not None:
                stream = await open_tls_stream(sock, ssl_context, server_name)
            if wrap is not None:
                stream = await wrap(stream, endpoint, max(deadline - trio.current_time(), 0.0))
    except TLSConnectError as exc:
        await trio.aclose_forcefully(stream)
        raise _EndpointFailed(exc.reason, f"{exc.detail} ({address})") from exc
    except _STREAM_ERRORS as exc:
        # open_tls_stream closes the socket it was given when the handshake fails.
        await trio.aclose_forcefully(stream)
        what = "TLS handshake" if ssl_context is not None else "connect"
        if isinstance(exc, trio.TooSlowError):
            raise _EndpointFailed("timeout", f"{what} timeout ({address})") from None
        raise _EndpointFailed(
            classify_tls_error(exc), f"{what} failed: {_tls_detail(exc)} ({address})"
        ) from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, address


async def open_endpoint_stream(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None,
    timeout: float,
) -> trio.abc.Stream:
    """One endpoint, direct TCP, a ready context (or None: plaintext); raises
    TLSConnectError. For tools and tests; connectors go through `dial_connector`."""
    try:
        stream, _ = await _dial_endpoint(
            Endpoint(host, port),
            ssl_context=ssl_context,
            server_name=server_hostname,
            timeout=timeout,
            tcp=open_direct_tcp,
            wrap=None,
        )
    except _EndpointFailed as exc:
        raise TLSConnectError(exc.reason, f"{Endpoint(host, port)}: {exc.detail}") from exc
    return stream


async def open_connector_stream(
    connector: Any,
    profile: Any,
    *,
    contexts: ClientContextCache | None = None,
    tcp: TcpOpener | None = None,
    wrap: StreamWrapper | None = None,
) -> trio.abc.Stream:
    """As `dial_connector`, the stream only."""
    stream, _ = await dial_connector(connector, profile, contexts=contexts, tcp=tcp, wrap=wrap)
    return stream


async def dial_connector(
    connector: Any,
    profile: Any,
    *,
    contexts: ClientContextCache | None = None,
    tcp: TcpOpener | None = None,
    wrap: StreamWrapper | None = None,
    endpoints: Sequence[Endpoint] | None = None,
) -> tuple[trio.abc.Stream, DialReport]:
    """One round over the connector's endpoints; the first stream that opens,
    and the report saying which endpoint that is and what was skipped.

    ``tcp`` and ``wrap`` default to the connector's own (`tcp_opener_for`,
    `stream_wrapper_for`; direct TCP and nothing). Raises `DialError` when
    every endpoint failed, `TLSConnectError` for a connector that cannot be
    dialled at all (plaintext without ``allow_plaintext``).
    """
    name = str(getattr(connector, "name", "?"))
    ssl_context: ssl.SSLContext | None = None
    if profile is not None:
        ssl_context = (contexts or _default_contexts).get(profile)
    elif not getattr(connector, "allow_plaintext", False):
        raise TLSConnectError("error", f"connector {name!r} has no tls_profile")
    opener = tcp or tcp_opener_for(connector) or open_direct_tcp
    wrapper = wrap if wrap is not None else stream_wrapper_for(connector)
    timeout = float(connector.connect_timeout)
    targets = list(endpoints) if endpoints is not None else connector_endpoints(connector)
    report = DialReport(name)
    for endpoint in targets:
        try:
            stream, address = await _dial_endpoint(
                endpoint,
                ssl_context=ssl_context,
                server_name=server_name_for_endpoint(profile, endpoint) if ssl_context else None,
                timeout=timeout if math.isfinite(timeout) else math.inf,
                tcp=opener,
                wrap=wrapper,
            )
        except _EndpointFailed as exc:
            detail = exc.detail
            if exc.reason == "certificate_verify_failed":
                # Name the CA that signed what was presented (TLS inspection by a proxy).
                detail += await untrusted_ca_hint(
                    opener,
                    endpoint,
                    server_name_for_endpoint(profile, endpoint),
                    getattr(connector, "tls_profile", None),
                    min(timeout, PROBE_TIMEOUT),
                )
            failure = EndpointFailure(endpoint, exc.reason, detail)
            report.skipped.append(failure)
            log.warning("connector %s: endpoint %s failed: %s", name, endpoint, detail)
            continue
        report.endpoint = endpoint
        report.address = address
        if report.skipped:
            log.info("connector %s: connected to %s (%s) after skipping %s", name, endpoint,
                     address, ", ".join(str(f.endpoint) for f in report.skipped))  # fmt: skip
        report_dial(report)
        return stream, report
    report_dial(report)
    raise DialError(name, report.skipped)
