"""stunnel in client mode: the plain TLS tunnel the gateway is compared with.

The generated configuration verifies the upstream exactly as the gateway does:
the chain against the bench CA (verifyChain + CAfile), the hub host name
(checkHost) and SNI. TCP_NODELAY on both sides, as the gateway has it, and
only warnings logged, so neither side pays for per-connection logging.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .devices import HUB_HOST
from .procs import Child, free_port, wait_for_port

STUNNEL_PATHS = ("stunnel4", "/usr/bin/stunnel4", "stunnel")
START_TIMEOUT = 15.0


def stunnel_binary() -> str | None:
    for name in STUNNEL_PATHS:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Stunnel:
    child: Child
    ports: dict[str, int]  # service name -> local accept port

    def stop(self) -> None:
        self.child.stop()


def stunnel_config(services: dict[str, tuple[int, int]], ca_file: Path) -> str:
    """`services`: name -> (local accept port, upstream port)."""
    lines = [
        "foreground = yes",
        "pid =",
        "debug = warning",
        "socket = l:TCP_NODELAY=1",
        "socket = r:TCP_NODELAY=1",
    ]
    for name, (accept, connect) in services.items():
        lines += [
            "",
            f"[{name}]",
            "client = yes",
            f"accept = 127.0.0.1:{accept}",
            f"connect = 127.0.0.1:{connect}",
            f"sni = {HUB_HOST}",
            "verifyChain = yes",
            f"CAfile = {ca_file}",
            f"checkHost = {HUB_HOST}",
        ]
    return "\n".join(lines) + "\n"


def start_stunnel(upstreams: dict[str, int], ca_file: Path, log_dir: Path,
                  name: str = "stunnel") -> Stunnel:  # fmt: skip
    """`upstreams`: service name -> upstream TLS port; returns the local plaintext ports."""
    binary = stunnel_binary()
    if binary is None:
        raise FileNotFoundError("stunnel4 is not installed")
    services = {svc: (free_port(), port) for svc, port in upstreams.items()}
    conf = log_dir / f"{name}.conf"
    conf.write_text(stunnel_config(services, ca_file))
    child = Child(name, [binary, str(conf)], log_dir)
    ports = {svc: accept for svc, (accept, _) in services.items()}
    try:
        for port in ports.values():
            wait_for_port(port, child, START_TIMEOUT)
    except BaseException:
        child.stop()
        raise
    return Stunnel(child, ports)
