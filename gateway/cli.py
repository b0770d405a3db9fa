"""The ``iot-gateway`` command line.

Exit codes: 0 ok, 1 runtime error, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TextIO

from gateway import __version__

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2

# Subcommands implemented elsewhere: name -> (module, help). Each module has main(argv) -> int.
DELEGATED: dict[str, tuple[str, str]] = {
    "hubsim": ("gateway.hubsim.cli", "run the IoT Hub emulator (tests, demos, manual checks)"),
    "demo": ("gateway.demo", "run hub emulator + gateway + sample devices and show the traffic"),
    "status": ("gateway.ops.status", "show connections, links, routes and connectors of a gateway"),
}

TRACE_PROTOCOLS = ("amqp", "mqtt")
log = logging.getLogger("gateway.cli")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in DELEGATED:
        return _delegate(args[0], args[1:])
    parser = _build_parser()
    try:
        options = parser.parse_args(args)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    if options.command is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    handler: Callable[[argparse.Namespace], int] = options.handler
    return handler(options)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iot-gateway",
        description="Transparent AMQP 1.0 / MQTT gateway: plaintext devices on the LAN, "
        "TLS to Azure IoT Hub.",
    )
    parser.add_argument("--version", action="version", version=f"iot-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the gateway daemon")
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    run.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="overrides log.level"
    )
    run.add_argument(
        "--trace",
        metavar="PROTOCOLS",
        help="log every frame of these protocols, comma-separated: amqp,mqtt (overrides log.trace)",
    )
    run.set_defaults(handler=_cmd_run)

    check = sub.add_parser("check", help="validate a config file and print the route table")
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    check.set_defaults(handler=_cmd_check)

    sas = sub.add_parser("sas", help="generate an IoT Hub SAS token for a device or module")
    sas.add_argument("--host", required=True, help="hub host, e.g. myhub.azure-devices.net")
    sas.add_argument("--device-id", required=True)
    sas.add_argument("--module-id")
    sas.add_argument("--key", required=True, help="base64 key ('-' reads it from stdin)")
    expiry = sas.add_mutually_exclusive_group(required=True)
    expiry.add_argument("--ttl", help="lifetime from now: 30m, 1h, 7d")
    expiry.add_argument("--expiry", type=int, metavar="EPOCH", help="absolute expiry, Unix seconds")
    sas.add_argument("--policy", help="shared access policy name (adds skn=)")
    sas.set_defaults(handler=_cmd_sas)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(handler=_cmd_version)

    for name, (_, help_text) in DELEGATED.items():
        # Parsed by the subcommand's own main; listed here for --help.
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _delegate(name: str, argv: list[str]) -> int:
    module_name = DELEGATED[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"iot-gateway {name}: not available in this installation", file=sys.stderr)
        else:
            print(
                f"iot-gateway {name}: needs the Python package {exc.name!r}; "
                "install the extras: pip install 'iot-gateway[sim]'",
                file=sys.stderr,
            )
        return EXIT_RUNTIME
    return int(module.main(argv))


def _load(path: str, err: TextIO) -> GatewayConfig | None:
    from gateway.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=err)
        return None


def _parse_trace(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in TRACE_PROTOCOLS]
    if unknown:
        raise ValueError(f"--trace: unknown protocol {unknown[0]!r} (use amqp, mqtt)")
    return names


def _cmd_run(options: argparse.Namespace) -> int:
    try:
        trace_override = _parse_trace(options.trace)
    except ValueError as exc:
        print(f"iot-gateway run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    config = _load(options.config, sys.stderr)
    if config is None:
        return EXIT_CONFIG
    from gateway.ops.logging import setup_logging

    setup_logging(options.log_level or config.log.level, config.log.format)
    trace = trace_override if trace_override is not None else tuple(config.log.trace)
    from gateway import daemon

    try:
        return int(daemon.run(config, trace=trace))
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception:
        log.exception("gateway stopped by an unexpected error")
        return EXIT_RUNTIME


def _cmd_check(options: argparse.Namespace) -> int:
    config = _load(options.config, sys.stderr)
    if config is None:
        return EXIT_CONFIG
    from gateway.config.summary import render_summary

    print(f"{options.config}: OK")
    print(render_summary(config), end="")
    return EXIT_OK


def _cmd_sas(options: argparse.Namespace) -> int:
    from gateway.auth.sas import device_resource_uri, generate_sas_token
    from gateway.config import parse_duration

    key = sys.stdin.readline().strip() if options.key == "-" else options.key
    if options.expiry is not None:
        expiry = options.expiry
    else:
        try:
            ttl = parse_duration(options.ttl)
        except ValueError as exc:
            print(f"iot-gateway sas: --ttl: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if ttl <= 0:
            print("iot-gateway sas: --ttl must be greater than 0", file=sys.stderr)
            return EXIT_CONFIG
        expiry = int(time.time() + ttl)
    uri = device_resource_uri(options.host, options.device_id, options.module_id)
    try:
        token = generate_sas_token(uri, key, expiry, options.policy)
    except ValueError as exc:
        print(f"iot-gateway sas: --key: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiry))
    print(f"# resource {uri}, expires {expires}", file=sys.stderr)
    print(token)
    return EXIT_OK


def _cmd_version(options: argparse.Namespace) -> int:
    print(f"iot-gateway {__version__}")
    return EXIT_OK
