"""The ``iot-gateway`` command line.

Exit codes: 0 ok, 1 runtime error, 2 bad configuration or usage; ``run`` also
3-6 for start-up failures (`gateway.ops.startup`, docs/operations.md "Exit status").
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
    from gateway.auth.credentials import CredentialStore
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
    run.add_argument(
        "--allow-placeholders",
        action="store_true",
        help="start even with the examples' placeholders (myhub.azure-devices.net, ...) left "
        "in the configuration, if they really are yours",
    )
    run.set_defaults(handler=_cmd_run)

    check = sub.add_parser("check", help="validate a config file and print the route table")
    check.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    check.set_defaults(handler=_cmd_check)

    sas = sub.add_parser(
        "sas",
        help="generate an IoT Hub SAS token for a device or module",
        description="Generate a SAS token from a key (--host --device-id --key) or for a "
        "device in a config file's credentials section (--from-config DEVICE -c FILE).",
    )
    sas.add_argument("--host", help="hub host, e.g. myhub.azure-devices.net")
    sas.add_argument("--device-id")
    sas.add_argument("--module-id")
    sas.add_argument("--key", help="base64 key ('-' reads it from stdin)")
    sas.add_argument(
        "--from-config",
        metavar="DEVICE",
        help="use the key the config holds for DEVICE (or DEVICE/MODULE); needs -c",
    )
    sas.add_argument("-c", "--config", metavar="FILE", help="YAML config file (--from-config)")
    expiry = sas.add_mutually_exclusive_group()
    expiry.add_argument("--ttl", help="lifetime from now: 30m, 1h, 7d")
    expiry.add_argument("--expiry", type=int, metavar="EPOCH", help="absolute expiry, Unix seconds")
    sas.add_argument("--policy", help="shared access policy name (adds skn=)")
    sas.set_defaults(handler=_cmd_sas, parser=sas)

    credentials = sub.add_parser(
        "credentials", help="list the credentials a config holds, or hash a local password"
    )
    credentials.set_defaults(handler=_cmd_credentials_usage, parser=credentials)
    actions = credentials.add_subparsers(dest="action", metavar="ACTION")
    listing = actions.add_parser(
        "list", help="each device's auth mode, local auth and token expiry (never the secret)"
    )
    listing.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    listing.set_defaults(handler=_cmd_credentials_list)
    hashing = actions.add_parser(
        "hash-password",
        help="hash a device's local password for local_password_hash",
        description="Reads the password from stdin (first line) or, on a terminal, prompts "
        "twice; prints a scrypt$N$r$p$salt$hash string for local_password_hash.",
    )
    hashing.set_defaults(handler=_cmd_hash_password)

    qdr = sub.add_parser(
        "import-qdrouterd",
        help="convert a Qpid Dispatch Router configuration to gateway YAML",
        description="Read a qdrouterd.conf (its own format or the JSON form) and write the "
        "equivalent gateway YAML, with a '# not carried over:' comment, and why, for every "
        "entity or attribute the gateway has no equivalent for.",
    )
    qdr.add_argument("file", metavar="FILE", help="qdrouterd.conf (or a .json configuration)")
    qdr.add_argument("-o", "--output", metavar="OUT", help="write here instead of stdout")
    qdr.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    qdr.set_defaults(handler=_cmd_import_qdrouterd)

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
    if config.placeholders and not options.allow_placeholders:
        for line in config.placeholders:
            print(line, file=sys.stderr)
        print("iot-gateway run: refusing to start with the examples' placeholders above; "
              "replace them, or pass --allow-placeholders if they really are yours",
              file=sys.stderr)  # fmt: skip
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
    for line in config.placeholders:
        # `run` refuses these (unless --allow-placeholders): say so now.
        head, _, message = line.partition(": ")
        key, _, text = message.partition(": ")
        print(f"{head}: {key}: warning: {text} (`run` refuses to start with it)", file=sys.stderr)
    return EXIT_OK


def _usage_error(options: argparse.Namespace, message: str) -> int:
    parser: argparse.ArgumentParser = options.parser
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _cmd_sas(options: argparse.Namespace) -> int:
    if options.from_config is not None:
        return _cmd_sas_from_config(options)
    if options.config is not None:
        return _usage_error(options, "-c/--config is only used with --from-config")
    missing = [
        flag
        for flag, value in (
            ("--host", options.host),
            ("--device-id", options.device_id),
            ("--key", options.key),
        )
        if value is None
    ]
    if missing:
        return _usage_error(
            options,
            f"the following arguments are required: {', '.join(missing)} (or --from-config)",
        )
    if options.ttl is None and options.expiry is None:
        return _usage_error(options, "one of the arguments --ttl --expiry is required")
    key = sys.stdin.readline().strip() if options.key == "-" else options.key
    expiry = _sas_expiry(options, None)
    if expiry is None:
        return EXIT_CONFIG
    return _print_sas(
        options.host, options.device_id, options.module_id, key, expiry, options.policy
    )


def _sas_expiry(options: argparse.Namespace, default_ttl: float | None) -> int | None:
    """The token expiry from --expiry, --ttl or ``default_ttl``; None after printing an error."""
    from gateway.config import parse_duration

    if options.expiry is not None:
        return int(options.expiry)
    if options.ttl is None:
        assert default_ttl is not None
        return int(time.time() + default_ttl)
    try:
        ttl = parse_duration(options.ttl)
    except ValueError as exc:
        print(f"iot-gateway sas: --ttl: {exc}", file=sys.stderr)
        return None
    if ttl <= 0:
        print("iot-gateway sas: --ttl must be greater than 0", file=sys.stderr)
        return None
    return int(time.time() + ttl)


def _print_sas(
    host: str, device_id: str, module_id: str | None, key: str, expiry: int, policy: str | None
) -> int:
    from gateway.auth.sas import device_resource_uri, generate_sas_token

    uri = device_resource_uri(host, device_id, module_id)
    try:
        token = generate_sas_token(uri, key, expiry, policy)
    except ValueError as exc:
        print(f"iot-gateway sas: --key: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiry))
    print(f"# resource {uri}, expires {expires}", file=sys.stderr)
    print(token)
    return EXIT_OK


def _cmd_sas_from_config(options: argparse.Namespace) -> int:
    conflicting = [
        flag
        for flag, value in (
            ("--device-id", options.device_id),
            ("--module-id", options.module_id),
            ("--key", options.key),
            ("--policy", options.policy),
        )
        if value is not None
    ]
    if conflicting:
        return _usage_error(
            options,
            f"--from-config takes the identity and key from the config, not {conflicting[0]}",
        )
    if options.config is None:
        return _usage_error(options, "--from-config needs -c/--config FILE")
    config = _load(options.config, sys.stderr)
    if config is None:
        return EXIT_CONFIG
    store = _credential_store(config, options.config)
    if store is None:
        return EXIT_CONFIG
    entry = store.lookup_identity(options.from_config)
    if entry is None:
        print(
            f"iot-gateway sas: no credentials for {options.from_config!r} in {options.config}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if entry.key is None:
        print(
            f"iot-gateway sas: {entry.identity} authenticates with an X.509 certificate "
            f"({entry.cert_file}), not a SAS token",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    host = options.host or _single_hub_host(config)
    if host is None:
        hosts = ", ".join(sorted(_hub_hosts(config))) or "none"
        print(
            f"iot-gateway sas: name the hub with --host (connector hosts in "
            f"{options.config}: {hosts})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    expiry = _sas_expiry(options, store.token_ttl)
    if expiry is None:
        return EXIT_CONFIG
    return _print_sas(
        host, entry.device_id, entry.module_id, entry.key.get_secret_value(), expiry, None
    )


def _hub_hosts(config: GatewayConfig) -> set[str]:
    """The hub host names the config's connectors reach (AMQP open hostname / TLS name)."""
    hosts: set[str] = set()
    for connector in config.connectors:
        name = getattr(connector, "hostname", None)
        if not name:
            profile = config.tls_profile_for(connector)
            name = (profile and profile.server_name) or connector.host
        hosts.add(name.lower())
    return hosts


def _single_hub_host(config: GatewayConfig) -> str | None:
    hosts = _hub_hosts(config)
    return hosts.pop() if len(hosts) == 1 else None


def _credential_store(config: GatewayConfig, path: str) -> CredentialStore | None:
    from gateway.auth.credentials import CredentialError, CredentialStore

    try:
        return CredentialStore.from_config(config.credentials)
    except CredentialError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return None


def _cmd_credentials_usage(options: argparse.Namespace) -> int:
    options.parser.print_help(sys.stderr)
    return EXIT_CONFIG


def _cmd_credentials_list(options: argparse.Namespace) -> int:
    config = _load(options.config, sys.stderr)
    if config is None:
        return EXIT_CONFIG
    if config.credentials is None:
        print(f"{options.config}: no credentials section; devices use their own credentials")
        return EXIT_OK
    store = _credential_store(config, options.config)
    if store is None:
        return EXIT_CONFIG
    from gateway.config.summary import format_duration, table

    token = (
        f"issued on demand (ttl {format_duration(store.token_ttl)}, renew at {store.renew_at:.0%})"
    )
    rows = [["ID", "KIND", "SOURCE", "LOCAL AUTH", "TOKEN EXPIRY"]]
    for row in store.describe():
        rows.append(
            [
                row["id"],
                row["kind"],
                row["source"],
                row["local_auth"],
                token if row["kind"] != "x509" else "none (X.509 certificate)",
            ]
        )
    print(f"credentials in {options.config} ({len(rows) - 1}):")
    print("\n".join(table(rows)))
    for line in store.warnings():
        print(f"warning: {line}", file=sys.stderr)
    return EXIT_OK


def _cmd_hash_password(options: argparse.Namespace) -> int:
    from gateway.auth.local_auth import hash_password

    if sys.stdin is not None and sys.stdin.isatty():
        import getpass

        password = getpass.getpass("Device password: ")
        if getpass.getpass("Again: ") != password:
            print("iot-gateway credentials hash-password: the passwords differ", file=sys.stderr)
            return EXIT_CONFIG
    else:
        password = (sys.stdin.readline() if sys.stdin is not None else "").rstrip("\r\n")
    if not password:
        print("iot-gateway credentials hash-password: empty password", file=sys.stderr)
        return EXIT_CONFIG
    print(hash_password(password))
    return EXIT_OK


def _cmd_import_qdrouterd(options: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.config import ConfigError, parse_config_text
    from gateway.config.qdrouterd import QdrouterdError, import_text

    prog = "iot-gateway import-qdrouterd"
    source = Path(options.file)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{prog}: cannot read {source}: {getattr(exc, 'strerror', None) or exc}",
              file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    try:
        result = import_text(text, source.name if options.output else str(source))
    except QdrouterdError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    target = Path(options.output) if options.output else None
    if target is not None:
        if target.exists() and not options.force:
            print(f"{prog}: {target} exists; pass --force to overwrite it", file=sys.stderr)
            return EXIT_CONFIG
        try:
            target.write_text(result.yaml, encoding="utf-8")
        except OSError as exc:
            print(f"{prog}: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_RUNTIME
    else:
        sys.stdout.write(result.yaml)
    shown = str(target) if target is not None else "<stdout>"
    print(
        f"{prog}: {shown}: {result.listeners} listener(s), {result.connectors} connector(s), "
        f"{result.link_routes} link route(s); {len(result.notes)} item(s) not carried over "
        "(see the '# not carried over:' comments)",
        file=sys.stderr,
    )
    # The result is checked as `iot-gateway check` would, from where it is written:
    # files it names (CA bundles, keys) must exist on this machine for it to pass.
    base = target.parent if target is not None else Path.cwd()
    try:
        parse_config_text(result.yaml, shown, base_dir=base)
    except ConfigError as exc:
        print(f"{prog}: warning: the result does not pass `iot-gateway check` here yet:",
              file=sys.stderr)  # fmt: skip
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
    return EXIT_OK


def _cmd_version(options: argparse.Namespace) -> int:
    print(f"iot-gateway {__version__}")
    return EXIT_OK
