"""Link route table: address normalisation, prefix and pattern matching.

Direction: the bottom of the router; imports nothing of the gateway.

Addresses are compared as `/`-separated segments, after stripping an
`amqp://` / `amqps://` scheme with its host[:port] and one leading `/`:

- ``prefix: P`` matches ``P`` itself and anything below it (``P/...``); a
  trailing ``/`` on the prefix is optional (``$cbs/`` matches ``$cbs``).
  Prefix ``P`` is the pattern ``P/#``.
- ``pattern:`` is split on ``/``; ``*`` matches exactly one segment and ``#``
  zero or more.

Unlike Qpid Dispatch Router we do NOT also split on ``.``: IoT Hub device ids
may contain dots, so with ``.`` as a separator a route for device ``a`` would
also capture device ``a.b``.

Most specific wins. Each matching route is scored by how it consumed the
address, segment by segment from the left: a literal beats ``*``, which beats
``#`` (so an exact route beats a longer prefix, which beats a shorter one,
which beats a wildcard at the same depth). On a tie the route with fewer
``#`` tokens wins (an exact pattern beats the equal prefix), then the one
listed first in the configuration.

Direction ``in`` is a device sender (its attach's *target* address is
matched), ``out`` a device receiver (*source* address); ``both`` serves both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

Direction = Literal["in", "out"]
RouteDirection = Literal["in", "out", "both"]

_SCHEME_HOST = re.compile(r"^amqps?://[^/]*", re.IGNORECASE)

# Scores for how one address segment was consumed.
_LITERAL = 2
_STAR = 1
_HASH = 0


def normalise_address(address: str) -> str:
    """Strip an ``amqp(s)://host[:port]`` prefix and one leading ``/``."""
    address = _SCHEME_HOST.sub("", address, count=1)
    if address.startswith("/"):
        address = address[1:]
    return address


def split_segments(address: str) -> tuple[str, ...]:
    """Split a normalised address into its ``/`` segments (``""`` -> no segments)."""
    if address == "":
        return ()
    return tuple(address.split("/"))


def prefix_to_tokens(prefix: str) -> tuple[str, ...]:
    """The pattern tokens equivalent to a prefix: ``P`` -> ``P/#``.

    The prefix is normalised like an address; trailing ``/`` are dropped.
    Wildcard characters in a prefix are literal, which the matcher honours by
    keeping prefix tokens apart from pattern tokens (see `_Token`).
    """
    core = normalise_address(prefix).rstrip("/")
    return split_segments(core)


@dataclass(frozen=True, slots=True)
class Route:
    """One configured link route."""

    connector: str
    direction: RouteDirection = "both"
    prefix: str | None = None
    pattern: str | None = None
    index: int = 0
    # Literal segments, then (for a prefix) an implicit trailing `#`.
    _tokens: tuple[tuple[int, str], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.prefix is None) == (self.pattern is None):
            raise ValueError("a route needs exactly one of prefix or pattern")
        if self.direction not in ("in", "out", "both"):
            raise ValueError(f"bad route direction {self.direction!r}")
        if self.prefix is not None:
            tokens = tuple((_LITERAL, s) for s in prefix_to_tokens(self.prefix)) + ((_HASH, "#"),)
        else:
            assert self.pattern is not None
            segs = split_segments(normalise_address(self.pattern))
            tokens = tuple(
                (_HASH, s) if s == "#" else (_STAR, s) if s == "*" else (_LITERAL, s) for s in segs
            )
        object.__setattr__(self, "_tokens", tokens)

    @property
    def spec(self) -> str:
        """How the route reads in the configuration, e.g. ``prefix $cbs``."""
        return f"prefix {self.prefix}" if self.prefix is not None else f"pattern {self.pattern}"

    def serves(self, direction: Direction) -> bool:
        return self.direction == "both" or self.direction == direction

    def score(self, segments: tuple[str, ...]) -> tuple[int, ...] | None:
        """The best consumption score of `segments` by this route, or None if no match."""
        return _best_score(self._tokens, segments)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"connector": self.connector, "direction": self.direction}
        if self.prefix is not None:
            d["prefix"] = self.prefix
        else:
            d["pattern"] = self.pattern
        return d


@lru_cache(maxsize=4096)
def _best_score(
    tokens: tuple[tuple[int, str], ...], segments: tuple[str, ...]
) -> tuple[int, ...] | None:
    """Highest lexicographic per-segment score of a match, or None.

    Dynamic programming over (token index, segment index); addresses and
    patterns are short, and results are cached per (route, address).
    """
    n_tok, n_seg = len(tokens), len(segments)
    # best[i][j]: best score for matching tokens[i:] against segments[j:]
    best: list[list[tuple[int, ...] | None]] = [[None] * (n_seg + 1) for _ in range(n_tok + 1)]
    best[n_tok][n_seg] = ()
    for i in range(n_tok - 1, -1, -1):
        kind, text = tokens[i]
        for j in range(n_seg, -1, -1):
            candidate: tuple[int, ...] | None = None
            if kind == _HASH:
                # zero segments, or one segment and stay on `#`
                candidate = best[i + 1][j]
                if j < n_seg and best[i][j + 1] is not None:
                    alt = (_HASH,) + best[i][j + 1]  # type: ignore[operator]
                    if candidate is None or alt > candidate:
                        candidate = alt
            elif j < n_seg and best[i + 1][j + 1] is not None:
                if kind == _STAR or text == segments[j]:
                    candidate = (kind,) + best[i + 1][j + 1]  # type: ignore[operator]
            best[i][j] = candidate
    return best[0][0]


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    address: str  # normalised


class RouteTable:
    """The configured link routes, queried per attach."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes: tuple[Route, ...] = tuple(routes)

    @classmethod
    def from_config(cls, link_routes: Iterable[Any]) -> RouteTable:
        """Build from config `link_routes` entries (objects or dicts with
        prefix|pattern, connector, direction)."""
        routes = []
        for i, r in enumerate(link_routes):
            get = r.get if isinstance(r, dict) else (lambda k, r=r: getattr(r, k, None))
            direction = get("direction") or "both"
            direction = getattr(direction, "value", direction)
            routes.append(
                Route(
                    connector=get("connector"),
                    direction=direction,
                    prefix=get("prefix"),
                    pattern=get("pattern"),
                    index=i,
                )
            )
        return cls(routes)

    def match(self, address: str | None, direction: Direction) -> RouteMatch | None:
        """The most specific route serving `direction` for `address`, or None."""
        if address is None:
            return None
        normalised = normalise_address(address)
        segments = split_segments(normalised)
        best_key: tuple[Any, ...] | None = None
        best_route: Route | None = None
        for route in self.routes:
            if not route.serves(direction):
                continue
            score = route.score(segments)
            if score is None:
                continue
            hashes = sum(1 for kind, _ in route._tokens if kind == _HASH)
            key = (score, -hashes, -route.index)
            if best_key is None or key > best_key:
                best_key, best_route = key, route
        if best_route is None:
            return None
        return RouteMatch(best_route, normalised)

    def as_list(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.routes]

    def __len__(self) -> int:
        return len(self.routes)


def attach_direction_and_address(role_is_receiver: bool, source: Any, target: Any) -> tuple[
    Direction, str | None
]:
    """The route direction and address of a device's attach.

    A device sender (role False) sends into the hub: direction ``in``, the
    target address is matched. A device receiver: ``out``, the source address.
    """
    if role_is_receiver:
        return "out", getattr(source, "address", None) if source is not None else None
    return "in", getattr(target, "address", None) if target is not None else None
