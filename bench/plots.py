"""PNG figures for report.md (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): the backend must be chosen before pyplot loads

from bench.options import ALL_CONFIGS

PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))


def _configs(results: dict[str, Any]) -> list[str]:
    return [c for c in ALL_CONFIGS if c in results.get("configs", {})]


def _spread(results: dict[str, Any], config: str, measure: str, metric: str) -> tuple[float, float, float] | None:
    entry = results["configs"][config].get("summary", {}).get(measure, {}).get(metric)
    if entry is None:
        return None
    return entry["median"], entry["min"], entry["max"]


def _bars(
    ax: Any, results: dict[str, Any], configs: list[str], series: list[tuple[str, str, str]], ylabel: str
) -> bool:
    """Grouped bars with min-max whiskers; a configuration without numbers is labelled FAILED, not left out."""
    width = 0.8 / len(series)
    drawn = False
    for i, (measure, metric, label) in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for x, config in enumerate(configs):
            got = _spread(results, config, measure, metric)
            if got is None:
                continue
            med, mn, mx = got
            xs.append(x + (i - (len(series) - 1) / 2) * width)
            ys.append(med)
            lo.append(med - mn)
            hi.append(mx - med)
        if ys:
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=label)
            drawn = True
    if not drawn:
        ax.set_ylim(0, 1)  # nothing measured: keep a visible axis for the FAILED labels
    for x, config in enumerate(configs):
        entry = results["configs"][config]
        if not entry.get("summary"):
            ax.text(x, 0, "FAILED" if entry.get("status") == "failed" else "n/a", ha="center", va="bottom", color="red")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(configs, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if drawn and len(series) > 1:
        ax.legend()
    return drawn


def throughput(results: dict[str, Any], path: Path) -> None:
    configs = _configs(results)
    fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
    _bars(
        ax, results, configs, [("tput1", "MBps", "1 stream"), ("tput8", "MBps", "8 streams")], "MB/s (median, min-max)"
    )
    ax.set_title("Throughput, iperf3 client pod -> server pod")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_per_gb(results: dict[str, Any], path: Path) -> None:
    """Only configurations with proxy processes; those that failed stay on the axis, labelled."""
    configs = [
        c
        for c in _configs(results)
        if results["configs"][c].get("proxies") or results["configs"][c].get("status") == "failed"
    ]
    configs = [c for c in configs if c not in ("nomesh", "ambit-attached")]
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    if configs:
        series = [("tput1", "cpu_s_per_gb", "1 stream"), ("tput8", "cpu_s_per_gb", "8 streams")]
        if _bars(ax, results, configs, series, "proxy CPU-s per GB"):
            ax.axhline(3.0, color="gray", linestyle="--", linewidth=1)
            ax.text(-0.45, 3.0, "target <= 3", va="bottom", ha="left", color="gray")
    else:
        ax.text(0.5, 0.5, "no configuration with a proxy ran", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Proxy CPU seconds per GB moved (all proxy processes, user + system)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency(results: dict[str, Any], path: Path) -> None:
    configs = _configs(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True, layout="constrained")
    for ax, (measure, title) in zip(axes, (("lat1", "1 B echo"), ("lat1k", "1 KiB echo")), strict=True):
        for config in configs:
            points = [(q, _spread(results, config, measure, key)) for key, q in PERCENTILES]
            xs = [i for i, (_, got) in enumerate(points) if got is not None]
            ys = [got[0] for _, got in points if got is not None]
            if ys:
                ax.plot(xs, ys, marker="o", label=config)
        ax.set_xticks(range(len(PERCENTILES)))
        ax.set_xticklabels([f"p{q:g}" for _, q in PERCENTILES])
        ax.set_yscale("log")
        ax.set_title(f"{title}, persistent connection")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("round trip, microseconds (median over rounds)")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: dict[str, Any], out: Path) -> dict[str, str]:
    files = {"throughput": "throughput.png", "latency": "latency.png", "cpu_per_gb": "cpu_per_gb.png"}
    throughput(results, out / files["throughput"])
    latency(results, out / files["latency"])
    cpu_per_gb(results, out / files["cpu_per_gb"])
    return files
