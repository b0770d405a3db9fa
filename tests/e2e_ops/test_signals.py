"""`iot-gateway run` as a process: SIGHUP reloads, SIGTERM drains, sd_notify tells systemd.

Every wait is bounded: on log lines of the daemon, on the hub's recorder, on
datagrams arriving at a notification socket the test binds.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import trio
from proton import ConnectionException, Delivery, Endpoint
from proton.utils import ConnectionClosed, LinkDetached

from tests.e2e_amqp.gw_helpers import TIMEOUT, Device, data_message, in_thread

from .helpers import (
    DEVICEBOUND,
    EVENTS,
    GatewayProcess,
    gateway_yaml,
    http_get,
    metric,
    parse_metrics,
)

ROUTES_IN_ONLY = (
    '  - {prefix: "$cbs", connector: iothub}\n'
    '  - {prefix: "devices/", connector: iothub, direction: in}\n'
)
ROUTES_BOTH = (
    '  - {prefix: "$cbs", connector: iothub}\n  - {prefix: "devices/", connector: iothub}\n'
)


def refused(fn) -> str:
    """Run an attach that must be refused; the error text proton reports."""
    try:
        fn()
    except (LinkDetached, ConnectionClosed, ConnectionException) as exc:
        return str(exc)
    raise AssertionError("the attach was not refused")


async def test_sighup_applies_routes_and_limits_and_refuses_a_broken_file(
    hub, keys, tmp_path
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(hub, mqtt=False, routes=ROUTES_IN_ONLY))
    gw = GatewayProcess(path)
    try:
        await gw.started()
        url = f"amqp://127.0.0.1:{gw.ports['amqp']}"
        dev = await in_thread(Device, url)
        await in_thread(dev.authenticate, "dev1", keys["dev1"])
        sender = await in_thread(dev.conn.create_sender, EVENTS % "dev1")
        error = await in_thread(refused, lambda: dev.conn.create_receiver(DEVICEBOUND % "dev1"))
        assert "amqp:not-found" in error

        # 1. A new route: new attaches use it, the link already attached keeps working.
        path.write_text(gateway_yaml(hub, mqtt=False, routes=ROUTES_BOTH, log="{level: debug}"))
        mark = gw.mark()
        gw.signal(signal.SIGHUP)
        line = await gw.await_line(r"configuration reloaded from .*", start=mark)
        assert "link_routes" in line.group(0) and "log.level: info -> debug" in line.group(0)
        receiver = await in_thread(dev.conn.create_receiver, DEVICEBOUND % "dev1", credit=1)
        c2d = await trio.to_thread.run_sync(hub.send_c2d, "dev1", b"after reload")
        message = await in_thread(receiver.receive, timeout=TIMEOUT)
        assert message.id == c2d
        await in_thread(receiver.accept)
        await in_thread(sender.send, data_message(b"old link, still fine"))
        assert [r.body for r in hub.recorder.d2c] == [b"old link, still fine"]

        # 2. A broken file is refused with the errors named; the running configuration stays.
        path.write_text(path.read_text().replace("max_frame_size: 65536", "")
                        .replace('bind: "127.0.0.1:0"}', 'bind: "127.0.0.1:0", max_connections: 0}'))  # fmt: skip
        mark = gw.mark()
        gw.signal(signal.SIGHUP)
        line = await gw.await_line(r"configuration reload rejected.*", start=mark)
        assert f"{path}:" in line.group(0) and "max_connections" in line.group(0)
        second = await in_thread(Device, url)  # max_connections 0 was not applied
        await in_thread(second.authenticate, "dev2", keys["dev2"])
        receiver2 = await in_thread(second.conn.create_receiver, DEVICEBOUND % "dev2", credit=0)
        assert receiver2.link.state & Endpoint.REMOTE_ACTIVE  # the reloaded routes still apply
        await in_thread(second.close)

        # 3. Listener limits apply live; a new bind is a restart's business.
        path.write_text(
            gateway_yaml(hub, mqtt=False, routes=ROUTES_BOTH)
            .replace('bind: "127.0.0.1:0"', 'bind: "127.0.0.1:0", allowed_networks: ["10.0.0.0/8"]')
            .replace('listen: "127.0.0.1:0"', 'listen: "127.0.0.1:1"')
        )  # fmt: skip
        mark = gw.mark()
        gw.signal(signal.SIGHUP)
        await gw.await_line(r"admin: needs restart, ignored", start=mark)
        line = await gw.await_line(r"configuration reloaded from .*", start=mark)
        assert "allowed_networks: any -> [10.0.0.0/8]" in line.group(0)
        error = await in_thread(refused, lambda: Device(url))
        await gw.await_line(r"listener amqp refused 127\.0\.0\.1:\d+", start=mark)
        await in_thread(sender.send, data_message(b"existing connection unaffected"))

        status, text = await trio.to_thread.run_sync(http_get, gw.admin_url + "/metrics")
        samples = parse_metrics(text)
        assert metric(samples, "iotgw_config_reloads_total", result="ok") == 2
        assert metric(samples, "iotgw_config_reloads_total", result="rejected") == 1
        assert metric(samples, "iotgw_device_connections_refused_total", reason="network") == 1
        await in_thread(dev.close)
        gw.signal(signal.SIGTERM)
        assert await gw.wait_exit() == 0
    finally:
        gw.close()


async def test_sigterm_during_traffic_loses_no_acknowledged_message(hub, keys, tmp_path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(hub, mqtt=False, admin=False, gateway=", drain_timeout: 2s"))
    gw = GatewayProcess(path)
    try:
        await gw.started()
        url = f"amqp://127.0.0.1:{gw.ports['amqp']}"
        total = 5000

        def device() -> tuple[list[bytes], list[bytes], str | None]:
            dev = Device(url)
            dev.authenticate("dev1", keys["dev1"])
            sender = dev.conn.create_sender(EVENTS % "dev1")
            bodies = [f"message {i:05d}".encode() for i in range(total)]
            deliveries = [sender.link.send(data_message(b)) for b in bodies]
            # Keeps sending while the gateway drains, until detached or all are settled.
            try:
                dev.conn.wait(lambda: sender.link.state & Endpoint.REMOTE_CLOSED
                              or all(d.remote_state for d in deliveries), timeout=TIMEOUT)  # fmt: skip
            except (LinkDetached, ConnectionClosed):
                pass
            condition = sender.link.remote_condition
            error = f"{condition.name}: {condition.description}" if condition else None
            accepted = [b for b, d in zip(bodies, deliveries, strict=True)
                        if d.remote_state == Delivery.ACCEPTED]  # fmt: skip
            unsettled = [b for b, d in zip(bodies, deliveries, strict=True) if not d.remote_state]
            try:
                dev.close()
            except Exception:
                pass
            return accepted, unsettled, error

        result: list[tuple[list[bytes], list[bytes], str | None]] = []

        async def run_device() -> None:
            result.append(await in_thread(device))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_device)
            # SIGTERM while the device is still sending: the hub has part of the stream.
            await trio.to_thread.run_sync(
                hub.recorder.wait_for, lambda: len(hub.recorder.d2c) >= 200, TIMEOUT
            )
            gw.signal(signal.SIGTERM)
            sent_at = time.monotonic()
        accepted, unsettled, error = result[0]
        code = await gw.wait_exit()
        elapsed = time.monotonic() - sent_at
    finally:
        gw.close()
    assert code == 0, gw.output
    recorded = {r.body for r in hub.recorder.d2c}
    # The guarantee: everything the device saw accepted reached the hub.
    assert len(accepted) >= 200
    assert not [b for b in accepted if b not in recorded]
    # The rest was never acknowledged: the device still holds it and would resend it.
    assert len(accepted) + len(unsettled) == total
    if unsettled:
        assert error == "amqp:connection:forced: gateway shutting down", error
    assert "draining:" in gw.output
    assert elapsed < 2 + 4, gw.output  # drain_timeout, then detach and close


def notifications(sock: socket.socket, until, timeout: float = TIMEOUT) -> list[str]:
    """Datagrams from the notification socket until `until(received)` holds."""
    received: list[str] = []
    deadline = time.monotonic() + timeout
    while not until(received):
        left = deadline - time.monotonic()
        assert left > 0, f"sd_notify: got only {received}"
        sock.settimeout(left)
        received.append(sock.recv(4096).decode())
    return received


async def test_sd_notify_ready_watchdog_reload_stopping_and_a_quick_exit(
    hub, keys, tmp_path
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(hub, mqtt=False, admin=False))
    sock_path = Path(tmp_path) / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    gw = GatewayProcess(path, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "300000"})
    try:

        def has(prefix: str):
            return lambda got: any(m.startswith(prefix) for m in got)

        first = await trio.to_thread.run_sync(notifications, sock, has("READY=1"))
        await gw.started()  # READY=1 comes after the listeners are bound
        ready = next(m for m in first if m.startswith("READY=1"))
        assert "\nSTATUS=running: 0 device connection(s)" in ready
        await trio.to_thread.run_sync(notifications, sock, has("WATCHDOG=1"))

        gw.signal(signal.SIGHUP)
        got = await trio.to_thread.run_sync(
            notifications, sock, lambda got: any(m.startswith("RELOADING=1") for m in got)
            and any(m.startswith("READY=1") for m in got[1:])
        )  # fmt: skip
        reloading = next(i for i, m in enumerate(got) if m.startswith("RELOADING=1"))
        assert "MONOTONIC_USEC=" in got[reloading]
        assert any(m.startswith("READY=1") for m in got[reloading + 1 :])

        # A device with an attached link and nothing in flight: detached cleanly, exit fast.
        url = f"amqp://127.0.0.1:{gw.ports['amqp']}"

        def device() -> tuple[str, float]:
            dev = Device(url)
            dev.authenticate("dev1", keys["dev1"])
            sender = dev.conn.create_sender(EVENTS % "dev1")
            sender.send(data_message(b"before the stop"))
            gw.signal(signal.SIGTERM)
            sent = time.monotonic()
            try:
                dev.conn.wait(lambda: sender.link.state & Endpoint.REMOTE_CLOSED, timeout=TIMEOUT)
            except (LinkDetached, ConnectionClosed):
                pass
            condition = sender.link.remote_condition
            try:
                dev.close()
            except Exception:
                pass
            return f"{condition.name}: {condition.description}", sent

        error, sent = await in_thread(device)
        stopping = await trio.to_thread.run_sync(notifications, sock, has("STOPPING=1"))
        code = await gw.wait_exit()
        elapsed = time.monotonic() - sent
    finally:
        gw.close()
        sock.close()
    assert code == 0, gw.output
    assert elapsed < 5, gw.output
    assert error == "amqp:connection:forced: gateway shutting down"
    assert any("STATUS=draining" in m for m in stopping if m.startswith("STOPPING=1"))
    assert [r.body for r in hub.recorder.d2c] == [b"before the stop"]
    assert "drain complete" in gw.output
