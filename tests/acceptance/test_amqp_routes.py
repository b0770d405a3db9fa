"""Route table semantics through the daemon: patterns, directions, whole-segment prefixes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from proton.utils import LinkDetached

from .amqp_devices import ProtonDevice
from .amqp_hub import AmqpHub
from .conftest import AmqpStack, Pki, amqp_gateway_yaml
from .gateway_proc import start_gateway, write_config

pytestmark = pytest.mark.timeout(600)

ROUTES = """\
  - {pattern: "telemetry/*/events", connector: iothub, direction: in}
  - {pattern: "fleet/#", connector: iothub, direction: out}
  - {prefix: "ops", connector: iothub, direction: both}
"""


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[AmqpStack]:
    tmp: Path = tmp_path_factory.mktemp("routes")
    hub = AmqpHub(pki.cert_file, pki.key_file).start()
    hub.node_prefixes = ("$cbs", "devices/", "telemetry/", "fleet", "ops")
    gw = None
    try:
        text = amqp_gateway_yaml(pki, hub.port, extra_routes=ROUTES)
        gw = start_gateway(write_config(tmp, text), listeners=("amqp",))
        yield AmqpStack(hub, gw)
    finally:
        if gw is not None:
            gw.stop()
        hub.stop()


CASES = [
    # (device role, address, routed?)
    ("sender", "telemetry/d1/events", True),
    ("sender", "telemetry/d1/events/extra", False),  # `*` is exactly one segment
    ("receiver", "telemetry/d1/events", False),  # direction in: device senders only
    ("receiver", "fleet", True),  # `#` matches zero segments
    ("receiver", "fleet/a/b/c", True),
    ("sender", "fleet/a", False),  # direction out: device receivers only
    ("sender", "ops", True),
    ("sender", "ops/x", True),
    ("sender", "opsx", False),  # not a whole segment
    ("sender", "/ops/leading-slash", True),
]


@pytest.mark.parametrize(
    ("role", "address", "routed_ok"), CASES, ids=[f"{r}:{a}" for r, a, _ in CASES]
)
def test_route_matching(routed: AmqpStack, role: str, address: str, routed_ok: bool) -> None:
    hub = routed.hub
    with ProtonDevice(routed.port, "router") as dev:
        seen_before = len(hub.attaches)
        if routed_ok:
            if role == "sender":
                dev.sender(address, name="probe")
            else:
                dev.receiver(address, name="probe")
            new = hub.attaches[seen_before:]
            assert any((x.target if role == "sender" else x.source) == address for x in new), new
        else:
            with pytest.raises(LinkDetached) as info:
                if role == "sender":
                    dev.sender(address, name="probe")
                else:
                    dev.receiver(address, name="probe")
                    dev.pump(0.2)
            assert info.value.condition == "amqp:not-found"
            assert len(hub.attaches) == seen_before, "an unrouted attach reached the hub"
