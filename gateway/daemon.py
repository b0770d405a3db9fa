"""The gateway daemon: listeners, connector pools, the router, the admin endpoint.

``run(config, *, trace=())`` is what ``iot-gateway run`` calls once the
configuration validated and logging is set up. It starts the AMQP listeners
(link routing), the MQTT listeners (session relay), the AMQP connector pools
(on demand by default) and the admin endpoint, logs one line per listener and
connector, and tells systemd it is ready. On SIGTERM or SIGINT it closes the
listeners, detaches every routed link and closes every connection cleanly,
waits briefly for those frames to go out, and returns 0 well within 5 s.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable
from typing import Any

import trio

from gateway.config import GatewayConfig
from gateway.net.amqp_listener import serve_amqp_listener
from gateway.router.core import Router
from gateway.router.observe import OpsObserver

log = logging.getLogger("gateway.daemon")

# After SIGTERM: how long detaches and closes may take to reach the peers.
SHUTDOWN_GRACE = 2.0


def run(config: GatewayConfig, *, trace: Iterable[str] = ()) -> int:
    """Run until SIGINT or SIGTERM; returns the process exit code."""
    return trio.run(serve, config, tuple(trace))


def _ops(config: GatewayConfig) -> tuple[Any, Any]:
    """The metrics facade and the live registry (None where unavailable)."""
    metrics = registry = None
    try:
        from gateway.ops.metrics import Metrics

        metrics = Metrics(device_labels=bool(config.gateway.metrics_device_labels),
                          gateway_id=config.gateway.id)  # fmt: skip
    except Exception:  # the gateway relays traffic without metrics too
        log.exception("metrics unavailable")
    try:
        from gateway.ops.registry import Registry

        registry = Registry()
    except Exception:
        log.exception("live registry unavailable")
    return metrics, registry


def _tracer(trace: tuple[str, ...]) -> Any:
    if not trace:
        return None
    try:
        from gateway.ops.trace import FrameTracer
    except ImportError:
        log.warning("frame trace unavailable in this build")
        return None
    return FrameTracer(protocols=trace)


def _notify(what: str, text: str) -> None:
    try:
        from gateway.ops import sdnotify
    except ImportError:
        return
    getattr(sdnotify, what)(text)


async def serve(config: GatewayConfig, trace: tuple[str, ...] = (), *,
                task_status: trio.TaskStatus[Router] = trio.TASK_STATUS_IGNORED) -> int:  # fmt: skip
    # Install the handlers first, so a signal right after the startup lines is not lost.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        metrics, registry = _ops(config)
        observer = OpsObserver(metrics, registry)
        tracer = _tracer(trace)
        router = Router(config, observer=observer, tracer=tracer)
        if registry is not None:
            registry.set_routes(router.routes.as_list())
            for connector in config.connectors:
                registry.register_connector(connector.name, protocol=connector.protocol,
                                            target=connector.target,
                                            on_demand=getattr(connector, "on_demand", True))  # fmt: skip
        if trace:
            log.info("frame trace on for %s", ",".join(trace))
        async with trio.open_nursery() as nursery:
            await nursery.start(router.run)
            for connector in config.connectors:
                log.info("connector %s: %s to %s (%s)%s", connector.name, connector.protocol,
                         connector.target,
                         f"tls {connector.tls_profile}" if connector.tls_profile else "plaintext",
                         _pool_text(connector))  # fmt: skip
            for listener in config.listeners:
                bound = await nursery.start(_serve_listener, listener, config, router, metrics)
                if registry is not None:
                    registry.register_listener(listener.name, protocol=listener.protocol)
                    registry.set_listener_bound(listener.name, bound)
                log.info("listener %s: %s on %s (%s)", listener.name, listener.protocol,
                         ", ".join(f"{h}:{p}" for h, p in bound),
                         f"tls {listener.tls_profile}" if listener.tls_profile
                         else "plaintext")  # fmt: skip
            if config.admin.enabled and registry is not None:
                await _start_admin(nursery, config, registry, metrics)
            log.info("gateway %s started", config.gateway.id)
            _notify("ready", "running")
            task_status.started(router)
            async for signum in signals:
                log.info("received %s, stopping", signal.Signals(signum).name)
                break
            _notify("stopping", "stopping")
            # Detach every link and close every connection; new devices are turned
            # away meanwhile. Then the listeners and everything else stop.
            router.shutdown()
            with trio.move_on_after(SHUTDOWN_GRACE):
                while router.devices or router.upstreams:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    log.info("gateway %s stopped", config.gateway.id)
    return 0


def _pool_text(connector: Any) -> str:
    pool = getattr(connector, "pool", None)
    if pool is None:
        return ""
    mode = "on demand" if getattr(connector, "on_demand", True) else "always on"
    return (f", pool {pool.max_connections} x {pool.max_devices_per_connection} devices, "
            f"{mode}")  # fmt: skip


async def _serve_listener(listener: Any, config: GatewayConfig, router: Router, metrics: Any, *,
                          task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
    if listener.protocol == "amqp":
        await serve_amqp_listener(listener, config, router, observer=metrics,
                                  task_status=task_status)  # fmt: skip
        return
    from gateway.net.mqtt_relay import serve_mqtt_listener

    observer = metrics.mqtt_observer(listener.name) if metrics is not None else None
    tracer = router.tracer if router.tracer is not None and router.tracer.mqtt_enabled else None
    await serve_mqtt_listener(listener, config, task_status=task_status, observer=observer,
                              listener_observer=metrics, tracer=tracer)  # fmt: skip


async def _start_admin(nursery: trio.Nursery, config: GatewayConfig, registry: Any,
                       metrics: Any) -> None:  # fmt: skip
    try:
        from gateway.ops.admin import serve_admin
        from gateway.ops.health import Readiness
    except ImportError:
        log.warning("admin endpoint unavailable in this build")
        return
    readiness = Readiness.from_config(registry, config)
    try:
        await nursery.start(serve_admin, config.admin.listen, registry, metrics, readiness)
    except OSError as exc:
        log.error("admin endpoint %s: %s", config.admin.listen, exc)
