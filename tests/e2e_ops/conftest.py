"""Fixtures: device keys and an emulated hub speaking AMQP and MQTT (hubsim, TLS)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.hubsim import HubSim
from tests.e2e_amqp.gw_helpers import HUB_HOST, new_key


@pytest.fixture
def keys() -> dict[str, str]:
    return {f"dev{i}": new_key() for i in range(1, 4)}


@pytest.fixture
def hub(keys: dict[str, str]) -> Iterator[HubSim]:
    sim = HubSim(keys, hub_host=HUB_HOST)
    with sim:
        yield sim
    sim.close()
