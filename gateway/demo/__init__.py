"""``iot-gateway demo``: the hub emulator, the gateway and two sample devices, on loopback.

Starts hubsim in-process (TLS with a throwaway CA), writes a gateway config for
it, runs ``python -m gateway run -c FILE`` as its own process, drives a
python-qpid-proton AMQP device and a paho-mqtt device through the gateway, and
prints what each device did next to what the hub recorded. Exit status 0 when
the hub's records match what the devices sent and got, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="iot-gateway demo",
        description="Run an IoT Hub emulator, the gateway and two sample devices on 127.0.0.1, "
        "and show what crossed the gateway and what the hub received.",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the hub emulator and the gateway up afterwards; print ports, device ids, "
        "keys and example commands; stop with Ctrl-C",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the gateway's log and device steps live"
    )
    parser.add_argument(
        "--keep-files",
        action="store_true",
        help="keep the generated config and the gateway log (kept anyway on failure)",
    )
    parser.add_argument(
        "--transport",
        choices=("tcp", "websockets"),
        default="tcp",
        help="how the gateway reaches the hub: tcp (AMQPS 5671 / MQTTS 8883 style ports) or "
        "websockets (both protocols over wss://.../$iothub/websocket, as through a firewall "
        "that opens 443 only); devices speak plain AMQP/MQTT to the gateway either way",
    )
    options = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    try:
        from gateway.demo.scenario import Demo, Options
    except ModuleNotFoundError as exc:
        print(
            f"iot-gateway demo: needs the Python package {exc.name!r}; "
            "install the extras: pip install 'iot-gateway[sim]'",
            file=sys.stderr,
        )
        return 1

    logging.basicConfig(
        level=logging.INFO if options.verbose else logging.ERROR,
        format="  %(name)s | %(message)s",
    )
    demo = Demo(
        Options(
            keep_running=options.keep_running,
            verbose=options.verbose,
            keep_files=options.keep_files,
            transport=options.transport,
        ),
        sys.stdout,
    )
    # SIGTERM tears down as Ctrl-C does; SIGINT is handled explicitly too, as the daemon
    # and hubsim do, since a shell that starts the demo in the background leaves it ignored.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return demo.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
