from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest
import trio

from gateway.ops import sdnotify
from tests.waiting import FAILSAFE


def _receive_all(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    assert sdnotify.watchdog() is False


def test_ready_stopping_status_watchdog_to_path_socket(path_socket: socket.socket) -> None:
    assert sdnotify.ready("serving 2 listeners")
    assert sdnotify.status("3 devices\nconnected")
    assert sdnotify.watchdog()
    assert sdnotify.reloading()
    assert sdnotify.stopping()
    got = _receive_all(path_socket)
    assert got[0] == b"READY=1\nSTATUS=serving 2 listeners"
    assert got[1] == b"STATUS=3 devices connected"  # one line: newlines would start new keys
    assert got[2] == b"WATCHDOG=1"
    reload_lines = got[3].decode().split("\n")
    assert reload_lines[0] == "RELOADING=1"
    assert reload_lines[1].startswith("MONOTONIC_USEC=") and int(reload_lines[1].split("=")[1]) > 0
    assert got[4] == b"STOPPING=1"


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"iotgw-test-{os.getpid()}-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert _receive_all(sock) == [b"READY=1"]
    finally:
        sock.close()


def test_missing_socket_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # unsupported form: ignored
    assert sdnotify.ready() is False


def test_full_socket_does_not_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "small.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        results = [sdnotify.notify("STATUS=" + "x" * 512) for _ in range(2000)]
        assert results[0] is True
        assert False in results  # the queue filled up and sends were dropped, not blocked
    finally:
        sock.close()


def test_watchdog_interval() -> None:
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    own = str(os.getpid())
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": own}) == 1.0
    other = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert sdnotify.watchdog_interval(other) is None


async def test_watchdog_loop_pings_and_skips_when_unhealthy(
    path_socket: socket.socket, autojump_clock: trio.testing.MockClock
) -> None:
    healthy = True

    def check() -> bool:
        return healthy

    with trio.move_on_after(10.5):  # pings at t = 0, 5, 10
        await sdnotify.watchdog_loop(5.0, healthy=check)
    assert _receive_all(path_socket) == [b"WATCHDOG=1"] * 3
    healthy = False
    with trio.move_on_after(10.5):
        await sdnotify.watchdog_loop(5.0, healthy=check)
    assert _receive_all(path_socket) == []


async def test_watchdog_loop_returns_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with trio.fail_after(FAILSAFE):
        await sdnotify.watchdog_loop()
