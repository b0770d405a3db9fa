"""Serving device connections: bind, admit or refuse, optional TLS, one task each.

Both protocols use `serve_listener`. A connection is refused before a byte is
read when its source address is outside `allowed_networks` or the listener
already holds `max_connections`; refused connections are closed at once,
logged and counted. With a `tls_profile` the listener terminates device TLS
(handshake bounded by the handshake timeout) before the handler sees the
stream. Each handler runs in its own task: an error in one is logged and
counted and never touches the others.
"""

from __future__ import annotations

import errno
import logging
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, Protocol

import trio

from gateway.logsafe import source

from .plain_stream import PlainStream
from .tls import classify_tls_error, server_context
from .tls_stream import accept_tls_stream

__all__ = [
    "ConnectionHandler",
    "ListenerObserver",
    "ListenerSettings",
    "ListenerStats",
    "peer_address",
    "serve_listener",
]

log = logging.getLogger("gateway.net.listeners")

Peer = tuple[str, int]
ConnectionHandler = Callable[[trio.abc.Stream, Peer], Awaitable[None]]
Network = IPv4Network | IPv6Network

# accept() errors that mean "out of resources": back off briefly instead of dying.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_BACKOFF = 0.1


class ListenerObserver(Protocol):
    """Hooks for metrics; `gateway.ops.metrics.Metrics` has these methods.

    Optionally also ``on_connection_open(listener, protocol, peer) -> key`` and
    ``on_connection_close(key)`` around each accepted connection (the live
    registry, see `gateway.ops.connections.ListenerConnections`).
    """

    def on_device_connect(self, listener: str, protocol: str) -> None: ...
    def on_device_disconnect(self, listener: str, protocol: str) -> None: ...
    def on_device_refused(self, listener: str, reason: str) -> None: ...


@dataclass
class ListenerStats:
    """Live counters of one listener (also handy for tests)."""

    open: int = 0
    accepted: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    handler_errors: int = 0


@dataclass(frozen=True)
class ListenerSettings:
    name: str
    host: str
    port: int
    protocol: str = "mqtt"
    max_connections: int = 1000
    allowed_networks: tuple[Network, ...] = ()
    ssl_context: ssl.SSLContext | None = None
    tls_handshake_timeout: float = 10.0

    @classmethod
    def from_config(cls, listener_cfg: Any, config: Any = None) -> ListenerSettings:
        """Settings from a `listeners[]` entry; `config` resolves its `tls_profile`."""
        ssl_context = None
        if listener_cfg.tls_profile is not None:
            if config is None:
                raise ValueError(f"listener {listener_cfg.name!r}: tls_profile needs the config")
            ssl_context = server_context(config.tls_profiles[listener_cfg.tls_profile])
        return cls(
            name=listener_cfg.name,
            host=listener_cfg.bind.host,
            port=listener_cfg.bind.port,
            protocol=listener_cfg.protocol,
            max_connections=listener_cfg.max_connections,
            allowed_networks=_networks(listener_cfg.allowed_networks),
            ssl_context=ssl_context,
            tls_handshake_timeout=float(listener_cfg.handshake_timeout),
        )


def _networks(values: Iterable[Any]) -> tuple[Network, ...]:
    return tuple(
        v if isinstance(v, IPv4Network | IPv6Network) else ip_network(str(v), strict=False)
        for v in values or ()
    )


def peer_address(stream: trio.SocketStream) -> Peer:
    """(host, port) of the remote end; IPv6 flow info and scope id dropped."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return ("?", 0)
    if isinstance(address, tuple) and len(address) >= 2:
        return (str(address[0]), int(address[1]))
    return (str(address), 0)


def is_allowed(host: str, networks: Sequence[Network]) -> bool:
    if not networks:
        return True
    try:
        addr: IPv4Address | IPv6Address = ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    candidates = [addr]
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        # A dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d.
        candidates.append(addr.ipv4_mapped)
    return any(a.version == n.version and a in n for a in candidates for n in networks)


class _NullObserver:
    def on_device_connect(self, listener: str, protocol: str) -> None:
        pass

    def on_device_disconnect(self, listener: str, protocol: str) -> None:
        pass

    def on_device_refused(self, listener: str, reason: str) -> None:
        pass


async def serve_listener(
    settings: ListenerSettings,
    handler: ConnectionHandler,
    *,
    observer: ListenerObserver | None = None,
    stats: ListenerStats | None = None,
    task_status: trio.TaskStatus[list[Peer]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. `task_status.started()` gets the bound (host, port) list.

    Sockets already bound in ``settings.sockets`` (if it has them) are served instead
    of binding anew: the daemon binds every listener before it serves any."""
    obs: ListenerObserver = observer or _NullObserver()
    counters = stats if stats is not None else ListenerStats()
    opened = getattr(obs, "on_connection_open", None)
    closed = getattr(obs, "on_connection_close", None)
    host = settings.host or None
    listeners = list(getattr(settings, "sockets", None) or ())
    if not listeners:
        listeners = await trio.open_tcp_listeners(settings.port, host=host)
    bound = [peer_address_of_listener(listener) for listener in listeners]
    log.info(
        "listener %s (%s) bound to %s%s",
        settings.name,
        settings.protocol,
        ", ".join(_fmt(a) for a in bound),
        " with TLS" if settings.ssl_context else "",
    )

    def refuse(peer: Peer, reason: str, detail: str) -> None:
        counters.refused[reason] += 1
        obs.on_device_refused(settings.name, reason)
        log.warning("listener %s refused %s: %s", settings.name, _fmt(peer), detail,
                    extra=source(peer[0]))  # fmt: skip

    async def run_connection(stream: trio.SocketStream, peer: Peer) -> None:
        conn: trio.abc.Stream = stream
        try:
            if settings.ssl_context is not None:
                try:
                    with trio.fail_after(settings.tls_handshake_timeout):
                        tls = await accept_tls_stream(stream, settings.ssl_context)
                except (trio.TooSlowError, trio.BrokenResourceError) as exc:
                    refuse(
                        peer, "tls_handshake", f"TLS handshake failed ({classify_tls_error(exc)})"
                    )
                    return
                conn = tls
            else:
                conn = PlainStream.from_trio(stream)
            counters.accepted += 1
            obs.on_device_connect(settings.name, settings.protocol)
            key = opened(settings.name, settings.protocol, peer) if opened is not None else None
            try:
                await handler(conn, peer)
            finally:
                if closed is not None:
                    closed(key)
                obs.on_device_disconnect(settings.name, settings.protocol)
        except Exception:
            counters.handler_errors += 1
            log.exception("listener %s: connection from %s failed", settings.name, _fmt(peer))
        finally:
            counters.open -= 1
            await trio.aclose_forcefully(conn)

    async def accept_loop(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _RESOURCE_ERRNOS:
                        raise
                    log.error("listener %s: accept failed: %s", settings.name, exc)
                    await trio.sleep(_ACCEPT_BACKOFF)
                    continue
                peer = peer_address(stream)
                if not is_allowed(peer[0], settings.allowed_networks):
                    refuse(peer, "network", "source address not in allowed_networks")
                    await trio.aclose_forcefully(stream)
                    continue
                if counters.open >= settings.max_connections:
                    refuse(peer, "max_connections", f"{settings.max_connections} connections open")
                    await trio.aclose_forcefully(stream)
                    continue
                counters.open += 1
                nursery.start_soon(run_connection, stream, peer)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, nursery)
        task_status.started(bound)


def peer_address_of_listener(listener: trio.SocketListener) -> Peer:
    address = listener.socket.getsockname()
    return (str(address[0]), int(address[1]))


def _fmt(address: Peer) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
