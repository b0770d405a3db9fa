from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gw_helpers import HUB_HOST, new_key  # noqa: E402

from gateway.hubsim import HubSim  # noqa: E402


@pytest.fixture
def keys() -> dict[str, str]:
    return {f"dev{i}": new_key() for i in range(1, 4)}


@pytest.fixture
def hub(keys: dict[str, str]) -> Iterator[HubSim]:
    sim = HubSim(keys, hub_host=HUB_HOST, mqtt_port=None)
    with sim:
        yield sim
    sim.close()
