"""The store section of ``iot-gateway status`` (``--store``) and its summary line, from
``/api/store``. Stdlib only, like the rest of the status command."""

from __future__ import annotations

from typing import Any


def _size(value: Any) -> str:
    n = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _age(seconds: Any) -> str:
    s = int(float(seconds or 0))
    if s <= 0:
        return "-"
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def summary_line(snapshot: dict[str, Any]) -> str | None:
    """The store's line in the status summary; None when the store is off."""
    state = snapshot.get("state")
    if state in (None, "off"):
        return None
    if state != "ok":
        return f"UNAVAILABLE: {snapshot.get('reason') or 'unknown'}"
    messages = int(snapshot.get("messages") or 0)
    used = int(snapshot.get("bytes") or 0)
    limit = int(snapshot.get("max_bytes") or 0)
    share = f", {100 * used / limit:.0f}% of {_size(limit)}" if limit else ""
    oldest = max(
        (float(c.get("oldest_age_seconds") or 0) for c in (snapshot.get("connectors") or {}).values()),
        default=0.0,
    )
    text = f"ok, {messages:,} messages waiting ({_size(used)}{share})"
    if messages:
        text += f", oldest {_age(oldest)}"
    refused = sum(int(v) for v in (snapshot.get("refused") or {}).values())
    if refused:
        text += f", {refused:,} refused"
    return text


def store_tables(snapshot: dict[str, Any], render_table: Any) -> str:
    """``iot-gateway status --store``: the state, per connector, per device."""
    if snapshot.get("state") in (None, "off"):
        return "Store\n  off (no store_and_forward: section)\n"
    lines = [f"Store: {snapshot.get('state')}"
             + (f" ({snapshot['reason']})" if snapshot.get("reason") else "")
             + (f", {snapshot.get('path')}" if snapshot.get("path") else "")]  # fmt: skip
    if snapshot.get("state") == "ok":
        lines.append(
            f"  {int(snapshot.get('messages') or 0):,} messages, {_size(snapshot.get('bytes'))} "
            f"of {_size(snapshot.get('max_bytes'))} (per device at most "
            f"{_size(snapshot.get('device_max_bytes'))}), file {_size(snapshot.get('file_bytes'))}"
        )
    refused = snapshot.get("refused") or {}
    errors = snapshot.get("errors") or {}
    if refused or errors:
        lines.append(
            "  refused: " + (", ".join(f"{k} {v}" for k, v in sorted(refused.items())) or "-")
            + "; errors: " + (", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "-")
        )  # fmt: skip
    text = "\n".join(lines) + "\n"
    connectors = snapshot.get("connectors") or {}
    if connectors:
        rows = [
            [name, c.get("messages"), _size(c.get("bytes")), _age(c.get("oldest_age_seconds")),
             c.get("appended"), c.get("replayed"), c.get("expired"), c.get("rejected")]
            for name, c in sorted(connectors.items())
        ]  # fmt: skip
        text += render_table(
            "Store backlog by connector",
            ["connector", "messages", "bytes", "oldest", "appended", "replayed", "expired",
             "rejected"],
            rows,
        )  # fmt: skip
    devices = snapshot.get("devices") or {}
    if devices:
        rows = [
            [name, d.get("connector"), d.get("messages"), _size(d.get("bytes")),
             _age(d.get("oldest_age_seconds"))]
            for name, d in sorted(devices.items())
        ]  # fmt: skip
        text += render_table(
            "Store backlog by device", ["device", "connector", "messages", "bytes", "oldest"], rows
        )
    return text
