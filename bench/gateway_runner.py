"""The gateway's relays without the daemon around them (`--gateway-runner runner`).

    python -m bench.gateway_runner -c FILE

Starts the AMQP router with its listeners and the MQTT listeners from the same
configuration file, and stops on SIGTERM/SIGINT. No admin endpoint, no
metrics registry, no sd_notify: comparing it with the daemon shows what those
cost.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

import trio

from gateway.config import ConfigError, load_config
from gateway.ops.logging import setup_logging

from .procs import raise_fd_limit

log = logging.getLogger("bench.gateway_runner")


async def serve(config: Any) -> None:
    from gateway.daemon import serve_mqtt_listener

    amqp_listeners = [item for item in config.listeners if item.protocol == "amqp"]
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            if amqp_listeners:
                from gateway.net.amqp_listener import serve_amqp_listener
                from gateway.net.upstream_io import AmqpConnectorIO
                from gateway.router.core import Router

                router = Router(config, connector_io=AmqpConnectorIO())
                await nursery.start(router.run)
                for listener in amqp_listeners:
                    await nursery.start(serve_amqp_listener, listener, config, router)
            for listener in config.listeners:
                if listener.protocol == "mqtt":
                    await nursery.start(serve_mqtt_listener, listener, config)
            log.info("bench gateway runner started")
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_runner")
    parser.add_argument("-c", "--config", required=True)
    args = parser.parse_args(argv)
    raise_fd_limit()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    setup_logging(config.log.level, config.log.format)
    trio.run(serve, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
