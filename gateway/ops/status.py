"""``iot-gateway status``: the running gateway's state as qdstat-like tables.

Reads the admin API (``/api/connections``, ``/api/links``, ``/api/routes``,
``/api/connectors``) of a running gateway; stdlib only, so it works from a
minimal shell on the Pi or inside the container.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TextIO

__all__ = ["main", "render_table"]

DEFAULT_ADMIN = "http://127.0.0.1:9090"


class StatusError(Exception):
    pass


def _base_url(admin: str) -> str:
    admin = admin.strip()
    if "://" not in admin:
        admin = "http://" + admin
    return admin.rstrip("/")


def fetch(base_url: str, path: str, timeout: float, *, token: str | None = None) -> Any:
    url = f"{base_url}{path}"
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(16 * 1024 * 1024)
    except urllib.error.HTTPError as exc:
        hint = ""
        if exc.code == 401:
            hint = (" (the gateway wants its admin token: give -c with the configuration "
                    "that names admin.token_file, or --token-file)" if token is None
                    else " (the token does not match the gateway's admin.token_file)")  # fmt: skip
        raise StatusError(f"{url}: HTTP {exc.code} {exc.reason}{hint}") from None
    except urllib.error.URLError as exc:
        raise StatusError(f"cannot reach the admin endpoint at {base_url}: {exc.reason}") from None
    except (OSError, TimeoutError) as exc:
        raise StatusError(f"cannot reach the admin endpoint at {base_url}: {exc}") from None
    try:
        return json.loads(body)
    except ValueError:
        raise StatusError(
            f"{url}: the response is not JSON (is this the gateway's admin port?)"
        ) from None


# -- formatting ------------------------------------------------------------------


def render_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A qdstat-style table: title, column headings, a rule, one line per row."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    lines = [title]
    lines.append(
        "  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    )
    lines.append("  " + "=" * (sum(widths) + 2 * (len(widths) - 1)))
    for row in cells:
        lines.append(
            "  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        )
    if not cells:
        lines.append("  (none)")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple | set):
        return ",".join(_cell(v) for v in value) or "-"
    text = str(value)
    return text if text else "-"


def _age(since: Any, now: float) -> str:
    if not isinstance(since, int | float):
        return "-"
    seconds = max(0, int(now - since))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _devices(ids: Any) -> str:
    if not ids:
        return "-"
    ids = list(ids)
    return ",".join(ids) if len(ids) <= 3 else f"{','.join(ids[:2])},+{len(ids) - 2}"


def connections_table(items: list[dict[str, Any]], now: float) -> str:
    headers = ["id", "kind", "endpoint", "proto", "remote", "devices", "state", "links",
               "msg-in", "msg-out", "bytes-in", "bytes-out", "uptime"]  # fmt: skip
    rows = [
        [
            c.get("id"),
            c.get("kind"),
            c.get("endpoint"),
            c.get("protocol"),
            c.get("remote"),
            _devices(c.get("device_ids")),
            c.get("state"),
            c.get("links", 0),
            c.get("messages_in", 0),
            c.get("messages_out", 0),
            c.get("bytes_in", 0),
            c.get("bytes_out", 0),
            _age(c.get("opened_at"), now),
        ]  # fmt: skip
        for c in items
    ]
    return render_table("Connections", headers, rows)


def links_table(items: list[dict[str, Any]], now: float) -> str:
    headers = ["id", "conn", "name", "role", "dir", "address", "route", "peer",
               "deliveries", "unsettled", "credit", "uptime"]  # fmt: skip
    rows = [
        [
            lk.get("id"),
            lk.get("connection_id"),
            lk.get("name"),
            lk.get("role"),
            lk.get("direction"),
            lk.get("address"),
            lk.get("route"),
            lk.get("upstream_link_id"),
            lk.get("deliveries", 0),
            lk.get("unsettled", 0),
            lk.get("credit", 0),
            _age(lk.get("opened_at"), now),
        ]  # fmt: skip
        for lk in items
    ]
    return render_table("Links", headers, rows)


_ROUTE_ORDER = ("kind", "prefix", "pattern", "hub", "username", "direction", "connector", "target")


def routes_table(items: list[dict[str, Any]], now: float) -> str:
    # Route records are whatever the router publishes: show the well-known
    # keys first, then any others in the order they appear.
    keys: list[str] = [k for k in _ROUTE_ORDER if any(k in r for r in items)]
    for route in items:
        keys.extend(k for k in route if k not in keys)
    rows = [[route.get(k) for k in keys] for route in items]
    return render_table("Routes", keys or ["route"], rows)


def _in_use(c: dict[str, Any]) -> str | None:
    endpoint, address = c.get("endpoint"), c.get("address")
    if not endpoint:
        return None
    host = str(endpoint).rsplit(":", 1)[0].strip("[]")
    return f"{endpoint} ({address})" if address and address != host else str(endpoint)


def connectors_table(items: list[dict[str, Any]], now: float) -> str:
    headers = ["name", "proto", "target", "on-demand", "state", "conns", "in-use", "since",
               "detail"]  # fmt: skip
    rows = [
        [
            c.get("name"),
            c.get("protocol"),
            c.get("target"),
            c.get("on_demand"),
            c.get("state"),
            c.get("connections", 0),
            _in_use(c),
            _age(c.get("since"), now),
            c.get("detail"),
        ]  # fmt: skip
        for c in items
    ]
    table = render_table("Connectors", headers, rows)
    # Failover: the endpoints the last connect skipped (or failed on), and why.
    skipped = [
        [c.get("name"), s.get("endpoint"), s.get("detail")]
        for c in items
        for s in c.get("skipped") or ()
        if isinstance(s, dict)
    ]
    if skipped:
        table += "\n" + render_table("Skipped endpoints", ["connector", "endpoint", "why"], skipped)
    return table


def listeners_table(items: list[dict[str, Any]], now: float) -> str:
    headers = ["name", "proto", "bound", "addresses"]
    rows = [[i.get("name"), i.get("protocol"), i.get("bound"), i.get("addresses")] for i in items]
    return render_table("Listeners", headers, rows)


def store_table(snapshot: dict[str, Any]) -> str:
    from gateway.ops.store_view import store_tables

    return store_tables(snapshot, render_table)


_SECTIONS: dict[str, tuple[str, Callable[[Any, float], str]]] = {
    "connections": ("/api/connections", connections_table),
    "links": ("/api/links", links_table),
    "routes": ("/api/routes", routes_table),
    "connectors": ("/api/connectors", connectors_table),
    "listeners": ("/api/listeners", listeners_table),
    "store": ("/api/store", lambda items, now: store_table(items)),
}
_DEFAULT_SECTIONS = ("connections", "links", "routes", "connectors")


# `-c` given without a value: the connections table, as `-c` meant before it took a file.
_CONNECTIONS = "\0connections"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iot-gateway status",
        description="Show a running gateway's state: a one-screen summary, or with a section "
        "flag its connections, links, routes, connectors or listeners as tables.",
    )
    parser.add_argument(
        "-c",
        "--config",
        nargs="?",
        const=_CONNECTIONS,
        metavar="FILE",
        help="the gateway's configuration file: its admin.listen is asked (default "
        "/etc/iot-gateway/gateway.yaml when readable, else 127.0.0.1:9090); -c with no "
        "file still means --connections",
    )
    parser.add_argument(
        "--admin",
        metavar="URL",
        help=f"admin endpoint of the gateway, instead of -c (e.g. {DEFAULT_ADMIN})",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="bearer token for /api/* (default: the configuration's admin.token_file)",
    )
    parser.add_argument("--connections", action="store_true", help="connections")
    parser.add_argument("-l", "--links", action="store_true", help="AMQP links")
    parser.add_argument("--routes", action="store_true", help="route table")
    parser.add_argument("--connectors", action="store_true", help="connectors and their state")
    parser.add_argument("--listeners", action="store_true", help="listeners and bound addresses")
    parser.add_argument(
        "--store", action="store_true", help="store and forward: backlog by connector and device"
    )
    parser.add_argument(
        "--all", action="store_true", help="connections, links, routes and connectors tables"
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON instead of tables")
    parser.add_argument(
        "--rate-window",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="summary: measure message rates over this long (default 1; 0 = totals only)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    args = build_parser().parse_args(argv)
    if args.config == _CONNECTIONS:
        args.config, args.connections = None, True
    try:
        base = _admin_base(args)
        get = partial(fetch, token=_admin_token(args))
    except StatusError as exc:
        print(f"iot-gateway status: {exc}", file=sys.stderr)
        return 1
    chosen = [name for name in _SECTIONS if getattr(args, name)]
    if not chosen and not args.all and not args.json:
        return _summary(base, args, out, get)
    chosen = chosen or list(_DEFAULT_SECTIONS)
    try:
        data = {name: get(base, _SECTIONS[name][0], args.timeout) for name in chosen}
    except StatusError as exc:
        print(f"iot-gateway status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return 0
    now = time.time()
    tables = []
    for name in chosen:
        if name == "store":  # one object, not a list of rows
            tables.append(store_table(data[name] if isinstance(data[name], dict) else {}))
            continue
        items = data[name] if isinstance(data[name], list) else []
        tables.append(_SECTIONS[name][1](items, now))
    out.write("\n".join(tables))
    return 0


def _admin_base(args: argparse.Namespace) -> str:
    """The admin URL: --admin, else the config's admin.listen, else the default."""
    from gateway.ops.status_summary import DEFAULT_CONFIG, SummaryError, admin_url_from_config

    if args.admin:
        return _base_url(args.admin)
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file() and os.access(DEFAULT_CONFIG, os.R_OK):
        path = DEFAULT_CONFIG
    if path is None:
        return DEFAULT_ADMIN
    try:
        return admin_url_from_config(path)
    except SummaryError as exc:
        raise StatusError(str(exc)) from None


def _admin_token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token-file, else the configuration's admin.token_file."""
    from gateway.ops.status_summary import (
        DEFAULT_CONFIG,
        SummaryError,
        admin_token_from_config,
        read_token,
    )

    try:
        if args.token_file:
            return read_token(Path(args.token_file), "--token-file")
        path = args.config
        if path is None and not args.admin and DEFAULT_CONFIG.is_file():
            path = DEFAULT_CONFIG
        return admin_token_from_config(path) if path is not None else None
    except SummaryError as exc:
        raise StatusError(str(exc)) from None


def _summary(base: str, args: argparse.Namespace, out: TextIO,
             get: Callable[..., Any] = fetch) -> int:  # fmt: skip
    from gateway.ops.status_summary import SummaryError, gather, render_summary

    try:
        snap = gather(base, get, timeout=args.timeout, window=max(0.0, args.rate_window))
    except (StatusError, SummaryError) as exc:
        print(f"iot-gateway status: {exc}", file=sys.stderr)
        return 1
    out.write(render_summary(snap, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
