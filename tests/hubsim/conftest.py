from __future__ import annotations

from collections.abc import Iterator

import pytest
from hubsim_clients import HUB_HOST, new_key

from gateway.hubsim import HubSim


@pytest.fixture
def keys() -> dict[str, str]:
    return {"dev1": new_key(), "dev2": new_key(), "dev3": new_key(), "dev1/mod1": new_key()}


@pytest.fixture
def hub(keys: dict[str, str]) -> Iterator[HubSim]:
    sim = HubSim(keys, hub_host=HUB_HOST, policies={"device": new_key(), "service": new_key()})
    with sim:
        yield sim
    sim.close()
