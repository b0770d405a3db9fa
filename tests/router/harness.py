"""A router between two scripted AMQP peers over trio memory streams.

``RouterHarness`` runs the real `Router` with its upstream connect replaced by a
memory stream pair whose far end is a `Peer` (a hub played by the test); each
device is a `Peer` on another memory stream pair handed to `handle_device`.
The peers are our own engine: these tests pin the router's logic (credit,
drain, dispositions, detach errors, attach mirroring) precisely; interop
against independent stacks is in tests/e2e_amqp.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing

from gateway.amqp import Connection, RemoteBegin, SaslClient, SaslServer, SessionState
from gateway.config import parse_config_text
from gateway.net import amqp_listener
from gateway.net.dial import DialReport, Endpoint
from gateway.net.upstream_io import AmqpConnectorIO
from gateway.router import core
from tests.waiting import FAILSAFE

WAIT = FAILSAFE  # bounds a hang, not a speed (tests/waiting.py)


class Peer:
    """One of our engines on a memory stream, with an event log the test waits on."""

    def __init__(self, engine: Connection, stream: Any, name: str) -> None:
        self.engine = engine
        self.stream = stream
        self.name = name
        self.events: list[Any] = []
        self._changed = trio.Event()
        self.auto_begin = True
        self._taken: set[int] = set()  # events already returned by next()

    async def run(self) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(self._reader)
            n.start_soon(self._writer)

    async def _reader(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            for ev in self.engine.receive_data(data):
                if type(ev) is RemoteBegin and self.auto_begin and (
                    ev.session.state is SessionState.BEGIN_RCVD
                ):
                    ev.session.answer_begin()
                self.events.append(ev)
            self.poke()
            if not data:
                return

    async def _writer(self) -> None:
        while True:
            data = self.engine.data_to_send()
            if data:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                continue
            await self._changed.wait()

    def poke(self) -> None:
        """Call after acting on the engine: wakes the writer and any waiter."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = WAIT) -> Any:
        with trio.fail_after(timeout):
            while True:
                value = predicate()
                if value:
                    return value
                await self._changed.wait()

    async def next(self, kind: type, where: Callable[[Any], bool] = lambda e: True,
                   timeout: float = WAIT) -> Any:  # fmt: skip
        """The first event of `kind` (matching `where`) not returned before."""
        def find() -> Any:
            for ev in self.events:
                if id(ev) not in self._taken and isinstance(ev, kind) and where(ev):
                    self._taken.add(id(ev))
                    return ev
            return None

        return await self.wait_for(find, timeout)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def close_abruptly(self) -> None:
        await self.stream.aclose()


CONFIG = """
gateway: {{id: gw-test}}
admin: {{enabled: false}}
listeners:
  - {{name: amqp, protocol: amqp, bind: "127.0.0.1:0", max_frame_size: {device_frame}}}
connectors:
  - name: hub
    protocol: amqp
    host: hub.example
    allow_plaintext: true
    connect_timeout: 2s
    reconnect: {{initial: 0.1s, max: 0.2s}}
    max_frame_size: {hub_frame}
    pool: {{max_connections: {max_connections}, max_devices_per_connection: {max_devices}}}
link_routes:
  - {{prefix: "$cbs", connector: hub}}
  - {{prefix: "devices/", connector: hub}}
  - {{prefix: "queues/", connector: hub}}
"""


class HarnessIO(AmqpConnectorIO):
    """The real connector I/O, with streams to the harness's in-memory hubs."""

    def __init__(self, harness: RouterHarness) -> None:
        self.harness = harness

    async def open_stream(self, connector: Any, profile: Any) -> Any:
        return await self.harness.open_stream(connector, profile)


class RouterHarness:
    def __init__(self, nursery: trio.Nursery, **kw: Any) -> None:
        opts = {"device_frame": 65536, "hub_frame": 65536, "max_connections": 1,
                "max_devices": 10, **kw}  # fmt: skip
        self.config = parse_config_text(CONFIG.format(**opts), "test.yaml")
        self.nursery = nursery
        self.hubs: list[Peer] = []
        self._hub_ready = trio.Event()
        self._ids = itertools.count(1)
        self.hub_frame = opts["hub_frame"]
        self.router = core.Router(self.config, connector_io=HarnessIO(self))

    async def open_stream(self, connector: Any, profile: Any) -> tuple[Any, DialReport]:
        gw_end, hub_end = trio.testing.memory_stream_pair()
        engine = Connection("server", "hub", sasl=SaslServer(["ANONYMOUS"]),
                            max_frame_size=self.hub_frame)
        engine.open()
        hub = Peer(engine, hub_end, f"hub{len(self.hubs) + 1}")
        self.hubs.append(hub)
        self.nursery.start_soon(hub.run)
        self._hub_ready.set()
        return gw_end, DialReport(connector.name, Endpoint(connector.host, connector.port))

    @property
    def hub(self) -> Peer:
        return self.hubs[-1]

    async def device(self, *, max_frame_size: int = 65536, sasl: SaslClient | None = None) -> Peer:
        dev_end, gw_end = trio.testing.memory_stream_pair()
        engine = Connection("client", f"device{next(self._ids)}", sasl=sasl,
                            max_frame_size=max_frame_size, hostname="myhub.azure-devices.net")  # fmt: skip
        engine.open()
        dev = Peer(engine, dev_end, "device")
        listener = SimpleNamespace(name="amqp", sasl=["anonymous", "plain"],
                                   max_frame_size=self.config.listeners[0].max_frame_size,
                                   channel_max=255, idle_timeout=0, handshake_timeout=5)  # fmt: skip
        self.nursery.start_soon(amqp_listener.handle_device, gw_end, ("10.0.0.1", 4242), listener,
                                self.router)  # fmt: skip
        self.nursery.start_soon(dev.run)
        dev.poke()
        return dev


@asynccontextmanager
async def router_harness(
    monkeypatch: Any, *, harness_class: type[RouterHarness] | None = None, **kw: Any
):
    """A running router whose connectors reach the harness's in-memory hubs."""
    async with trio.open_nursery() as nursery:
        h = (harness_class or RouterHarness)(nursery, **kw)
        await nursery.start(h.router.run)
        try:
            yield h
        finally:
            nursery.cancel_scope.cancel()
