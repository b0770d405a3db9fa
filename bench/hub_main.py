"""The emulated IoT Hub as a bench upstream, in a process of its own.

    python -m bench.hub_main --devices N --key-file KEY --cert C --cert-key K --ca CA

Prints one JSON line `{"event": "ready", "amqp_port": .., "mqtt_port": ..}`, then
answers `stats` lines on stdin with the hub's counters, until stdin closes or
SIGTERM. Messages are counted, not kept (the recorder would grow by every
message otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading

from gateway.hubsim import CertPair, HubSim

from .devices import HUB_HOST, device_id
from .procs import emit, raise_fd_limit

LISTEN_BACKLOG = 4096


def _deep_listen_backlog() -> None:
    """asyncio listens with a backlog of 100; a connect storm through stunnel opens a
    thousand hub connections at once and would be slowed by SYN retransmits, not by
    stunnel. The real hub does not drop connects like that, so listen deeper."""
    create_server = asyncio.BaseEventLoop.create_server

    async def deep(self: asyncio.BaseEventLoop, *args: object, **kwargs: object) -> object:
        kwargs.setdefault("backlog", LISTEN_BACKLOG)
        return await create_server(self, *args, **kwargs)  # type: ignore[arg-type]

    asyncio.BaseEventLoop.create_server = deep  # type: ignore[assignment,method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hub_main")
    parser.add_argument("--devices", type=int, required=True, help="bench-00000 .. N-1")
    parser.add_argument("--key-file", required=True,
                        help="file holding the base64 key shared by the bench devices")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--cert-key", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--amqp", action="store_true")
    parser.add_argument("--mqtt", action="store_true")
    parser.add_argument("--ws", action="store_true",
                        help="also serve the enabled protocols over WebSockets (/$iothub/websocket)")
    args = parser.parse_args(argv)
    raise_fd_limit()
    _deep_listen_backlog()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with open(args.key_file, encoding="ascii") as f:
        key = f.read().strip()
    devices = {device_id(i): key for i in range(args.devices)}
    hub = HubSim(
        devices,
        hub_host=HUB_HOST,
        amqp_port=0 if args.amqp else None,
        mqtt_port=0 if args.mqtt else None,
        cert=CertPair.from_files(args.cert, args.cert_key, args.ca),
        ws_port=0 if args.ws else None,
    )
    hub.recorder.keep_d2c = False
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    hub.start()
    try:
        emit("ready", amqp_port=hub.amqp_port, mqtt_port=hub.mqtt_port, ws_port=hub.ws_port)
        reader = threading.Thread(target=_answer_stdin, args=(hub, stop), daemon=True)
        reader.start()
        while not stop.wait(0.5):
            pass
    finally:
        hub.close()
    return 0


def _answer_stdin(hub: HubSim, stop: threading.Event) -> None:
    for line in sys.stdin:
        if line.strip() == "stats":
            rec = hub.recorder
            emit(
                "stats",
                d2c=rec.d2c_count,
                d2c_bytes=rec.d2c_bytes,
                cbs_ok=sum(1 for r in rec.cbs if r.status == 200),
                cbs_failed=sum(1 for r in rec.cbs if r.status != 200),
                connections={p: c.opened for p, c in rec.connections.items()},
                open={p: c.open for p, c in rec.connections.items()},
            )
    stop.set()


if __name__ == "__main__":
    sys.exit(main())
