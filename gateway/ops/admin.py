"""Admin HTTP endpoint: metrics, health, readiness and the JSON state API.

A deliberately small HTTP/1.1 server on trio and h11, one task per
connection, GET and HEAD only:

    /metrics          Prometheus text (or OpenMetrics when the scraper asks)
    /healthz          200 "ok" while the event loop runs
    /readyz           200 "ready" or 503 with the reason from the readiness check
    /api/connections  /api/links  /api/routes  /api/connectors  /api/listeners
    /api/credentials  (JSON; identities the gateway holds credentials for, no secrets)
    /api/store        (JSON; the store-and-forward backlog, limits and counters)

With a token (``admin.token_file``, required when the endpoint is not on
loopback) every ``/api/*`` request must carry ``Authorization: Bearer TOKEN``;
others are answered 401, and logged once per source address a minute.
The health, readiness and metrics paths stay open for probes and scrapers.

A misbehaving client cannot hurt the gateway: request heads and bodies are
bounded, a client that does not finish its request head in time or stops
reading its response is dropped, and the number of concurrent admin
connections is capped (excess connections are closed at once).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
import trio
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

from gateway.ops.registry import Registry

__all__ = ["AdminLimits", "serve_admin"]

log = logging.getLogger(__name__)

Readiness = Callable[[], tuple[bool, str]]
# The bearer token /api/* requires now (None: none required); read per request so a
# reload can rotate it.
ApiToken = Callable[[], Any]
Response = tuple[int, str, bytes]  # status, content type, body
Handler = Callable[[h11.Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class AdminLimits:
    max_connections: int = 32
    max_request_head: int = 8 * 1024  # request line + headers
    max_request_body: int = 8 * 1024  # GET has no business sending more
    header_timeout: float = 10.0  # to receive a complete request head
    idle_timeout: float = 30.0  # between keep-alive requests
    send_timeout: float = 10.0  # to write one response
    receive_size: int = 4096
    linger_timeout: float = 2.0  # after an error response, see _linger
    linger_bytes: int = 256 * 1024


_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
_API_PREFIX = "/api/"
_REFUSAL_LOG_INTERVAL = 60.0  # seconds between log lines about one source's refusals
_REFUSAL_SOURCES = 1024  # sources remembered for that; the oldest is forgotten first


class _Refusals:
    """Logs refused /api requests once per source address per interval, with the
    number refused meanwhile, so a scanner cannot flood the log."""

    def __init__(self, interval: float = _REFUSAL_LOG_INTERVAL) -> None:
        self.interval = interval
        self._sources: dict[str, list[float]] = {}  # source -> [logged at, suppressed]

    def refused(self, source: str, path: str, why: str, now: float) -> None:
        entry = self._sources.get(source)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return
        suppressed = int(entry[1]) if entry is not None else 0
        self._sources.pop(source, None)
        if len(self._sources) >= _REFUSAL_SOURCES:
            self._sources.pop(next(iter(self._sources)))
        self._sources[source] = [now, 0]
        more = f" ({suppressed} more refused since the last line)" if suppressed else ""
        log.warning("admin: refused %s from %s: %s (401)%s", path[:128], source, why, more)


def _bearer(request: h11.Request) -> bytes | None:
    for name, value in request.headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
            return None
    return None


class _AdminServer:
    def __init__(
        self,
        registry: Registry,
        metrics_registry: Any,
        readiness: Readiness,
        limits: AdminLimits,
        api_token: ApiToken | None = None,
    ) -> None:
        self.registry = registry
        self.api_token = api_token
        self.refusals = _Refusals()
        self.metrics_registry = _collector_registry(metrics_registry)
        self.readiness = readiness
        self.limits = limits
        self.active = 0
        self._saturated = False
        # Rendering metrics can take milliseconds with many series: do it in a
        # worker thread (prometheus_client is thread-safe), one scrape at a time,
        # so relays on the event loop never wait for a scrape.
        self._render_limiter = trio.CapacityLimiter(1)
        api = {
            "/api/connections": registry.connections,
            "/api/links": registry.links,
            "/api/routes": registry.routes,
            "/api/connectors": registry.connectors,
            "/api/listeners": registry.listeners,
            "/api/credentials": registry.credentials,
            "/api/store": registry.store,
        }
        self.routes: dict[str, Handler] = {
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            **{path: _json_handler(snapshot) for path, snapshot in api.items()},
        }

    async def handle(self, stream: trio.SocketStream) -> None:
        if self.active >= self.limits.max_connections:
            if not self._saturated:  # once per episode, not once per connection
                log.warning("admin: %d connections open, closing new ones", self.active)
                self._saturated = True
            await trio.aclose_forcefully(stream)
            return
        self._saturated = False
        self.active += 1
        try:
            await self._serve(stream, _peer_host(stream))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # One bad exchange must not end the admin server.
            log.exception("admin: connection failed")
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream, peer: str = "?") -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_request_head)
        while True:
            try:
                event = await self._read_head(conn, stream)
                if not isinstance(event, h11.Request):
                    return  # idle timeout, or the client closed
                request = event
                # An unexpected request body must arrive within header_timeout too.
                with trio.move_on_after(self.limits.header_timeout) as body_timer:
                    body_ok = await self._drain_body(conn, stream)
                if body_timer.cancelled_caught:
                    raise trio.TooSlowError
                if not body_ok:
                    await self._send_error(conn, stream, 413, "request body too large")
                    return
            except h11.RemoteProtocolError as exc:
                await self._send_error(conn, stream, exc.error_status_hint, "bad request")
                return
            except trio.TooSlowError:
                await self._send_error(conn, stream, 408, "request timeout")
                return

            status, content_type, body = await self._dispatch(request, peer)
            if not await self._send_response(conn, stream, request, status, content_type, body):
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _read_head(self, conn: h11.Connection, stream: trio.SocketStream) -> Any:
        """The next h11 event; None when the connection stays idle too long.

        Waiting for a request to start is bounded by idle_timeout; once its
        first byte is in, the rest of the head must follow within
        header_timeout (TooSlowError otherwise).
        """
        deadline = trio.current_time() + self.limits.idle_timeout
        started = False
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_at(deadline) as scope:
                data = await stream.receive_some(self.limits.receive_size)
            if scope.cancelled_caught:
                if started:
                    raise trio.TooSlowError
                return None
            conn.receive_data(data)
            if data and not started:
                started = True
                deadline = trio.current_time() + self.limits.header_timeout

    async def _drain_body(self, conn: h11.Connection, stream: trio.SocketStream) -> bool:
        received = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(self.limits.receive_size))
                continue
            if isinstance(event, h11.Data):
                received += len(event.data)
                if received > self.limits.max_request_body:
                    return False
                continue
            # EndOfMessage, or ConnectionClosed mid-body (h11 raises on that).
            return True

    async def _dispatch(self, request: h11.Request, peer: str = "?") -> Response:
        method = request.method.upper()
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        if path.startswith(_API_PREFIX) or path == _API_PREFIX.rstrip("/"):
            refusal = self._authorize(request, path, peer)
            if refusal is not None:
                return refusal
        handler = self.routes.get(path)
        if handler is None:
            return 404, _TEXT, b"not found\n"
        if method not in (b"GET", b"HEAD"):
            return 405, _TEXT, b"method not allowed\n"
        try:
            return await handler(request)
        except Exception:
            log.exception("admin: handler for %s failed", path)
            return 500, _TEXT, b"internal error\n"

    def _authorize(self, request: h11.Request, path: str, peer: str) -> Response | None:
        """None when /api/* may be answered; the 401 response otherwise."""
        token = self.api_token() if self.api_token is not None else None
        if token is None:
            return None
        expected = (token.get_secret_value() if hasattr(token, "get_secret_value")
                    else str(token)).encode()  # fmt: skip
        given = _bearer(request)
        if given is not None and hmac.compare_digest(given, expected):
            return None
        why = "no bearer token" if given is None else "wrong bearer token"
        self.refusals.refused(peer, path, why, trio.current_time())
        return 401, _TEXT, b"unauthorized: /api needs Authorization: Bearer <admin.token_file>\n"

    async def _metrics(self, request: h11.Request) -> Response:
        accept = ""
        for name, value in request.headers:
            if name == b"accept":
                accept = value.decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        body = await trio.to_thread.run_sync(
            encoder, self.metrics_registry, limiter=self._render_limiter
        )
        return 200, content_type, body

    async def _healthz(self, _request: h11.Request) -> Response:
        return 200, _TEXT, b"ok\n"

    async def _readyz(self, _request: h11.Request) -> Response:
        try:
            ready, reason = self.readiness()
        except Exception:
            log.exception("admin: readiness check failed")
            return 503, _TEXT, b"readiness check failed\n"
        body = (reason or ("ready" if ready else "not ready")).encode() + b"\n"
        return (200 if ready else 503), _TEXT, body

    async def _send_response(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        request: h11.Request,
        status: int,
        content_type: str,
        body: bytes,
    ) -> bool:
        headers = [
            ("content-type", content_type),
            ("content-length", str(len(body))),
            ("cache-control", "no-store"),
            ("x-content-type-options", "nosniff"),
        ]
        if status == 405:
            headers.append(("allow", "GET, HEAD"))
        elif status == 401:
            headers.append(("www-authenticate", 'Bearer realm="iot-gateway admin API"'))
        response = h11.Response(status_code=status, headers=headers, reason=_reason(status))
        events: list[Any] = [response]
        if request.method.upper() != b"HEAD" and body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        return await self._send(conn, stream, events)

    async def _send_error(
        self, conn: h11.Connection, stream: trio.SocketStream, status: int, text: str
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = text.encode() + b"\n"
        headers = [
            ("content-type", _TEXT),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        try:
            response = h11.Response(status_code=status, headers=headers, reason=_reason(status))
            events = [response, h11.Data(data=body)]
            sent = await self._send(conn, stream, [*events, h11.EndOfMessage()])
        except h11.LocalProtocolError:
            return
        if sent:
            await self._linger(stream)

    async def _linger(self, stream: trio.SocketStream) -> None:
        """Close gracefully after an error response.

        Closing a socket with unread input makes the kernel send a reset,
        which can destroy the response before the client reads it; so signal
        EOF and discard what the client still sends, for a bounded time and size.
        """
        with trio.move_on_after(self.limits.linger_timeout):
            await stream.send_eof()
            discarded = 0
            while discarded < self.limits.linger_bytes:
                chunk = await stream.receive_some(self.limits.receive_size)
                if not chunk:
                    break
                discarded += len(chunk)

    async def _send(
        self, conn: h11.Connection, stream: trio.SocketStream, events: list[Any]
    ) -> bool:
        data = b"".join(conn.send(event) or b"" for event in events)
        with trio.move_on_after(self.limits.send_timeout) as scope:
            await stream.send_all(data)
        return not scope.cancelled_caught


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return "?"


def _reason(status: int) -> bytes:
    """The standard reason phrase (``200 OK``); some clients and proxies log or expect it."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _json_handler(snapshot: Callable[[], Any]) -> Handler:
    async def handler(_request: h11.Request) -> Response:
        body = json.dumps(snapshot(), separators=(",", ":"), default=str).encode() + b"\n"
        return 200, _JSON, body

    return handler


def _collector_registry(metrics_registry: Any) -> CollectorRegistry:
    if metrics_registry is None:
        return REGISTRY
    inner = getattr(metrics_registry, "registry", None)  # a Metrics facade
    if isinstance(inner, CollectorRegistry):
        return inner
    return metrics_registry


def _host_port(listen: Any) -> tuple[str | None, int]:
    if isinstance(listen, tuple | list):
        host, port = listen[0], listen[1]
    else:
        host, port = listen.host, listen.port
    host = str(host).strip("[]") if host is not None else None
    # An empty host or a wildcard means every interface.
    return (None if host in ("", "*", None) else host), int(port)


async def serve_admin(
    listen: Any,
    registry: Registry,
    metrics_registry: Any,
    readiness: Readiness,
    *,
    limits: AdminLimits | None = None,
    sockets: list[trio.SocketListener] | None = None,
    api_token: ApiToken | None = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoint until cancelled.

    ``listen`` is a HostPort (``.host``, ``.port``) or a ``(host, port)`` tuple;
    port 0 picks a free port. ``task_status.started`` receives the bound
    ``(host, port)`` addresses. ``metrics_registry`` is a CollectorRegistry,
    a :class:`gateway.ops.metrics.Metrics` facade, or None for the default
    prometheus_client registry. ``sockets``: already bound (the daemon binds
    before it serves anything); by default ``listen`` is bound here. ``api_token``
    returns the bearer token /api/* requires (a str or SecretStr), or None.
    """
    host, port = _host_port(listen)
    server = _AdminServer(registry, metrics_registry, readiness, limits or AdminLimits(),
                          api_token)  # fmt: skip
    listeners = list(sockets or ()) or await trio.open_tcp_listeners(port, host=host)
    addresses = [tuple(listener.socket.getsockname()[:2]) for listener in listeners]
    log.info("admin endpoint listening on %s", ", ".join(_fmt(a) for a in addresses))
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        task_status.started(addresses)  # type: ignore[arg-type]


def _fmt(address: tuple[Any, ...]) -> str:
    host, port = str(address[0]), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
