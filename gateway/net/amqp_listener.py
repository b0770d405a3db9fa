"""AMQP device listeners: accept device connections and hand them to the router.

Binding, `allowed_networks`, `max_connections` and device-side TLS come from
`gateway.net.listeners`. Per connection: the AMQP header, SASL (if any) and
open must complete within the listener's ``handshake_timeout``; after that
the engine's idle timeouts apply both ways.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from .amqp_connector import EngineDriver
from .listeners import ListenerSettings, serve_listener

if TYPE_CHECKING:
    from gateway.router.core import Router

log = logging.getLogger("gateway.net.amqp")


async def handle_device(stream: trio.abc.Stream, peer: tuple[str, int], listener: Any,
                        router: Router) -> None:  # fmt: skip
    """Run one device connection until it ends."""
    device = router.new_device(listener, peer)
    driver = EngineDriver(stream, device.engine, device.handle, name=device.id,
                          tracer=router.tracer)  # fmt: skip
    device.driver = driver
    if router.stopping:
        device.shutdown("the gateway is shutting down")
    timeout = float(getattr(listener, "handshake_timeout", 10.0))
    try:
        async with trio.open_nursery() as nursery:

            async def handshake_deadline() -> None:
                with trio.move_on_after(timeout):
                    await device.opened.wait()
                    return
                log.warning("listener %s: %s:%d did not complete the AMQP handshake in %.0fs",
                            device.listener, peer[0], peer[1], timeout)  # fmt: skip
                driver.abort()

            nursery.start_soon(handshake_deadline)
            await driver.run()
            nursery.cancel_scope.cancel()
    finally:
        device.lost(driver.transport_error or "connection ended")


async def serve_amqp_listener(
    listener: Any,
    config: Any,
    router: Router,
    *,
    observer: Any = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one `protocol: amqp` listener until cancelled; started() gets the bound addresses."""
    settings = ListenerSettings.from_config(listener, config)

    async def handler(stream: trio.abc.Stream, peer: tuple[str, int]) -> None:
        await handle_device(stream, peer, listener, router)

    await serve_listener(settings, handler, observer=observer, task_status=task_status)
