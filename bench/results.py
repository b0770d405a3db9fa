"""What a bench run produces: metrics per scenario, with the gateway/stunnel ratio and target."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PATHS = ("direct", "stunnel", "gateway")
# The gateway again, its connectors over WebSockets (`--transport websockets`).
WS_PATH = "gateway-ws"


@dataclass
class Metric:
    name: str
    unit: str
    values: dict[str, float | None]  # path -> value (None: not measured)
    # How the target is judged: ("ratio_min"|"ratio_max"|"gateway_max", limit) or None.
    target: tuple[str, float] | None = None
    # Differences (added latency) have no meaningful ratio.
    has_ratio: bool = True
    # The two values the ratio (and a ratio target) compares.
    ratio_paths: tuple[str, str] = ("gateway", "stunnel")

    @property
    def ratio(self) -> float | None:
        gateway, stunnel = (self.values.get(p) for p in self.ratio_paths)
        if not self.has_ratio or gateway is None or stunnel is None or stunnel == 0:
            return None
        return gateway / stunnel

    @property
    def target_text(self) -> str:
        if self.target is None:
            return ""
        kind, limit = self.target
        return {
            "ratio_min": f"ratio >= {limit:g}",
            "ratio_max": f"ratio <= {limit:g}",
            "gateway_max": f"gateway <= {limit:g} {self.unit}",
        }[kind]

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        kind, limit = self.target
        if kind == "gateway_max":
            value = self.values.get("gateway")
            return None if value is None else value <= limit
        ratio = self.ratio
        if ratio is None:
            return None
        return ratio >= limit if kind == "ratio_min" else ratio <= limit

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "values": self.values,
            "ratio_gateway_stunnel": self.ratio,
            "target": self.target_text or None,
            "met": self.met,
        }


@dataclass
class ScenarioResult:
    number: int
    title: str
    metrics: list[Metric] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # raw reports per path
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason
    errors: dict[str, str] = field(default_factory=dict)  # path -> what went wrong

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "title": self.title,
            "metrics": [m.to_json() for m in self.metrics],
            "skipped": self.skipped,
            "errors": self.errors,
            "details": self.details,
        }


@dataclass
class RunInfo:
    date: str
    command: str
    smoke: bool
    machine: dict[str, Any]
    gateway_runner: str
    revision: str | None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
