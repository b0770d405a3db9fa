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
from typing import Any

__all__ = ["report_connect_failure", "report_dial", "set_connect_failure_hook", "set_dial_hook"]

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


# Dial outcomes (gateway.net.dial.DialReport): which endpoint a connector reached,
# and the ones it skipped with why.
DialHook = Callable[[Any], None]

_dial: ContextVar[DialHook | None] = ContextVar("iotgw_dial", default=None)


def set_dial_hook(hook: DialHook | None) -> Token[DialHook | None]:
    """Install ``hook(report)`` for the current task and the tasks it starts."""
    return _dial.set(hook)


def report_dial(report: Any) -> None:
    """A connector dial ended (``report.endpoint`` None: every endpoint failed).
    A no-op without a hook."""
    hook = _dial.get()
    if hook is not None:
        hook(report)
