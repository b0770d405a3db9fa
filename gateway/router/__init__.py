"""The AMQP link-routing core (Qpid Dispatch Router style, for Azure IoT Hub).

`routes` matches addresses to connectors; `core.Router` routes device attaches
over pooled upstream connections (`linkpair`, `cbs`, `device`, `upstream`).

Imports point down this list only (``python scripts/import_graph.py`` shows
them; `tests/test_layers.py` enforces it):

- `core`: the wiring. `Router` and `Binding` own the devices, the upstream
  connections and the pools, and hand each piece below what it needs.
- `dps`: provisioning devices' logins, relayed over connections of their own.
- `forwarder`: store-and-forward: who is served locally, and the replay.
- `gateway_tokens`: tokens the gateway puts for devices whose keys it holds.
- `device`, `upstream`: one device / one hub connection, its engine's events.
- `local_link`: a telemetry link the gateway answers itself, its messages stored.
- `cbs`: `$cbs` served locally and forwarded on shared connections.
- `linkpair`: a routed link and the relay between its two halves.
- `observe`, `ports`: the interfaces: what the router reports through
  (`RouterObserver`, `NullObserver`) and the I/O it is handed (`ConnectorIO`).
- `identity`, `routes`: identities and addresses, pure functions.

A lower piece declares what it needs of a higher one as a Protocol (e.g.
`linkpair.PairDevice`, `cbs.CbsBinding`) instead of importing it. The
router imports neither `gateway.net` nor `gateway.ops`: the daemon hands it
its I/O (`gateway.net.upstream_io.AmqpConnectorIO`) and its observer
(`gateway.ops.router_observer.OpsObserver`), and hands the router to the
AMQP listener.
"""

from __future__ import annotations

from .core import Binding, Router
from .observe import NullObserver, RouterObserver
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
