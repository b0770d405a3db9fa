"""Liveness and readiness decisions for /healthz and /readyz.

Liveness is the admin server answering at all: the trio loop is running.
Readiness means "send me devices": every configured listener is bound, no
drain is in progress, and every connector that is not on-demand has an open
upstream connection. An on-demand connector (the default) connects when the
first device needs it, so its state does not affect readiness. Nor is a
gateway ready while the wall clock is obviously unset (`gateway.auth.clock`):
it issues no SAS token then, and certificate checks cannot be trusted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from gateway.auth.clock import clock_problem
from gateway.ops.registry import Registry

__all__ = ["Readiness"]


class Readiness:
    """Callable readiness check: ``ready, reason = readiness()``."""

    def __init__(
        self,
        registry: Registry,
        *,
        listeners: Iterable[str] = (),
        required_connectors: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.clock = clock  # wall-clock Unix seconds
        self.listeners = list(listeners)
        self.required_connectors = list(required_connectors)
        self.draining = False

    @classmethod
    def from_config(
        cls, registry: Registry, config: Any, *, clock: Callable[[], float] = time.time
    ) -> Readiness:
        """Expect every listener, and require connectors with ``on_demand: false``."""
        listeners = [listener.name for listener in getattr(config, "listeners", ())]
        required = [
            connector.name
            for connector in getattr(config, "connectors", ())
            if getattr(connector, "on_demand", True) is False
        ]
        return cls(registry, listeners=listeners, required_connectors=required, clock=clock)

    def reconfigure(self, config: Any) -> None:
        """Adopt the listener and connector lists of a reloaded configuration."""
        fresh = Readiness.from_config(self.registry, config)
        self.listeners = fresh.listeners
        self.required_connectors = fresh.required_connectors

    def __call__(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        problem = clock_problem(self.clock())
        if problem is not None:
            return False, f"clock not set: {problem}; not issuing SAS tokens"
        unbound = [n for n in self.listeners if not self.registry.listener_bound(n)]
        if unbound:
            return False, "listener not bound: " + ", ".join(unbound)
        down = []
        for name in self.required_connectors:
            state = self.registry.connector_state(name) or "unknown"
            if state != "connected":
                down.append(f"{name} ({state})")
        if down:
            return False, "connector not connected: " + ", ".join(down)
        return True, "ready"
