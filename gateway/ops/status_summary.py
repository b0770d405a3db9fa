"""``iot-gateway status`` with no section chosen: a one-screen summary (like ``qdstat -g``).

Reads the admin API (connections, links, routes, connectors, listeners),
``/readyz`` and ``/metrics`` (twice, ``window`` seconds apart, for message
rates). Also where ``status -c FILE`` finds the admin endpoint: ``admin.listen``
in the configuration, read without validating the rest of the file (so a
file naming keys or certificates this user cannot read still tells where the
admin endpoint is).
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.ops.store_view import summary_line

__all__ = ["admin_token_from_config", "admin_url_from_config", "gather", "render_summary", "Snapshot"]

# Where systemd/install.sh puts the configuration: used when neither --admin nor -c is given.
DEFAULT_CONFIG = Path("/etc/iot-gateway/gateway.yaml")


class SummaryError(Exception):
    pass


def admin_url_from_config(path: str | Path) -> str:
    """``http://host:port`` of the admin endpoint a configuration file sets up."""
    import yaml

    from gateway.config.hostport import HostPort

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SummaryError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SummaryError(f"{path}: not a YAML configuration: {exc}") from None
    admin = (data or {}).get("admin") if isinstance(data, dict) else None
    admin = admin if isinstance(admin, dict) else {}
    if admin.get("enabled", True) is False:
        raise SummaryError(f"{path}: admin.enabled is false, so there is no admin endpoint to ask")
    try:
        listen = HostPort.parse(str(admin.get("listen", "127.0.0.1:9090")))
    except ValueError as exc:
        raise SummaryError(f"{path}: admin.listen: {exc}") from None
    # A wildcard bind is reached over loopback from the same machine.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host, listen.host)
    return f"http://{HostPort(host, listen.port)}"


def admin_token_from_config(path: str | Path) -> str | None:
    """The bearer token in the configuration's ``admin.token_file`` (relative to the
    file's directory), or None when it names none."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None  # admin_url_from_config has said what is wrong with the file
    admin = (data or {}).get("admin") if isinstance(data, dict) else None
    name = admin.get("token_file") if isinstance(admin, dict) else None
    if not name:
        return None
    return read_token(path.parent / Path(str(name)).expanduser(), f"{path}: admin.token_file")


def read_token(path: Path, what: str) -> str:
    """The token alone from ``path``; SummaryError saying why not."""
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError as exc:
        hint = (" (run status as the gateway's user or root, e.g. sudo -u iot-gateway "
                "iot-gateway status)" if isinstance(exc, PermissionError) else "")  # fmt: skip
        raise SummaryError(f"{what}: cannot read {path}: {exc.strerror or exc}{hint}") from None
    except UnicodeDecodeError:
        raise SummaryError(f"{what}: {path} does not hold an ASCII token") from None


# -- gathering -----------------------------------------------------------------------


class Snapshot:
    """What the summary shows, read from one gateway."""

    def __init__(self) -> None:
        self.api: dict[str, list[dict[str, Any]]] = {}
        self.ready: tuple[bool, str] = (False, "")
        self.metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.earlier: dict[tuple[str, tuple[tuple[str, str], ...]], float] | None = None
        self.window = 0.0
        self.taken_at = time.time()
        self.store: dict[str, Any] = {}

    def total(self, name: str, source: str = "now", **labels: str) -> float:
        samples = self.metrics if source == "now" else (self.earlier or {})
        return sum(
            v for (n, lab), v in samples.items()
            if n == name and all(dict(lab).get(k) == x for k, x in labels.items())
        )  # fmt: skip

    def rate(self, name: str, **labels: str) -> float | None:
        if self.earlier is None or self.window <= 0:
            return None
        return max(0.0, self.total(name, **labels) - self.total(name, "earlier", **labels)) / (
            self.window
        )

    def label(self, name: str, key: str) -> str | None:
        for (n, lab), _ in self.metrics.items():
            if n == name:
                return dict(lab).get(key)
        return None


def _get(url: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read(16 * 1024 * 1024).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(4096).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        base = url.split("/", 3)
        raise SummaryError(
            f"cannot reach the admin endpoint at {'/'.join(base[:3])}: {reason}"
        ) from None


def _parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def gather(
    base_url: str,
    fetch_json: Callable[[str, str, float], Any],
    *,
    timeout: float = 5.0,
    window: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Snapshot:
    snap = Snapshot()
    if window > 0:
        status, body = _get(base_url + "/metrics", timeout)
        if status == 200:
            snap.earlier = _parse_metrics(body)
        started = time.monotonic()
        sleep(window)
    for name in ("connections", "links", "routes", "connectors", "listeners"):
        items = fetch_json(base_url, f"/api/{name}", timeout)
        snap.api[name] = items if isinstance(items, list) else []
    try:
        store = fetch_json(base_url, "/api/store", timeout)
    except Exception:  # an older gateway without /api/store: no store line
        store = None
    snap.store = store if isinstance(store, dict) else {}
    status, body = _get(base_url + "/readyz", timeout)
    snap.ready = (status == 200, body.strip())
    status, body = _get(base_url + "/metrics", timeout)
    if status != 200:
        raise SummaryError(f"{base_url}/metrics: HTTP {status}")
    snap.metrics = _parse_metrics(body)
    snap.taken_at = time.time()
    if window > 0:
        snap.window = time.monotonic() - started
    return snap


# -- rendering -------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _count(value: float) -> str:
    return f"{int(value):,}"


def _rate(value: float | None) -> str:
    return "" if value is None else f" ({value:,.1f}/s)"


def render_summary(snap: Snapshot, base_url: str) -> str:
    """The summary as ``attr  value`` lines, qdstat -g style."""
    conns = snap.api.get("connections", [])
    devices = [c for c in conns if c.get("kind") == "device"]
    upstream = [c for c in conns if c.get("kind") == "upstream"]
    by_proto: dict[str, int] = {}
    for c in devices:
        by_proto[str(c.get("protocol"))] = by_proto.get(str(c.get("protocol")), 0) + 1
    device_ids = {d for c in devices for d in (c.get("device_ids") or [])}
    start = snap.total("process_start_time_seconds")
    uptime = snap.taken_at - start if start else None
    ready, reason = snap.ready
    routes = snap.api.get("routes", [])
    link_routes = sum(1 for r in routes if r.get("kind") == "link")
    mqtt_routes = sum(1 for r in routes if r.get("kind") == "mqtt")
    listeners = [
        f"{i.get('name')} ({i.get('protocol')}) {','.join(i.get('addresses') or []) or '-'}"
        + ("" if i.get("bound") else " NOT BOUND")
        for i in snap.api.get("listeners", [])
    ]
    connectors = [
        f"{c.get('name')} ({c.get('protocol')}) {c.get('state')}, "
        f"{c.get('connections', 0)} conn(s) -> {c.get('target')}"
        + (f" [{c.get('detail')}]" if c.get("detail") else "")
        for c in snap.api.get("connectors", [])
    ]
    connectors = [line for c, text in zip(snap.api.get("connectors", []), connectors, strict=True)
                  for line in (text, *_failover_lines(c))]  # fmt: skip
    # The AMQP pool's connections and each MQTT device's own, as the connectors count them.
    per_connector = [(c.get("name"), int(c.get("connections") or 0))
                     for c in snap.api.get("connectors", [])]  # fmt: skip
    hub_conns = sum(n for _, n in per_connector) if per_connector else len(upstream)
    token = snap.total("iotgw_token_expiry_seconds") if snap.metrics else math.nan
    refused = snap.total("iotgw_attach_refusals_total")
    refused_conns = snap.total("iotgw_device_connections_refused_total")
    rows: list[tuple[str, str]] = [
        ("Gateway id", snap.label("iotgw_build_info", "gateway_id") or "-"),
        ("Version", snap.label("iotgw_build_info", "version") or "-"),
        ("Admin endpoint", base_url),
        ("Uptime", _duration(uptime)),
        ("Ready", "yes" if ready else f"no ({reason or 'unknown'})"),
        ("Draining", "yes" if snap.total("iotgw_draining") else "no"),
    ]
    rows += [("Listeners" if i == 0 else "", text) for i, text in enumerate(listeners or ["-"])]
    rows += [("Connectors" if i == 0 else "", text) for i, text in enumerate(connectors or ["-"])]
    rows += [
        ("Device connections", f"{len(devices)}"
         + (f" ({', '.join(f'{p} {n}' for p, n in sorted(by_proto.items()))})" if by_proto
            else "")),
        ("Devices identified", str(len(device_ids))),
        ("Hub connections", f"{hub_conns}"
         + (f" ({', '.join(f'{n} {c}' for n, c in per_connector)})" if per_connector else "")),
        ("Links", str(len(snap.api.get("links", [])))),
        ("Routes", f"{link_routes} link, {mqtt_routes} mqtt"),
        ("Messages to hub", _count(snap.total("iotgw_messages_total", direction="in"))
         + _rate(snap.rate("iotgw_messages_total", direction="in"))),
        ("Messages to devices", _count(snap.total("iotgw_messages_total", direction="out"))
         + _rate(snap.rate("iotgw_messages_total", direction="out"))),
        ("Bytes to hub", _count(snap.total("iotgw_message_bytes_total", direction="in"))
         + _rate(snap.rate("iotgw_message_bytes_total", direction="in"))),
        ("Bytes to devices", _count(snap.total("iotgw_message_bytes_total", direction="out"))
         + _rate(snap.rate("iotgw_message_bytes_total", direction="out"))),
        ("Attaches refused", _count(refused)),
        ("Connections refused", _count(refused_conns)),
        ("Hub reconnects", _count(snap.total("iotgw_reconnects_total"))),
        ("Soonest token expiry", "no gateway-held tokens" if math.isnan(token)
         else f"in {_duration(token)}"),
    ]  # fmt: skip
    store_line = summary_line(snap.store)
    if store_line is not None:  # only with a store_and_forward: section
        rows.append(("Store and forward", store_line))
    width = max(len(k) for k, _ in rows)
    lines = ["Gateway", f"  {'attr'.ljust(width)}  value", "  " + "=" * (width + 40)]
    lines += [f"  {k.ljust(width)}  {v}".rstrip() for k, v in rows]
    if snap.window > 0:
        lines.append(f"  (rates over {snap.window:.1f} s)")
    return "\n".join(lines) + "\n"


def _failover_lines(connector: dict[str, Any]) -> list[str]:
    """With several endpoints (``hosts:``): the one in use, and why others were skipped."""
    lines = []
    if len(connector.get("endpoints") or ()) > 1 and connector.get("endpoint"):
        what = "in use" if connector.get("connections") else "last used"
        lines.append(f"  {what}: {connector['endpoint']} ({connector.get('address') or '-'})")
    for skipped in connector.get("skipped") or ():
        if isinstance(skipped, dict):
            lines.append(f"  skipped: {skipped.get('endpoint')}: {skipped.get('detail')}")
    return lines
