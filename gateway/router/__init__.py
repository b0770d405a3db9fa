"""The AMQP link-routing core (Qpid Dispatch Router style, for Azure IoT Hub).

`routes` matches addresses to connectors; `core.Router` routes device attaches
over pooled upstream connections (`linkpair`, `cbs`, `device`, `upstream`).
"""

from __future__ import annotations

from .core import Binding, NullObserver, Router, RouterObserver
from .routes import Route, RouteMatch, RouteTable, normalise_address

__all__ = [
    "Binding",
    "NullObserver",
    "Route",
    "RouteMatch",
    "RouteTable",
    "Router",
    "RouterObserver",
    "normalise_address",
]
