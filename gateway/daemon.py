"""The gateway daemon (placeholder until the relays are wired in).

``run(config, *, trace=())`` is the entry point ``iot-gateway run`` calls after
the configuration validated and logging is set up. This version logs what it
would start and waits for SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable

import trio

from gateway.config import GatewayConfig

log = logging.getLogger("gateway.daemon")


def run(config: GatewayConfig, *, trace: Iterable[str] = ()) -> int:
    """Run until SIGINT or SIGTERM; returns the process exit code."""
    return trio.run(_serve, config, tuple(trace))


async def _serve(config: GatewayConfig, trace: tuple[str, ...]) -> int:
    # Install the handlers first, so a signal right after the startup lines is not lost.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        for listener in config.listeners:
            log.info(
                "listener %s: %s on %s (%s)",
                listener.name,
                listener.protocol,
                listener.bind,
                f"tls {listener.tls_profile}" if listener.tls_profile else "plaintext",
            )
        for connector in config.connectors:
            log.info(
                "connector %s: %s to %s (%s)",
                connector.name,
                connector.protocol,
                connector.target,
                f"tls {connector.tls_profile}" if connector.tls_profile else "plaintext",
            )
        if trace:
            log.info("frame trace on for %s", ",".join(trace))
        log.info("gateway %s started", config.gateway.id)
        async for signum in signals:
            log.info("received %s, stopping", signal.Signals(signum).name)
            break
    return 0
