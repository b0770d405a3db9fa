"""The import graph of the `gateway` package: by layer, its import circles, layer violations.

    python scripts/import_graph.py              # packages by layer, router modules, circles
    python scripts/import_graph.py --modules    # every module's imports as well

Exit status 1 when a module imports a higher layer (or a peer it must not
know), sits in no layer, or takes part in an import circle; 0 otherwise.
`tests/test_layers.py` runs the same check in the suite.

Every ``import`` statement counts, wherever it is: at module level, inside a
function, or under ``if TYPE_CHECKING:`` (a type-only import still ties the
modules' designs together). Stdlib only, so it runs without the project
installed.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gateway"


@dataclass(frozen=True)
class Layer:
    """Members (module or package names) on one level. ``peers`` says whether
    members of the same layer may import each other."""

    name: str
    members: tuple[str, ...]
    peers: bool = False


@dataclass(frozen=True)
class Contract:
    """Layers of `scope` (a package), bottom first: a module may import its own
    member, or members of lower layers. The scope's own ``__init__`` is its
    facade and may import anything inside it."""

    scope: str
    layers: tuple[Layer, ...]


CONTRACTS: tuple[Contract, ...] = (
    Contract("gateway", (
        # Pure helpers every layer may use (device text in log lines, bounded).
        Layer("text", ("gateway.logsafe",)),
        # Sans-I/O protocol engines: nothing of the gateway outside themselves and text.
        Layer("protocol", ("gateway.amqp", "gateway.mqtt")),
        # Configuration model, credentials and the message store: no relay, no
        # operations (the store's disk work is its own, in a worker thread).
        Layer("foundations", ("gateway.auth", "gateway.config", "gateway.store"), peers=True),
        # The relays (AMQP link router, MQTT session relay) and the I/O they are
        # handed by the daemon: three peers that never import each other.
        Layer("relays and I/O", ("gateway.router", "gateway.mqtt_relay", "gateway.net")),
        # Metrics, registry, admin API: they observe the relays and I/O.
        Layer("operations", ("gateway.ops",)),
        # Wiring and tools.
        Layer("top", ("gateway.daemon", "gateway.cli", "gateway.__main__", "gateway.demo",
                      "gateway.hubsim", "gateway.samples"), peers=True),
    )),  # fmt: skip
    Contract("gateway.router", (
        Layer("addresses", ("gateway.router.routes",)),
        Layer("identities", ("gateway.router.identity",)),
        # What the router reports through and what it is handed: declared interfaces.
        Layer("interfaces", ("gateway.router.observe", "gateway.router.ports"), peers=True),
        Layer("link pairs", ("gateway.router.linkpair",)),
        Layer("CBS", ("gateway.router.cbs",)),
        Layer("local links", ("gateway.router.local_link",)),
        Layer("connections", ("gateway.router.device", "gateway.router.upstream")),
        Layer("gateway-held tokens", ("gateway.router.gateway_tokens",)),
        Layer("store-and-forward", ("gateway.router.forwarder",)),
        Layer("provisioning logins", ("gateway.router.dps",)),
        Layer("wiring", ("gateway.router.core",)),
    )),  # fmt: skip
)


# ---- the graph --------------------------------------------------------------------------


def find_modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Module name -> source file, for every module of `package` under `root`."""
    mods: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The module `name` is, or is inside (``pkg.mod.func`` -> ``pkg.mod``)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports, anywhere in its source."""
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import mod` imports pkg and, if it is one, the module pkg.mod.
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        for name in names:
            owner = _owner(name, mods)
            if owner is not None and owner != module:
                found.add(owner)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    mods = find_modules(root, package)
    return {m: imports_of(m, p, mods) for m, p in mods.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import circles (strongly connected components of more than one module),
    largest first (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found, key=lambda c: (-len(c), c))


# ---- layers -----------------------------------------------------------------------------


def _inside(module: str, member: str) -> bool:
    return module == member or module.startswith(member + ".")


def place(module: str, contract: Contract) -> tuple[int, str] | None:
    """(layer index, member) of `module` under `contract`; the longest member wins."""
    best: tuple[int, str] | None = None
    for i, layer in enumerate(contract.layers):
        for member in layer.members:
            if _inside(module, member) and (best is None or len(member) > len(best[1])):
                best = (i, member)
    return best


def violations(graph: dict[str, set[str]],
               contracts: Iterable[Contract] = CONTRACTS) -> list[str]:  # fmt: skip
    """One line per import against a contract, and per module in no layer."""
    out: list[str] = []
    for contract in contracts:
        for module in sorted(graph):
            if module == contract.scope or not _inside(module, contract.scope):
                continue
            here = place(module, contract)
            if here is None:
                out.append(f"{module}: in no layer of {contract.scope}"
                           " (add it to CONTRACTS in scripts/import_graph.py)")  # fmt: skip
                continue
            for target in sorted(graph[module]):
                if not _inside(target, contract.scope):
                    continue
                if target == contract.scope:
                    if any(_inside(t, contract.scope) for t in graph[target]):
                        out.append(f"{module} -> {target}: imports its package's facade")
                    continue
                there = place(target, contract)
                if there is None or there[1] == here[1]:
                    continue  # unplaced targets are reported as modules of their own
                layers = contract.layers
                if there[0] > here[0]:
                    out.append(f"{module} -> {target}: {layers[here[0]].name} imports "
                               f"{layers[there[0]].name} (upward)")  # fmt: skip
                elif there[0] == here[0] and not layers[here[0]].peers:
                    out.append(f"{module} -> {target}: peers in {layers[here[0]].name} "
                               "must not import each other")  # fmt: skip
    return out


# ---- report -----------------------------------------------------------------------------


def _short(module: str, scope: str) -> str:
    return module[len(scope) + 1:] if module.startswith(scope + ".") else module


def report(graph: dict[str, set[str]], *, modules: bool = False) -> list[str]:
    lines: list[str] = [f"{PACKAGE}: {len(graph)} modules, "
                        f"{sum(len(v) for v in graph.values())} imports"]  # fmt: skip
    for contract in CONTRACTS:
        lines.append("")
        lines.append(f"{contract.scope}, top layer first (member -> members it imports):")
        for layer in reversed(contract.layers):
            lines.append(f"  [{layer.name}]")
            for member in layer.members:
                targets: set[str] = set()
                for module in graph:
                    if not _inside(module, member):
                        continue
                    for t in graph[module]:
                        there = place(t, contract) if _inside(t, contract.scope) else None
                        if there is not None and there[1] != member:
                            targets.add(_short(there[1], contract.scope))
                        elif there is None and t == contract.scope:
                            targets.add(_short(t, PACKAGE) + " (facade)")
                lines.append(f"    {_short(member, contract.scope)} -> "
                             f"{', '.join(sorted(targets)) or '-'}")  # fmt: skip
    if modules:
        lines.append("")
        lines.append("modules:")
        for module in sorted(graph):
            lines.append(f"  {module} -> {', '.join(sorted(graph[module])) or '-'}")
    lines.append("")
    found = circles(graph)
    lines.append(f"import circles: {len(found)}")
    lines += [f"  circle of {len(c)}: {' '.join(c)}" for c in found]
    bad = violations(graph)
    lines.append(f"layer violations: {len(bad)}")
    lines += [f"  {v}" for v in bad]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    graph = import_graph()
    print("\n".join(report(graph, modules="--modules" in args)))
    return 1 if circles(graph) or violations(graph) else 0


if __name__ == "__main__":
    raise SystemExit(main())
