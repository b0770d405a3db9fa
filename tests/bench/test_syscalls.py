"""`bench.syscalls`: reading `perf script` output back into per-side counts."""

from __future__ import annotations

from bench.syscalls import parse

SCRIPT = """\
  python3 101 [000] 1.000001: raw_syscalls:sys_enter: NR 232 (4, 7f, 10, 0, 0, 0)
  python3 101 [000] 1.000002: syscalls:sys_exit_epoll_wait: 0x2
  python3 101 [000] 1.000003: raw_syscalls:sys_enter: NR 45 (7, 7f, 40000, 0, 0, 0)
  python3 101 [000] 1.000004: syscalls:sys_enter_recvfrom: fd: 0x00000007, ubuf: 0x7f, size: 0x00040000, flags: 0x00000000, addr: 0x00000000, addr_len: 0x00000000
  python3 101 [000] 1.000005: raw_syscalls:sys_enter: NR 44 (9, 7f, 400, 0, 0, 0)
  python3 101 [000] 1.000006: syscalls:sys_enter_sendto: fd: 0x00000009, buff: 0x7f, len: 0x00000400, flags: 0x00000000, addr: 0x00000000, addr_len: 0x00000000
  python3 101 [000] 1.000007: raw_syscalls:sys_enter: NR 232 (4, 7f, 10, 0, 0, 0)
  python3 101 [000] 1.000008: syscalls:sys_exit_epoll_wait: 0x0
  stunnel4 102 [001] 1.000009: syscalls:sys_exit_poll: 0xfffffffffffffffc
  stunnel4 102 [001] 1.000010: syscalls:sys_enter_write: fd: 0x0000000c, buf: 0x7f, count: 0x00000010
"""


def test_counts_by_side() -> None:
    trace = parse(SCRIPT, {7: "device", 9: "hub"})
    assert trace.syscalls == 4
    assert trace.waits == 3  # two epoll_wait returns and one poll
    assert trace.wakeups == 1  # only the one that reported a ready descriptor
    assert trace.io == {"device read": 1, "hub write": 1}
    assert trace.by_name == {"recvfrom": 1, "sendto": 1, "write": 1}  # fd 12: neither side
    per = trace.per_message(2)
    assert per["syscalls"] == 2.0 and per["hub_writes"] == 0.5 and per["empty_waits"] == 1.0
