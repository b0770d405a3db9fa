"""The `--repeat` summary: ratios by round, their median, the target judged on it."""

from __future__ import annotations

from bench.report import summary_markdown, summary_rows, summary_text
from bench.results import Metric, RunInfo, ScenarioResult


def _round(throughput: tuple[float, float], kb: float) -> list[ScenarioResult]:
    first = ScenarioResult(1, "AMQP", [
        Metric("throughput", "msg/s", {"direct": 12.0, "stunnel": throughput[0],
                                        "gateway": throughput[1]}, ("ratio_min", 0.9)),
        Metric("added p99", "ms", {"stunnel": 0.1, "gateway": 0.2}, has_ratio=False),
    ])  # fmt: skip
    fourth = ScenarioResult(4, "Idle memory", [
        Metric("per device", "KB", {"stunnel": 80.0, "gateway": kb}, ("gateway_max", 40.0)),
    ])  # fmt: skip
    return [first, fourth]


ROUNDS = [_round((10.0, 8.0), 35.0), _round((10.0, 9.5), 41.0), _round((10.0, 9.2), 34.0)]


def test_median_of_the_ratios_and_the_target_judged_on_it() -> None:
    rows = summary_rows(ROUNDS)
    assert rows[0] == [
        "1. AMQP", "throughput", "0.80, 0.95, 0.92", "0.92", "ratio >= 0.9 ok",
    ]  # fmt: skip
    # An absolute target is judged on the gateway's own figure.
    assert rows[1] == [
        "4. Idle memory", "per device (KB)", "35.00, 41.00, 34.00", "35.00", "gateway <= 40 KB ok",
    ]  # fmt: skip
    assert len(rows) == 2  # a difference without a ratio or target is left out


def test_even_count_and_missing_figures() -> None:
    rounds = [_round((10.0, 8.0), 35.0), _round((10.0, 8.6), 35.0)]
    rounds[1][0].metrics[0].values["gateway"] = None
    assert summary_rows(rounds)[0][2:] == ["0.80, -", "0.80", "ratio >= 0.9 MISSED"]
    rounds = [_round((10.0, 8.0), 35.0), _round((10.0, 8.6), 35.0)]
    assert summary_rows(rounds)[0][3] == "0.83"


def test_text_and_markdown() -> None:
    info = RunInfo("2026-11-23T00:00:00+00:00", "python -m bench --repeat 3", False,
                   {}, "daemon", "abc1234")  # fmt: skip
    text = summary_text(ROUNDS)
    assert "gateway/stunnel by round" in text and "0.80, 0.95, 0.92" in text
    md = summary_markdown(info, ROUNDS)
    assert md.startswith("### 3 rounds from 2026-11-23")
    assert "| 1. AMQP | throughput | 0.80, 0.95, 0.92 | 0.92 | ratio >= 0.9 ok |" in md
