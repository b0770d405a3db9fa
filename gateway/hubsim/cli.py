"""`iot-gateway hubsim`: run the IoT Hub emulator by hand or for black-box checks."""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import signal
import sys
import threading
from typing import Any

from .certs import CertPair
from .hub import HubSim

DEFAULT_HUB = "myhub.azure-devices.net"


class UsageError(Exception):
    pass


def parse_endpoint(text: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port`; port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"{text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if int(port) > 65535:
        raise UsageError(f"{text!r}: port out of range")
    return host, int(port)


def load_devices(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            devices: Any = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: {exc}") from exc
    if not isinstance(devices, dict) or not devices:
        raise UsageError(f"{path}: expected an object mapping device ids to base64 keys")
    for device_id, key in devices.items():
        try:
            if not isinstance(key, str):
                raise ValueError
            base64.b64decode(key, validate=True)
        except (ValueError, binascii.Error):
            raise UsageError(f"{path}: {device_id}: key is not base64") from None
    return devices


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iot-gateway hubsim",
        description="IoT Hub emulator: AMQP 1.0 (CBS, device nodes) and MQTT over TLS.",
    )
    parser.add_argument("--devices", required=True, help="JSON file: {device id: base64 key}")
    parser.add_argument("--hub-host", default=DEFAULT_HUB, help=f"hub host name (default {DEFAULT_HUB})")
    parser.add_argument("--amqp", default="127.0.0.1:5671", help="AMQPS listen address, or 'off'")
    parser.add_argument("--mqtt", default="127.0.0.1:8883", help="MQTTS listen address, or 'off'")
    parser.add_argument(
        "--ws", default="off", help="WebSockets (AMQP and MQTT, wss://HOST:PORT/$iothub/websocket) "
        "listen address, or 'off' (default)"
    )
    parser.add_argument("--cert", help="server certificate chain (PEM); default: a throwaway CA")
    parser.add_argument("--key", help="private key of --cert (PEM)")
    parser.add_argument("--ca", help="CA file to publish for clients (with --cert)")
    parser.add_argument("--token-skew", type=float, default=300, help="seconds of clock skew allowed")
    parser.add_argument("--dps-scope", help="also serve a Device Provisioning Service for this ID scope")
    parser.add_argument(
        "--dps-group-key", action="append", default=[], metavar="BASE64",
        help="a symmetric-key enrollment group's key (repeatable); members' keys derive from it",
    )  # fmt: skip
    parser.add_argument("--dps-amqp", default="127.0.0.1:0", help="DPS AMQPS address, or 'off'")
    parser.add_argument("--dps-mqtt", default="127.0.0.1:0", help="DPS MQTTS address, or 'off'")
    parser.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        devices = load_devices(args.devices)
        amqp = None if args.amqp == "off" else parse_endpoint(args.amqp)
        mqtt = None if args.mqtt == "off" else parse_endpoint(args.mqtt)
        ws = None if args.ws == "off" else parse_endpoint(args.ws)
        if bool(args.cert) != bool(args.key):
            raise UsageError("--cert and --key go together")
        cert = CertPair.from_files(args.cert, args.key, args.ca) if args.cert else None
        dps_amqp = None if args.dps_amqp == "off" else parse_endpoint(args.dps_amqp)
        dps_mqtt = None if args.dps_mqtt == "off" else parse_endpoint(args.dps_mqtt)
        if dps_amqp and dps_mqtt and dps_amqp[0] != dps_mqtt[0]:
            raise UsageError("--dps-amqp and --dps-mqtt must be on the same host")
        for key in args.dps_group_key:
            try:
                base64.b64decode(key, validate=True)
            except (ValueError, binascii.Error):
                raise UsageError("--dps-group-key: not base64") from None
        if args.dps_scope and not args.dps_group_key:
            raise UsageError("--dps-scope needs at least one --dps-group-key")
    except (UsageError, OSError) as exc:
        print(f"iot-gateway hubsim: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    hub = HubSim(
        devices,
        hub_host=args.hub_host,
        amqp_port=amqp[1] if amqp else None,
        mqtt_port=mqtt[1] if mqtt else None,
        cert=cert,
        token_skew=args.token_skew,
        host=amqp[0] if amqp else "127.0.0.1",
        mqtt_host=mqtt[0] if mqtt else None,
        dps_scope=args.dps_scope,
        dps_group_keys={f"group-{i + 1}": k for i, k in enumerate(args.dps_group_key)},
        dps_host=(dps_amqp or dps_mqtt or ("127.0.0.1", 0))[0],
        dps_amqp_port=dps_amqp[1] if dps_amqp else None,
        dps_mqtt_port=dps_mqtt[1] if dps_mqtt else None,
        ws_port=ws[1] if ws else None,
        ws_host=ws[0] if ws else None,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            hub.start()
        except OSError as exc:
            print(f"iot-gateway hubsim: cannot listen: {exc}", file=sys.stderr)
            return 1
        print(f"hubsim: hub {args.hub_host}, {len(devices)} device(s)")
        if amqp:
            print(f"hubsim: amqps on {_show(hub.host)}:{hub.amqp_port}")
        if mqtt:
            print(f"hubsim: mqtts on {_show(hub.mqtt_host)}:{hub.mqtt_port}")
        if args.dps_scope:
            print(f"hubsim: provisioning service, ID scope {args.dps_scope}, "
                  f"{len(args.dps_group_key)} enrollment group(s)")  # fmt: skip
            if hub.dps_amqp_port is not None:
                print(f"hubsim: dps amqps on {_show(hub.dps_host)}:{hub.dps_amqp_port}")
            if hub.dps_mqtt_port is not None:
                print(f"hubsim: dps mqtts on {_show(hub.dps_host)}:{hub.dps_mqtt_port}")
        if ws:
            print(f"hubsim: wss on {_show(hub.ws_host)}:{hub.ws_port}/$iothub/websocket")
        if hub.ca_file:
            print(f"hubsim: CA file {hub.ca_file}")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
        print("hubsim: stopping")
        return 0
    finally:
        hub.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _show(host: str) -> str:
    return f"[{host}]" if ":" in host else host
