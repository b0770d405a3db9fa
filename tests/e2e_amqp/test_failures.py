"""Upstream loss, device loss, and recovery."""

from __future__ import annotations

import threading
import time

import trio
from gw_helpers import (
    HUB_HOST,
    TIMEOUT,
    Device,
    KillableProxy,
    authenticated_device,
    data_message,
    gateway_config,
    hub_open_links,
    in_thread,
    running_gateway,
)
from proton import Delivery, Endpoint
from proton.utils import LinkDetached

EVENTS = f"amqps://{HUB_HOST}/devices/%s/messages/events"


def wait_detached(dev: Device, link) -> str | None:
    """Block until the gateway detaches `link`; return the detach's error condition."""
    try:
        dev.conn.wait(lambda: link.link.state & Endpoint.REMOTE_CLOSED, timeout=TIMEOUT,
                      msg="waiting for the gateway to detach the link")  # fmt: skip
    except LinkDetached as exc:
        return exc.condition
    cond = link.link.remote_condition
    return cond.name if cond is not None else None


async def test_hub_killed_mid_stream_then_back(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path, max_connections=1)
    async with running_gateway(config) as gw:
        stream_started = threading.Event()

        def stream_until_cut():
            with authenticated_device(gw.url, "dev1", keys["dev1"]) as dev:
                sender = dev.conn.create_sender(EVENTS % "dev1")
                msgs = [data_message(b"%06d" % i, id=i) for i in range(3000)]
                deliveries = [sender.link.send(m) for m in msgs]
                stream_started.set()
                cond = wait_detached(dev, sender)
                return [(d.remote_state, d.settled) for d in deliveries], cond

        async def kill_when_flowing():
            await trio.to_thread.run_sync(stream_started.wait)
            await trio.to_thread.run_sync(
                lambda: hub.recorder.wait_for(lambda: hub.recorder.d2c_count >= 200)
            )
            await trio.to_thread.run_sync(hub.kill_connections)

        async with trio.open_nursery() as n:
            n.start_soon(kill_when_flowing)
            outcomes, cond = await in_thread(stream_until_cut)

        assert cond == "amqp:connection:forced"
        accepted = [i for i, (state, _) in enumerate(outcomes) if state == Delivery.ACCEPTED]
        unsettled = [i for i, (state, settled) in enumerate(outcomes) if not state and not settled]
        # Every delivery is either accepted by the hub or left unsettled: nothing
        # was settled on the hub's behalf.
        assert len(accepted) + len(unsettled) == 3000
        assert len(unsettled) > 0
        recorded = {int(r.body) for r in hub.recorder.d2c}
        assert set(accepted) <= recorded

        # The hub is still running (only connections were cut): the gateway
        # reconnects on demand and the device resends.
        def resend():
            deadline = time.monotonic() + TIMEOUT
            while True:
                dev = Device(gw.url)
                try:
                    dev.authenticate("dev1", keys["dev1"])
                    dev.conn.create_sender(EVENTS % "dev1").send(data_message(b"again"))
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                finally:
                    dev.close()

        await in_thread(resend)
    assert hub.recorder.d2c[-1].body == b"again"
    assert hub.recorder.connections["amqp"].opened == 2


async def test_hub_down_then_restarted(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path, max_connections=1)
    async with running_gateway(config) as gw:

        def first():
            with authenticated_device(gw.url, "dev1", keys["dev1"]) as dev:
                sender = dev.conn.create_sender(EVENTS % "dev1")
                sender.send(data_message(b"before"))
                hub.stop()
                return wait_detached(dev, sender)

        cond = await in_thread(first)
        assert cond == "amqp:connection:forced"

        def refused_while_down():
            dev = Device(gw.url)
            try:
                dev.cbs()
                dev.cbs_tx.send(data_message(b"x"), timeout=TIMEOUT)
            except Exception as exc:  # rejected: no upstream
                return type(exc).__name__
            finally:
                dev.close()

        assert await in_thread(refused_while_down) is not None
        hub.start()

        def after():
            deadline = time.monotonic() + TIMEOUT
            while True:
                dev = Device(gw.url)
                try:
                    dev.authenticate("dev1", keys["dev1"])
                    dev.conn.create_sender(EVENTS % "dev1").send(data_message(b"after"))
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
                finally:
                    dev.close()

        await in_thread(after)
    assert hub.recorder.d2c[-1].body == b"after"


async def test_device_killed_mid_stream(hub, keys, tmp_path) -> None:
    config = gateway_config(hub, tmp_path, max_connections=1)
    async with running_gateway(config) as gw, trio.open_nursery() as n:
        proxy = await n.start(KillableProxy(gw.port).run)
        started = threading.Event()

        def stream():
            dev = Device(f"amqp://127.0.0.1:{proxy.port}")
            try:
                dev.authenticate("dev1", keys["dev1"])
                sender = dev.conn.create_sender(EVENTS % "dev1")
                dev.conn.create_receiver("/devices/dev1/messages/devicebound")
                for i in range(2000):
                    sender.link.send(data_message(b"%d" % i))
                started.set()
                try:
                    dev.conn.wait(lambda: False, timeout=TIMEOUT)
                except Exception:
                    pass
            finally:
                try:
                    dev.close()
                except Exception:
                    pass

        async def kill():
            await trio.to_thread.run_sync(started.wait)
            await trio.to_thread.run_sync(
                lambda: hub.recorder.wait_for(lambda: hub.recorder.d2c_count >= 100)
            )
            await proxy.kill()

        n.start_soon(kill)
        await in_thread(stream)
        # The device's upstream links are gone; only the gateway's CBS pair stays.
        with trio.fail_after(TIMEOUT):
            while hub_open_links(hub) > 2 or gw.router.devices:
                await trio.sleep(0.05)
        assert hub_open_links(hub) == 2
        n.cancel_scope.cancel()


async def test_links_refused_when_hub_unreachable(hub, keys, tmp_path) -> None:
    hub.stop()
    config = gateway_config(hub, tmp_path, max_connections=1)
    async with running_gateway(config) as gw:

        def run():
            with Device(gw.url) as dev:
                try:
                    dev.conn.create_sender(EVENTS % "dev1")
                except LinkDetached as exc:
                    return str(exc)

        text = await in_thread(run)
    assert "amqp:connection:forced" in text


async def test_device_links_come_back_without_redoing_cbs(hub, keys, tmp_path) -> None:
    """The upstream connection is replaced under a device whose own connection to
    the gateway stayed up: the gateway puts the device's token again for it."""
    config = gateway_config(hub, tmp_path, max_connections=1)
    async with running_gateway(config) as gw:

        def run():
            with authenticated_device(gw.url, "dev1", keys["dev1"]) as dev:
                sender = dev.conn.create_sender(EVENTS % "dev1")
                sender.send(data_message(b"one"))
                hub.kill_connections()
                assert wait_detached(dev, sender) == "amqp:connection:forced"
                deadline = time.monotonic() + TIMEOUT
                while True:
                    try:
                        sender = dev.conn.create_sender(EVENTS % "dev1")
                        break
                    except LinkDetached as exc:
                        # Refused while the pool reconnects: never for want of a token.
                        assert exc.condition == "amqp:connection:forced", exc
                        assert time.monotonic() < deadline
                        time.sleep(0.1)
                sender.send(data_message(b"two"))

        await in_thread(run)
    assert [r.body for r in hub.recorder.d2c] == [b"one", b"two"]
    assert [c.status for c in hub.recorder.cbs] == [200, 200]
    assert hub.recorder.connections["amqp"].opened == 2
