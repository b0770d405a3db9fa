"""Reporting hooks for code that is not handed an observer.

Opening a connection to a connector happens deep inside the connector pool,
which passes no observer down to the TLS connect. The daemon installs a hook
here instead; it lives in a context variable, so every task the daemon starts
(trio copies the context into child tasks) reports to that daemon's metrics,
and two gateways in one process (tests) do not see each other's failures.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token

__all__ = ["report_connect_failure", "set_connect_failure_hook"]

ConnectFailureHook = Callable[[str, str], None]

_connect_failure: ContextVar[ConnectFailureHook | None] = ContextVar(
    "iotgw_connect_failure", default=None
)


def set_connect_failure_hook(hook: ConnectFailureHook | None) -> Token[ConnectFailureHook | None]:
    """Install ``hook(connector, reason)`` for the current task and the tasks it starts."""
    return _connect_failure.set(hook)


def report_connect_failure(connector: str, reason: str) -> None:
    """A TCP connect or TLS handshake to ``connector`` failed; ``reason`` is one word
    from `gateway.net.tls.TLSConnectError.reason`. A no-op without a hook."""
    hook = _connect_failure.get()
    if hook is not None:
        hook(connector, reason)
