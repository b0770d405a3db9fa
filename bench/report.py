"""The run's table: printed, as JSON, and as a Markdown block for bench/RESULTS.md."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .results import PATHS, Metric, RunInfo, ScenarioResult


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def revision(repo: Path) -> str | None:
    """The checked-out commit (read only), with `+dirty` when the tree has changes."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")  # fmt: skip


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _verdict(metric: Metric) -> str:
    met = metric.met
    if met is None:
        return metric.target_text + (" (n/a)" if metric.target else "")
    return f"{metric.target_text} {'ok' if met else 'MISSED'}"


def rows(results: list[ScenarioResult]) -> list[list[str]]:
    table: list[list[str]] = []
    for result in results:
        for i, metric in enumerate(result.metrics):
            scenario = f"{result.number}. {result.title}" if i == 0 else ""
            ratio = metric.ratio
            table.append(
                [scenario, f"{metric.name} ({metric.unit})"]
                + [_number(metric.values.get(path)) for path in PATHS]
                + ["-" if ratio is None else f"{ratio:.2f}", _verdict(metric)]
            )
        if not result.metrics:
            table.append([f"{result.number}. {result.title}", "(no metrics)", "", "", "", "", ""])
    return table


HEADER = ["scenario", "metric", "direct", "stunnel", "gateway", "gateway/stunnel", "target"]


def text_table(results: list[ScenarioResult]) -> str:
    body = rows(results)
    widths = [max(len(row[i]) for row in [HEADER, *body]) for i in range(len(HEADER))]
    numeric = {2, 3, 4, 5}

    def line(row: list[str]) -> str:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in
                 enumerate(zip(row, widths, strict=True))]  # fmt: skip
        return "  ".join(cells).rstrip()

    out = [line(HEADER), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in body]
    out += _notes(results)
    return "\n".join(out) + "\n"


def _notes(results: list[ScenarioResult]) -> list[str]:
    notes: list[str] = []
    for result in results:
        for path, reason in result.skipped.items():
            notes.append(f"scenario {result.number}: {path} skipped: {reason}")
        for path, error in result.errors.items():
            first = error.splitlines()[0] if error else ""
            notes.append(f"scenario {result.number}: {path} FAILED: {first}")
    return ([""] + notes) if notes else []


def markdown(info: RunInfo, results: list[ScenarioResult]) -> str:
    m = info.machine
    lines = [
        f"### Run of {info.date}" + (" (smoke, not a measurement)" if info.smoke else ""),
        "",
        f"- machine: {m['nproc']} CPU(s), {m['cpu_model']}, Linux {m['kernel']}, "
        f"Python {m['python']}",
        f"- command: `{info.command}`",
        f"- gateway started as: {info.gateway_runner}; revision: {info.revision or 'unknown'}; "
        f"run took {info.seconds:.0f} s",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---", "---", "--:", "--:", "--:", "--:", "---"]) + "|",
    ]
    for row in rows(results):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    notes = _notes(results)
    if notes:
        lines += [""] + [f"- {note}" for note in notes if note]
    return "\n".join(lines) + "\n"


def to_json(info: RunInfo, results: list[ScenarioResult]) -> str:
    return json.dumps({"run": info.to_json(), "scenarios": [r.to_json() for r in results]},
                      indent=2, default=str)  # fmt: skip


def write_outputs(
    out_dir: Path, info: RunInfo, results: list[ScenarioResult], suffix: str = ""
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(info) + suffix
    json_path = out_dir / f"{stem}.json"
    md_path = out_dir / f"{stem}.md"
    json_path.write_text(to_json(info, results))
    md_path.write_text(markdown(info, results))
    return json_path, md_path


def _stem(info: RunInfo) -> str:
    stamp = info.date.replace(":", "").replace("-", "").replace("T", "-").split("+")[0]
    return f"bench-{stamp}" + ("-smoke" if info.smoke else "")


# -- several rounds of the same scenarios (--repeat) ----------------------------------------


SUMMARY_HEADER = ["scenario", "metric", "gateway/stunnel by round", "median", "target"]


def summary_rows(rounds: list[list[ScenarioResult]]) -> list[list[str]]:
    """One row per metric with a target or a ratio: its ratio in each round (the
    gateway's value for an absolute target), their median and the target judged on it."""
    table: list[list[str]] = []
    first = rounds[0]
    for index, result in enumerate(first):
        shown = False
        for position, metric in enumerate(result.metrics):
            if metric.target is None and metric.ratio is None:
                continue
            absolute = metric.target is not None and metric.target[0] == "gateway_max"
            figures: list[float | None] = []
            for results in rounds:
                same = results[index].metrics[position] if index < len(results) else None
                if same is None or same.name != metric.name:
                    figures.append(None)
                else:
                    figures.append(same.values.get("gateway") if absolute else same.ratio)
            known = sorted(f for f in figures if f is not None)
            middle = _median(known)
            label = f"{metric.name} ({metric.unit})" if absolute else metric.name
            table.append([
                "" if shown else f"{result.number}. {result.title}",
                label,
                ", ".join("-" if f is None else f"{f:.2f}" for f in figures),
                "-" if middle is None else f"{middle:.2f}",
                _judged(metric, middle),
            ])  # fmt: skip
            shown = True
    return table


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _judged(metric: Metric, value: float | None) -> str:
    if metric.target is None:
        return ""
    kind, limit = metric.target
    if value is None:
        return metric.target_text + " (n/a)"
    met = value >= limit if kind == "ratio_min" else value <= limit
    return f"{metric.target_text} {'ok' if met else 'MISSED'}"


def summary_text(rounds: list[list[ScenarioResult]]) -> str:
    body = summary_rows(rounds)
    widths = [max(len(row[i]) for row in [SUMMARY_HEADER, *body]) for i in range(5)]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
           for row in [SUMMARY_HEADER, ["-" * w for w in widths], *body]]  # fmt: skip
    return "\n".join(out) + "\n"


def summary_markdown(info: RunInfo, rounds: list[list[ScenarioResult]]) -> str:
    lines = [
        f"### {len(rounds)} rounds from {info.date}",
        "",
        f"- command: `{info.command}`; revision: {info.revision or 'unknown'}; "
        f"took {info.seconds:.0f} s",
        "",
        "| " + " | ".join(SUMMARY_HEADER) + " |",
        "|---|---|---|--:|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(rounds)]
    return "\n".join(lines) + "\n"


def write_summary(out_dir: Path, info: RunInfo, rounds: list[list[ScenarioResult]]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{_stem(info)}-summary.md"
    path.write_text(summary_markdown(info, rounds))
    return path
