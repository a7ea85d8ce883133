"""Medians with min-max over rounds, and the lookups the report and the targets share."""

from __future__ import annotations

import statistics
from typing import Any

from bench.measures import MEASURES

NOISE_METRICS = ("foreign_cpu_s", "steal_cpu_s", "steal_frac", "attempts")
"""What other processes and the hypervisor took during each measure (bench/cpu.py), and how many runs it took to get
one the hypervisor left alone (bench/measures.py)."""

SUMMARY_METRICS: dict[str, tuple[str, ...]] = {
    "throughput": ("MBps", "cpu_s_per_gb", "proxy_cores", "retransmits", *NOISE_METRICS),
    "latency": ("p50", "p90", "p99", "p999", "mean", "cpu_us_per_req", "cores_per_1k_rps", *NOISE_METRICS),
    "connect": ("p50", "p90", "p99", "rate_per_s", "cpu_us_per_req", *NOISE_METRICS),
}

Summary = dict[str, dict[str, dict[str, float]]]


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def summarize(rounds: list[dict[str, Any]]) -> Summary:
    """Per measure, per metric: median/min/max/n over the rounds that produced that number (errors excluded)."""
    out: Summary = {}
    for measure in MEASURES:
        per_metric: dict[str, dict[str, float]] = {}
        for metric in SUMMARY_METRICS[measure.kind]:
            values = [
                float(v)
                for r in rounds
                if isinstance(r.get("measures", {}).get(measure.name), dict)
                and isinstance(v := r["measures"][measure.name].get(metric), int | float)
                and not isinstance(v, bool)
            ]
            if values:
                per_metric[metric] = spread(values)
        if per_metric:
            out[measure.name] = per_metric
    return out


def by_role(rounds: list[dict[str, Any]], measure: str, metric: str) -> dict[str, dict[str, float]]:
    """Per proxy process (role): median/min/max over rounds of a per-role figure such as cpu_s_per_gb_by_role."""
    values: dict[str, list[float]] = {}
    for r in rounds:
        per_role = r.get("measures", {}).get(measure, {}).get(metric)
        if isinstance(per_role, dict):
            for role, value in per_role.items():
                values.setdefault(role, []).append(float(value))
    return {role: spread(v) for role, v in values.items()}


def median(results: dict[str, Any], config: str, measure: str, metric: str) -> float | None:
    """The median of one number in results.json, or None when that configuration did not produce it."""
    entry = results.get("configs", {}).get(config, {}).get("summary", {}).get(measure, {}).get(metric)
    return None if entry is None else float(entry["median"])


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _per_round(results: dict[str, Any], config: str, measure: str, metric: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in results.get("configs", {}).get(config, {}).get("rounds", []):
        value = r.get("measures", {}).get(measure, {}).get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[r["round"]] = float(value)
    return out


def paired_ratio(results: dict[str, Any], config: str, base: str, measure: str, metric: str) -> float | None:
    """Median over rounds of config/base measured in the same round (seconds apart), which cancels much of the
    machine's minute-to-minute drift that a ratio of two medians would keep."""
    a, b = _per_round(results, config, measure, metric), _per_round(results, base, measure, metric)
    values = [a[r] / b[r] for r in a.keys() & b.keys() if b[r]]
    return statistics.median(values) if values else None


def paired_difference(results: dict[str, Any], config: str, base: str, measure: str, metric: str) -> float | None:
    """Median over rounds of config - base measured in the same round; None unless both have that number."""
    a, b = _per_round(results, config, measure, metric), _per_round(results, base, measure, metric)
    values = [a[r] - b[r] for r in a.keys() & b.keys()]
    return statistics.median(values) if values else None


def added(results: dict[str, Any], config: str, measure: str, metric: str) -> float | None:
    """Latency a configuration adds over the no-mesh baseline."""
    return paired_difference(results, config, "nomesh", measure, metric)
