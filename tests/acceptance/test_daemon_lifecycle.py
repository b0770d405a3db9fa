"""The daemon's life: SIGTERM with links open and deliveries in flight, SIGHUP reload."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from proton import Delivery, Endpoint
from proton.utils import ConnectionClosed, LinkDetached

from tests.waiting import FAILSAFE

from .amqp_devices import ProtonDevice, sample_messages
from .amqp_hub import AmqpHub
from .conftest import AmqpStack, Pki, amqp_gateway_yaml
from .gateway_proc import start_gateway, wait_until, write_config

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def fresh_stack(tmp_path: Path, pki: Pki) -> Iterator[AmqpStack]:
    hub = AmqpHub(pki.cert_file, pki.key_file).start()
    gw = None
    try:
        gw = start_gateway(
            write_config(tmp_path, amqp_gateway_yaml(pki, hub.port)), listeners=("amqp",)
        )
        yield AmqpStack(hub, gw)
    finally:
        if gw is not None and gw.proc.poll() is None:
            gw.proc.kill()
            gw.proc.wait()
        hub.stop()


def test_sigterm_with_open_links_exits_0(fresh_stack: AmqpStack) -> None:
    hub, gw = fresh_stack.hub, fresh_stack.gateway
    with ProtonDevice(fresh_stack.port, "term1") as dev:
        dev.put_token()
        snd = dev.sender("devices/term1/messages/events", name="telemetry")
        dev.receiver("devices/term1/messages/devicebound", name="c2d")
        dlv = dev.send_raw(snd, sample_messages(1)[0])
        dev.wait_settled([dlv])
        started = time.monotonic()
        gw.signal(signal.SIGTERM)
        # The device is told: its links are detached or its connection closed.
        told = ""
        try:
            dev.wait(
                lambda: bool(dev.conn.conn.state & Endpoint.REMOTE_CLOSED),
                timeout=FAILSAFE,
                what="closed by the gateway",
            )
            told = "connection closed"
        except LinkDetached as exc:
            told = f"link detached: {exc.condition}"
        except (ConnectionError, ConnectionClosed) as exc:
            told = f"connection lost: {exc}"
        print("device saw:", told)
        rc = gw.proc.wait(timeout=FAILSAFE)
        elapsed = time.monotonic() - started
    assert rc == 0, gw.log()
    # Nothing was in flight, so nothing held it for the drain (2 s): it is told and exits. How
    # soon depends on the machine's load; the fail-safe only catches a stop that hangs.
    assert elapsed < FAILSAFE, f"SIGTERM took {elapsed:.1f}s"
    # The hub saw the routed links detached rather than just a dropped socket.
    hub.wait_for(
        lambda: (
            {d.address for d in hub.detaches}
            >= {
                "devices/term1/messages/events",
                "devices/term1/messages/devicebound",
            }
        ),
        what="links detached at the hub",
    )


def test_sigterm_lets_in_flight_deliveries_settle(fresh_stack: AmqpStack) -> None:
    hub, gw = fresh_stack.hub, fresh_stack.gateway
    hub.d2c_policy = lambda rec: "hold"
    with ProtonDevice(fresh_stack.port, "drain1") as dev:
        dev.put_token()
        snd = dev.sender("devices/drain1/messages/events", name="telemetry")
        deliveries = [dev.send_raw(snd, m) for m in sample_messages(3)]
        dev.wait(lambda: len(hub.messages_on("devices/drain1/")) == 3, what="3 held at the hub")
        gw.signal(signal.SIGTERM)
        dev.pump(0.3)
        assert gw.proc.poll() is None, "exited with deliveries in flight (drain_timeout is 2s)"
        hub.settle_held(Delivery.ACCEPTED)
        dev.wait_settled(deliveries, timeout=FAILSAFE)
        assert {d.remote_state for d in deliveries} == {Delivery.ACCEPTED}
    assert gw.proc.wait(timeout=FAILSAFE) == 0


def test_sighup_reload_adds_a_route_and_refuses_a_broken_file(
    fresh_stack: AmqpStack, pki: Pki
) -> None:
    hub, gw = fresh_stack.hub, fresh_stack.gateway
    hub.node_prefixes = ("$cbs", "devices/", "modules/")
    with ProtonDevice(fresh_stack.port, "reload1") as dev:
        with pytest.raises(LinkDetached) as info:
            dev.sender("modules/reload1/inbox", name="before")
        assert info.value.condition == "amqp:not-found"
        assert not [a for a in hub.attaches if (a.target or "").startswith("modules/")]
    config = gw.config_path
    config.write_text(
        amqp_gateway_yaml(
            pki,
            hub.port,
            extra_routes='  - {prefix: "modules/", connector: iothub, direction: both}\n',
        )
    )
    gw.signal(signal.SIGHUP)
    wait_until(
        lambda: "modules/" in gw.http_get("/api/routes")[1], timeout=FAILSAFE, what="route table reloaded"
    )
    with ProtonDevice(fresh_stack.port, "reload2") as dev:
        snd = dev.sender("modules/reload2/inbox", name="after")
        dlv = dev.send_raw(snd, sample_messages(1)[0])
        dev.wait_settled([dlv])
        assert dlv.remote_state == Delivery.ACCEPTED
    log_before = len(gw.log())
    config.write_text("link_routes: [\n")
    gw.signal(signal.SIGHUP)
    wait_until(
        lambda: len(gw.log()) > log_before, timeout=FAILSAFE, what="a log line about the broken file"
    )
    assert gw.proc.poll() is None, "a broken config on SIGHUP stopped the daemon"
    with ProtonDevice(fresh_stack.port, "reload3") as dev:
        snd = dev.sender("modules/reload3/inbox", name="still")
        dlv = dev.send_raw(snd, sample_messages(1)[0])
        dev.wait_settled([dlv])
        assert dlv.remote_state == Delivery.ACCEPTED


def test_readyz_follows_a_connector_that_is_not_on_demand(tmp_path: Path, pki: Pki) -> None:
    hub = AmqpHub(pki.cert_file, pki.key_file).start()
    gw = None
    try:
        text = amqp_gateway_yaml(pki, hub.port).replace(
            "    sasl: anonymous\n",
            "    sasl: anonymous\n    on_demand: false\n    reconnect: {initial: 100ms, max: 500ms}\n",
        )
        gw = start_gateway(write_config(tmp_path, text), listeners=("amqp",))
        wait_until(
            lambda: gw.http_get("/readyz")[0] == 200, timeout=FAILSAFE, what="ready with the hub up"
        )
        assert hub.connections_opened >= 1, "on_demand: false did not connect at start"
        hub.stop(abrupt=True)
        wait_until(
            lambda: gw.http_get("/readyz")[0] == 503, timeout=FAILSAFE, what="not ready with the hub gone"
        )
        assert gw.http_get("/healthz")[0] == 200
    finally:
        if gw is not None:
            gw.stop()
        hub.stop()
