"""The package's layers hold: no module imports a higher layer, or a peer it must
not know. The contracts and the checker are `scripts/import_graph.py`'s
(``python scripts/import_graph.py`` prints the graph by layer)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "import_graph.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("import_graph", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


graph_tool = _load()


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return graph_tool.import_graph()


def test_no_module_imports_a_higher_layer_or_a_forbidden_peer(graph) -> None:
    assert graph_tool.violations(graph) == []


def test_no_import_circles(graph) -> None:
    assert graph_tool.circles(graph) == []


def test_the_graph_sees_the_package(graph) -> None:
    # A checker that found nothing to check would pass anything.
    assert "gateway.router.core" in graph and "gateway.net.amqp_listener" in graph
    assert "gateway.router.linkpair" in graph["gateway.router.core"]


@pytest.mark.parametrize(
    ("importer", "imported", "why"),
    [
        ("gateway.amqp.session", "gateway.net.pool", "upward"),  # protocol -> I/O
        ("gateway.config.model", "gateway.router.routes", "upward"),  # foundations -> relay
        ("gateway.net.amqp_listener", "gateway.router.core", "peers"),  # I/O -> relay
        ("gateway.router.core", "gateway.net.pool", "peers"),  # relay -> I/O
        ("gateway.router.observe", "gateway.ops.metrics", "upward"),  # relay -> operations
        ("gateway.mqtt_relay.session", "gateway.net.tls", "peers"),  # relay -> I/O
        ("gateway.mqtt_relay.session", "gateway.router.core", "peers"),  # relay -> relay
        ("gateway.net.listeners", "gateway.mqtt_relay.session", "peers"),  # I/O -> relay
        ("gateway.router.linkpair", "gateway.router.device", "upward"),
        ("gateway.router.cbs", "gateway.router.core", "upward"),
        ("gateway.router.observe", "gateway.router.linkpair", "upward"),
        ("gateway.router.device", "gateway.router.upstream", "peers"),
        ("gateway.router.routes", "gateway.router", "facade"),
    ],
)
def test_the_checker_catches_a_bad_import(importer: str, imported: str, why: str) -> None:
    graph = {importer: {imported}, imported: set(), "gateway.router": {"gateway.router.core"}}
    found = graph_tool.violations(graph)
    assert len(found) == 1 and found[0].startswith(f"{importer} -> {imported}")
    assert {"upward": "(upward)", "peers": "must not import",
            "facade": "facade"}[why] in found[0]  # fmt: skip


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("gateway.daemon", "gateway.net.upstream_io"),
        ("gateway.ops.router_observer", "gateway.router.observe"),
        ("gateway.router.core", "gateway.router.linkpair"),
        ("gateway.net.amqp_listener", "gateway.amqp.framing"),
        ("gateway.auth.credentials", "gateway.config.model"),
    ],
)
def test_the_checker_lets_a_downward_import_pass(importer: str, imported: str) -> None:
    assert graph_tool.violations({importer: {imported}, imported: set()}) == []


def test_a_module_in_no_layer_is_reported() -> None:
    found = graph_tool.violations({"gateway.newthing": set()})
    assert found and "in no layer" in found[0]


def test_circles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert graph_tool.circles(graph) == [["a", "b", "c"]]
