"""What a configuration reload (SIGHUP) may change in a running gateway, and what not.

`plan_reload(running, new)` compares the configuration in force with a freshly
loaded, already validated one and returns the configuration to run with from
now on: the running one with the live-changeable parts taken from the new file.

Applied live:
- `link_routes` and `mqtt_routes`: new attaches and new MQTT connections use
  them; links and sessions already set up are left alone;
- each listener's `max_connections` and `allowed_networks`;
- `log` (level, format, trace) and `gateway.drain_timeout`;
- `credentials`: the daemon builds a new store on every reload (re-reading
  key files, the secrets file and the environment; a key that cannot be read
  rejects the whole reload) and uses it for tokens issued and devices
  authenticated from then on; tokens already held keep their renewal
  schedule until their connection ends.

Everything else (binds and other listener settings, listeners added or
removed, connectors, TLS profiles, the admin endpoint, the gateway id, metric
labels) takes a restart: such changes are listed in ``needs_restart`` for the
log and otherwise ignored.

Pure: no I/O, no logging; the daemon reports and applies the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LISTENER_LIVE_FIELDS", "ReloadPlan", "plan_reload"]

# Listener settings a reload changes in place; the rest need a restart.
LISTENER_LIVE_FIELDS = ("max_connections", "allowed_networks")
_GATEWAY_LIVE_FIELDS = ("drain_timeout",)
_RESTART_SECTIONS = ("admin", "tls_profiles", "connectors", "store_and_forward")


@dataclass
class ReloadPlan:
    """The configuration to run with, and what the reload changed or could not change."""

    config: Any
    applied: list[str] = field(default_factory=list)
    needs_restart: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.applied)


def _dump(value: Any) -> Any:
    # Python mode keeps SecretStr values comparable (by secret) without printing them.
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


def _listeners(running: Any, new: Any, plan: ReloadPlan) -> list[Any]:
    """The running listeners with their live fields taken from the new file."""
    fresh = {listener.name: listener for listener in new.listeners}
    out = []
    for listener in running.listeners:
        other = fresh.pop(listener.name, None)
        if other is None:
            plan.needs_restart.append(f"listener {listener.name} removed")
            out.append(listener)
            continue
        old_rest = {k: v for k, v in _dump(listener).items() if k not in LISTENER_LIVE_FIELDS}
        new_rest = {k: v for k, v in _dump(other).items() if k not in LISTENER_LIVE_FIELDS}
        if old_rest != new_rest:
            keys = sorted(k for k in old_rest.keys() | new_rest.keys()
                          if old_rest.get(k) != new_rest.get(k))  # fmt: skip
            plan.needs_restart.append(f"listener {listener.name}: {', '.join(keys)}")
        update = {}
        for key in LISTENER_LIVE_FIELDS:
            before, after = getattr(listener, key), getattr(other, key)
            if before != after:
                update[key] = after
                plan.applied.append(f"listener {listener.name} {key}: {_show(before)} -> "
                                    f"{_show(after)}")  # fmt: skip
        out.append(listener.model_copy(update=update) if update else listener)
    for name in fresh:
        plan.needs_restart.append(f"listener {name} added")
    return out


def _entries(section: Any) -> int:
    if section is None:
        return 0
    return len(getattr(section, "devices", ()) or ()) + len(getattr(section, "groups", ()) or ())


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]" if value else "any"
    return str(value)


def _routes(running: Any, new: Any, plan: ReloadPlan) -> None:
    connectors = {c.name: c.protocol for c in running.connectors}
    for section, protocol in (("link_routes", "amqp"), ("mqtt_routes", "mqtt")):
        before, after = _dump(getattr(running, section)), _dump(getattr(new, section))
        if before == after:
            continue
        plan.applied.append(f"{section}: {len(before)} -> {len(after)} route(s)")
        for route in getattr(new, section):
            if connectors.get(route.connector) != protocol:
                plan.warnings.append(
                    f"{section}: connector {route.connector!r} is not running (a new "
                    "connector needs a restart); matching devices are refused until then"
                )


def plan_reload(running: Any, new: Any) -> ReloadPlan:
    """Compare two validated configurations; see the module docstring."""
    plan = ReloadPlan(config=running)
    update: dict[str, Any] = {}

    gateway_old, gateway_new = _dump(running.gateway), _dump(new.gateway)
    for key in sorted(gateway_old.keys() | gateway_new.keys()):
        if gateway_old.get(key) == gateway_new.get(key):
            continue
        if key in _GATEWAY_LIVE_FIELDS:
            plan.applied.append(f"gateway.{key}: {gateway_old.get(key)} -> {gateway_new.get(key)}")
        else:
            plan.needs_restart.append(f"gateway.{key}")
    if any(gateway_old.get(k) != gateway_new.get(k) for k in _GATEWAY_LIVE_FIELDS):
        live = {k: getattr(new.gateway, k) for k in _GATEWAY_LIVE_FIELDS}
        update["gateway"] = running.gateway.model_copy(update=live)

    if _dump(running.log) != _dump(new.log):
        for key in ("level", "format", "trace"):
            before, after = getattr(running.log, key), getattr(new.log, key)
            if before != after:
                plan.applied.append(f"log.{key}: {_show(before)} -> {_show(after)}")
        update["log"] = new.log

    for section in _RESTART_SECTIONS:
        if _dump(getattr(running, section)) != _dump(getattr(new, section)):
            plan.needs_restart.append(section)

    if _dump(running.credentials) != _dump(new.credentials):
        plan.applied.append(f"credentials: {_entries(running.credentials)} -> "
                            f"{_entries(new.credentials)} entries")  # fmt: skip
        update["credentials"] = new.credentials

    listeners = _listeners(running, new, plan)
    if any(a is not b for a, b in zip(listeners, running.listeners, strict=True)):
        update["listeners"] = listeners

    _routes(running, new, plan)
    for section in ("link_routes", "mqtt_routes"):
        if _dump(getattr(running, section)) != _dump(getattr(new, section)):
            update[section] = getattr(new, section)

    if update:
        config = running.model_copy(update=update)
        # model_copy keeps private attributes; say so explicitly for the reload path.
        config._source_path = running.source_path
        plan.config = config
    return plan
