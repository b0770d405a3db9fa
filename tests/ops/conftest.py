from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio

from gateway.ops.admin import AdminLimits, serve_admin
from gateway.ops.health import Readiness
from gateway.ops.metrics import Metrics
from gateway.ops.registry import Registry


@dataclass
class AdminFixture:
    registry: Registry
    metrics: Metrics
    readiness: Readiness
    port: int
    url: str
    nursery: trio.Nursery = field(repr=False)


@pytest.fixture
async def admin(request: pytest.FixtureRequest) -> AsyncIterator[AdminFixture]:
    limits = getattr(request, "param", None) or AdminLimits()
    registry = Registry()
    metrics = Metrics(process_metrics=False)
    readiness = Readiness(registry, listeners=["amqp"], required_connectors=["iothub"])
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(
            lambda task_status: serve_admin(
                ("127.0.0.1", 0),
                registry,
                metrics,
                readiness,
                limits=limits,
                task_status=task_status,
            )
        )
        port = addrs[0][1]
        yield AdminFixture(registry, metrics, readiness, port, f"http://127.0.0.1:{port}", nursery)
        nursery.cancel_scope.cancel()
