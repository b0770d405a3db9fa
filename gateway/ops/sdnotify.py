"""systemd readiness and watchdog notifications (sd_notify) without libsystemd.

systemd passes the notification socket in ``$NOTIFY_SOCKET``: a filesystem path
or, when it starts with ``@``, a Linux abstract-namespace name. Each
notification is one datagram of ``KEY=VALUE`` lines. Everything here is a no-op
when the variable is unset, so the daemon calls these helpers unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

import trio

log = logging.getLogger(__name__)

__all__ = [
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
    "watchdog_loop",
]


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: the leading '@' stands for a NUL byte.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # systemd only ever hands out absolute paths or abstract names; anything
    # else (e.g. vsock addresses) is not something this daemon supports.
    log.debug("ignoring unsupported NOTIFY_SOCKET value %r", value)
    return None


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send one notification datagram; True if it was handed to the socket.

    Never blocks and never raises: a full or vanished notification socket must
    not take the gateway down.
    """
    address = _socket_address((env if env is not None else os.environ).get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(state.encode(), address)
        return True
    except OSError as exc:
        log.debug("sd_notify %r failed: %s", state.split("\n", 1)[0], exc)
        return False


def ready(status_text: str | None = None) -> bool:
    msg = "READY=1"
    if status_text:
        msg += f"\nSTATUS={_one_line(status_text)}"
    return notify(msg)


def stopping(status_text: str | None = None) -> bool:
    msg = "STOPPING=1"
    if status_text:
        msg += f"\nSTATUS={_one_line(status_text)}"
    return notify(msg)


def reloading(status_text: str | None = None) -> bool:
    # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload;
    # older versions ignore the extra field.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    msg = f"RELOADING=1\nMONOTONIC_USEC={usec}"
    if status_text:
        msg += f"\nSTATUS={_one_line(status_text)}"
    return notify(msg)


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    return notify(f"STATUS={_one_line(text)}")


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of WatchdogSec), or None if disabled.

    systemd sets WATCHDOG_PID as well when the watchdog is meant for one
    process only; a child that inherited the variables must not ping.
    """
    env = env if env is not None else os.environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


async def watchdog_loop(
    interval: float | None = None,
    *,
    healthy: Callable[[], bool] | None = None,
) -> None:
    """Ping the systemd watchdog until cancelled.

    A ping is skipped while ``healthy()`` returns False so that a wedged
    gateway gets restarted by systemd instead of being kept alive by this loop.
    Returns immediately when the watchdog is not enabled.
    """
    if interval is None:
        interval = watchdog_interval()
    if interval is None:
        return
    while True:
        if healthy is None or healthy():
            watchdog()
        await trio.sleep(interval)


def _one_line(text: str) -> str:
    return " ".join(text.split())
