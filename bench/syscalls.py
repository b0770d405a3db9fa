"""Syscalls, wake-ups and socket writes of a running hop, per message, from `perf record`.

`perf record` on syscall tracepoints (`-p PID`: every thread of the process)
while the devices keep sending; afterwards `perf script` is read back and
each socket call is put on the device side or the hub side by its file
descriptor (looked up in /proc before the trace: a socket whose local port
is the hop's listener faces a device, one whose remote port is the upstream's
faces the hub).

- wake-ups: returns of epoll_wait/epoll_pwait/poll/ppoll/select/pselect6 that
  reported at least one ready descriptor (calls that returned nothing, e.g.
  trio's non-blocking polls between runnable tasks, are counted apart);
- hub-side writes: on the TLS side a write carries one TLS record (trio's
  SSLStream sends what one `SSL_write` produced, stunnel writes what one
  `SSL_write` produced, each below 16 KiB here), so this is TLS records per
  message towards the hub;
- hub-side reads: TLS reads from the hub (how many records the hub sends is the
  hub's choice; the reads are the hop's work);
- device-side reads and writes: plaintext.

The trace runs in a window of its own, after the CPU window, so its cost never
shows in the CPU figures.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

WAITS = ("epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6")
WRITES = ("write", "sendto", "sendmsg", "writev")
READS = ("read", "recvfrom", "recvmsg", "readv")
ATTACH_TIMEOUT = 10.0
_FD = re.compile(r"\bfd: (0x[0-9a-f]+)")
_EVENT = re.compile(r"(raw_syscalls|syscalls):(sys_enter|sys_exit)(?:_(\w+))?:")


def perf_binary() -> str | None:
    return shutil.which("perf")


def socket_sides(pid: int, device_port: int, upstream_port: int) -> dict[int, str]:
    """fd -> "device" | "hub" for the TCP sockets of `pid`."""
    inodes: dict[int, int] = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes[int(target[8:-1])] = int(name)
    sides: dict[int, str] = {}
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}", encoding="ascii") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            inode = int(cols[9])
            if inode not in inodes:
                continue
            local = int(cols[1].rsplit(":", 1)[1], 16)
            remote = int(cols[2].rsplit(":", 1)[1], 16)
            if local == device_port and remote != 0:
                sides[inodes[inode]] = "device"
            elif remote == upstream_port:
                sides[inodes[inode]] = "hub"
    return sides


@dataclass
class Trace:
    """Counts over one traced window."""

    syscalls: int = 0
    waits: int = 0
    wakeups: int = 0
    by_name: Counter[str] = field(default_factory=Counter)
    io: Counter[str] = field(default_factory=Counter)  # "hub write", "device read", ...

    def per_message(self, messages: int) -> dict[str, float]:
        def per(value: int) -> float:
            return round(value / messages, 3) if messages else 0.0

        return {
            "syscalls": per(self.syscalls),
            "wakeups": per(self.wakeups),
            "empty_waits": per(self.waits - self.wakeups),
            "hub_writes": per(self.io["hub write"]),
            "hub_reads": per(self.io["hub read"]),
            "device_writes": per(self.io["device write"]),
            "device_reads": per(self.io["device read"]),
        }


def parse(text: str, sides: dict[int, str]) -> Trace:
    trace = Trace()
    for line in text.splitlines():
        match = _EVENT.search(line)
        if match is None:
            continue
        kind, phase, name = match.groups()
        if kind == "raw_syscalls":
            if phase == "sys_enter":
                trace.syscalls += 1
            continue
        if phase == "sys_exit" and name in WAITS:
            trace.waits += 1
            try:  # the exit event's text is the return value, e.g. "0x1"
                ret = int(line[match.end() :].split()[0], 0)
            except (ValueError, IndexError):
                ret = 0
            if 0 < ret < 2**31:  # errors print as large unsigned values
                trace.wakeups += 1
            continue
        if phase != "sys_enter" or name is None:
            continue
        fd = _FD.search(line)
        side = sides.get(int(fd.group(1), 16)) if fd else None
        trace.by_name[name] += 1
        if side is not None:
            trace.io[f"{side} {'write' if name in WRITES else 'read'}"] += 1
    return trace


class SyscallProbe:
    """`perf record` of one process's syscalls, started and stopped by the harness."""

    def __init__(self, pid: int, out: Path) -> None:
        binary = perf_binary()
        if binary is None:
            raise FileNotFoundError("perf is not installed (Debian package linux-perf)")
        self.binary = binary
        self.pid = pid
        self.out = out
        events = ["raw_syscalls:sys_enter"]
        events += [f"syscalls:sys_exit_{name}" for name in WAITS]
        events += [f"syscalls:sys_enter_{name}" for name in WRITES + READS]
        available = _available_events()
        events = [e for e in events if available is None or e in available]
        self.process = subprocess.Popen(
            [binary, "record", "-q", "-o", str(out), "-p", str(pid), "--no-buildid",
             *(arg for e in events for arg in ("-e", e))],  # fmt: skip
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self._wait_attached()

    def _wait_attached(self) -> None:
        # perf writes its header once every event is open on every thread.
        deadline = time.monotonic() + ATTACH_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"perf record exited: {err.strip()[-300:]}")
            if self.out.exists() and self.out.stat().st_size > 0:
                time.sleep(0.2)
                return
            time.sleep(0.05)
        raise RuntimeError("perf record did not start")

    def stop(self, sides: dict[int, str]) -> Trace:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        script = subprocess.run([self.binary, "script", "-i", str(self.out)],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        return parse(script.stdout, sides)


def _available_events() -> set[str] | None:
    try:
        with open("/sys/kernel/tracing/available_events", encoding="ascii") as f:
            return {line.strip() for line in f}
    except OSError:
        return None
