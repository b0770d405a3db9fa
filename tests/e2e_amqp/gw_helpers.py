"""Helpers for the end-to-end tests: proton devices -> gateway (plaintext) -> hubsim (TLS).

Devices are python-qpid-proton BlockingConnections run in worker threads
(trio.to_thread); tokens are computed here with hmac, independently of the
gateway and of hubsim.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import trio
from proton import Message
from proton.reactor import Container, LinkOption
from proton.utils import BlockingConnection

from gateway.config import GatewayConfig, parse_config_text
from gateway.net.amqp_listener import serve_amqp_listener
from gateway.net.upstream_io import AmqpConnectorIO
from gateway.router.core import Router
from tests.waiting import FAILSAFE, STALL, Stalled

HUB_HOST = "myhub.azure-devices.net"
CBS_TYPE = "servicebus.windows.net:sastoken"
# Fail-safe for one blocking step (open, attach, one reply): bounds a hang, not a speed.
TIMEOUT = FAILSAFE


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def sas_token(resource: str, key_b64: str, expiry: int | None = None) -> str:
    expiry = int(time.time()) + 3600 if expiry is None else expiry
    sr = quote_plus(resource)
    digest = hmac.new(base64.b64decode(key_b64), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    return f"SharedAccessSignature sr={sr}&sig={quote_plus(base64.b64encode(digest).decode())}&se={expiry}"


def device_uri(device_id: str) -> str:
    return f"{HUB_HOST}/devices/{device_id}"


def gateway_config(hub: Any, tmp_path: Path, *, max_connections: int = 2,
                   max_devices: int = 100, listener_extra: str = "", connector_extra: str = "",
                   routes: str | None = None, tls_extra: str = "") -> GatewayConfig:  # fmt: skip
    routes = routes or (
        '  - {prefix: "$cbs", connector: iothub}\n  - {prefix: "devices/", connector: iothub}\n'
    )
    text = f"""
gateway: {{id: gw-test}}
admin: {{enabled: false}}
tls_profiles:
  hub: {{ca_file: "{hub.ca_file}", server_name: {HUB_HOST}}}
{tls_extra}
listeners:
  - {{name: amqp, protocol: amqp, bind: "127.0.0.1:0"{listener_extra}}}
connectors:
  - name: iothub
    protocol: amqp
    host: 127.0.0.1
    port: {hub.amqp_port}
    tls_profile: hub
    connect_timeout: {FAILSAFE:g}s
    reconnect: {{initial: 0.2s, max: 1s}}
    pool: {{max_connections: {max_connections}, max_devices_per_connection: {max_devices}}}
{connector_extra}
link_routes:
{routes}"""
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return parse_config_text(text, str(path))


@dataclass
class RunningGateway:
    router: Router
    port: int
    config: GatewayConfig

    @property
    def url(self) -> str:
        return f"amqp://127.0.0.1:{self.port}"


@asynccontextmanager
async def running_gateway(config: GatewayConfig) -> AsyncIterator[RunningGateway]:
    async with trio.open_nursery() as nursery:
        router = Router(config, connector_io=AmqpConnectorIO())
        await nursery.start(router.run)
        listener = config.listeners[0]
        bound = await nursery.start(serve_amqp_listener, listener, config, router)
        try:
            yield RunningGateway(router, bound[0][1], config)
        finally:
            nursery.cancel_scope.cancel()


class TargetAddress(LinkOption):
    """Sets a receiver's own target address (the CBS reply-to it listens on)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def apply(self, link: Any) -> None:
        link.target.address = self.address

    def test(self, link: Any) -> bool:
        return bool(link.is_receiver)


class Device:
    """A python-qpid-proton device talking plaintext AMQP to the gateway.

    Every method blocks: call it through ``trio.to_thread.run_sync``.
    """

    def __init__(self, url: str, *, mechs: str = "ANONYMOUS", user: str | None = None,
                 password: str | None = None, max_frame_size: int | None = None,
                 container: str | None = None) -> None:  # fmt: skip
        kwargs: dict[str, Any] = {}
        if user is not None:
            kwargs.update(user=user, password=password)
        if max_frame_size is not None:
            kwargs["max_frame_size"] = max_frame_size
        if container is not None:
            reactor = Container()
            reactor.container_id = container
            kwargs["container"] = reactor
        self.conn = BlockingConnection(
            url, allowed_mechs=mechs, virtual_host=HUB_HOST, timeout=TIMEOUT, **kwargs
        )
        self.cbs_tx: Any = None
        self.cbs_rx: Any = None
        self.reply_to: str | None = None
        self.next_id = 0

    def cbs(self, reply_to: str | None = None, names: tuple[str, str] | None = None) -> None:
        options = [TargetAddress(reply_to)] if reply_to else None
        rx_name, tx_name = names or (None, None)
        self.cbs_rx = self.conn.create_receiver("$cbs", options=options, name=rx_name)
        self.cbs_tx = self.conn.create_sender("$cbs", name=tx_name)
        self.reply_to = reply_to

    def put_token(self, audience: str, token: str, message_id: Any = None) -> Message:
        if self.cbs_tx is None:
            self.cbs()
        request = Message(
            id=self.next_id if message_id is None else message_id,
            reply_to=self.reply_to,
            properties={"operation": "put-token", "type": CBS_TYPE, "name": audience},
            body=token,
        )
        if message_id is None:
            self.next_id += 1
        self.cbs_tx.send(request)
        reply = self.cbs_rx.receive(timeout=TIMEOUT)
        return reply

    def authenticate(self, device_id: str, key: str) -> Message:
        return self.put_token(device_uri(device_id), sas_token(device_uri(device_id), key))

    def sync(self) -> None:
        """A round trip through the gateway."""
        self.conn.create_sender("$cbs", name=f"sync-{uuid.uuid4()}").close()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextmanager
def authenticated_device(url: str, device_id: str, key: str) -> Iterator[Device]:
    """A device that has put its own SAS token on ``$cbs``; closed on leaving."""
    with Device(url) as dev:
        dev.authenticate(device_id, key)
        yield dev


def data_message(body: bytes, **props: Any) -> Message:
    msg = Message(body=body, **props)
    msg.inferred = True  # a data section, as the SDKs send telemetry
    return msg


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


def send_all(sender: Any, conn: BlockingConnection, messages: list[Message],
             stall: float = STALL) -> list[Any]:  # fmt: skip
    """Send without waiting per message (proton buffers beyond credit); wait until
    every delivery is settled; return the remote states. However long that takes: it fails
    only if no further delivery is settled for `stall` seconds."""
    from proton import Timeout

    deliveries = [sender.link.send(m) for m in messages]
    done = 0  # deliveries[:done] are settled

    def advance() -> int:
        nonlocal done
        while done < len(deliveries) and (deliveries[done].settled or deliveries[done].remote_state):
            done += 1
        return done

    while advance() < len(deliveries):
        before = done
        try:
            conn.wait(lambda b=before: advance() > b, timeout=stall, msg="waiting for dispositions")
        except Timeout:
            raise Stalled(f"no disposition for {stall:g} s ({done}/{len(deliveries)} settled)") from None
        if conn.disconnected and advance() == before:
            raise ConnectionError(f"disconnected with {done}/{len(deliveries)} settled")
    return [d.remote_state for d in deliveries]


def hub_open_links(hub: Any) -> int:
    """Links currently attached at the hub, counted by hubsim's proton engine."""
    from proton import Endpoint

    def count() -> int:
        n = 0
        for conn in list(hub._amqp.connections):
            pconn = getattr(conn, "conn", None)
            if pconn is None:
                continue
            link = pconn.link_head(0)
            while link is not None:
                if link.state & Endpoint.REMOTE_ACTIVE and not link.state & Endpoint.LOCAL_CLOSED:
                    n += 1
                link = link.next(0)
        return n

    return hub._call(count)


class KillableProxy:
    """A TCP proxy between a device and the gateway that can cut the device off
    abruptly (no AMQP close, the socket just goes), as a crashing device would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._streams: list[trio.SocketStream] = []
        self.connected = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async def handler(client: trio.SocketStream) -> None:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            self._streams += [client, upstream]
            self.connected.set()

            async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
                try:
                    while data := await a.receive_some(65536):
                        await b.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            async with trio.open_nursery() as n:
                n.start_soon(pump, client, upstream)
                n.start_soon(pump, upstream, client)

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as n:
            await n.start(trio.serve_listeners, handler, listeners)
            task_status.started(self)

    async def kill(self) -> None:
        """Reset every proxied connection (SO_LINGER 0 -> RST)."""
        import socket
        import struct

        for s in self._streams:
            try:
                s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            await trio.aclose_forcefully(s)
        self._streams.clear()
