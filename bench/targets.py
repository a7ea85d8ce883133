"""The targets of issue 7 item 5, each judged met / not met / not measured from results.json.

A target is "not measured" when a configuration it needs produced no number; that is never turned into "met".
Ratios compare medians taken in the same run (same machine, same noise), which is why they are the judged figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bench.stats import added, median, paired_ratio, ratio

MET, NOT_MET, NOT_MEASURED = "met", "not met", "not measured"
RSS_WORKLOADS = 100
HBONE_CONFIGS = ("ambit-cross", "ambit-tunnel")


@dataclass
class Verdict:
    target: str
    goal: str
    value: str
    status: str


def _fmt(x: float | None, unit: str = "", digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}{unit}"


def _signed(us: float | None) -> str:
    return "n/a" if us is None else f"{us:+.0f} us"


def _times(x: float | None, bound: float | None = None) -> str:
    """Two decimals, or three when two would round a ratio onto the bound it missed (0.996 must not read 1.00x
    next to NOT MET)."""
    if x is None:
        return "n/a"
    if bound is not None and f"{x:.2f}" == f"{bound:.2f}" and x != bound:
        return f"{x:.3f}x"
    return f"{x:.2f}x"


def _judge(ok: bool | None) -> str:
    return NOT_MEASURED if ok is None else (MET if ok else NOT_MET)


def _all(*checks: bool | None) -> bool | None:
    if any(c is None for c in checks):
        return None
    return all(checks)


def _throughput_vs(results: dict[str, Any], config: str, base: str, measure: str, floor: float) -> Verdict:
    r = paired_ratio(results, config, base, measure, "MBps")
    streams = "1 stream" if measure == "tput1" else "8 streams"
    return Verdict(
        target=f"{config} throughput vs {base}, {streams}",
        goal=f">= {floor:.2f}x",
        value=_times(r, floor),
        status=_judge(None if r is None else r >= floor),
    )


def _added_latency(results: dict[str, Any], config: str, metric: str) -> Verdict:
    parts, checks = [], []
    for measure, label in (("lat1", "1 B"), ("lat1k", "1 KiB")):
        ours, envoy = added(results, config, measure, metric), added(results, "envoy", measure, metric)
        r = ratio(ours, envoy)
        parts.append(f"{label}: {_signed(ours)} vs Envoy {_signed(envoy)} ({_times(r)})")
        checks.append(None if ours is None or envoy is None else ours <= envoy)
    return Verdict(
        target=f"added {metric} latency, {config} vs Envoy pair",
        goal="<= 1.0x Envoy's",
        value="; ".join(parts),
        status=_judge(_all(*checks)),
    )


def _new_connection(results: dict[str, Any], config: str) -> Verdict:
    ours, envoy = added(results, config, "conn", "p50"), added(results, "envoy", "conn", "p50")
    return Verdict(
        target=f"new-connection overhead (p50, connect + first byte), {config} vs Envoy pair",
        goal="<= Envoy's",
        value=f"{_signed(ours)} vs Envoy {_signed(envoy)} ({_times(ratio(ours, envoy))})",
        status=_judge(None if ours is None or envoy is None else ours <= envoy),
    )


def _cpu_per_gb(results: dict[str, Any], config: str) -> Verdict:
    value = median(results, config, "tput1", "cpu_s_per_gb")
    return Verdict(
        target=f"{config} proxy CPU per GB (both sides, 1 stream)",
        goal="<= 3 CPU-s/GB",
        value=_fmt(value, " CPU-s/GB"),
        status=_judge(None if value is None else value <= 3.0),
    )


def _agent_rss(results: dict[str, Any]) -> Verdict:
    rss = results.get("agent_rss") or {}
    mb, local = rss.get("max_rss_mb"), rss.get("local_workloads")
    if mb is None:
        status, value = NOT_MEASURED, rss.get("reason", "no agent ran")
    elif local is None or local < RSS_WORKLOADS:
        status = NOT_MEASURED
        value = f"{mb:.1f} MB with {local} local workloads (the target needs {RSS_WORKLOADS})"
    else:
        status, value = _judge(mb <= 60.0), f"{mb:.1f} MB with {local} local workloads"
    return Verdict(f"agent RSS with {RSS_WORKLOADS} local workloads", "<= 60 MB", value, status)


def _config_scale(results: dict[str, Any]) -> list[Verdict]:
    scale = results.get("config_scale") or {}
    ok = scale.get("status") == "ok"
    full = ok and scale.get("full_size", False)
    note = "" if full or not ok else " (reduced size: not judged)"

    def one(name: str, goal: str, key: str, limit: float, unit: str, context: str = "") -> Verdict:
        value = scale.get(key) if ok else None
        text = _fmt(value, unit, 3) + context + note if ok else f"not measured: {scale.get('reason', 'not run')}"
        return Verdict(name, goal, text, _judge(None if value is None or not full else value < limit))

    build_context = (
        f" (not included: validating the documents {_fmt(scale.get('validate_s'), ' s', 3)}, encoding for xDS "
        f"{_fmt(scale.get('encode_s'), ' s', 3)})"
    )
    return [
        one("config build (Translator, full state)", "< 2 s", "build_s", 2.0, " s", build_context),
        one("full state delivered to all xDS clients", "< 2 s", "deliver_s", 2.0, " s"),
        one("single change delivered to ACK, p99", "< 0.1 s", "change_p99_s", 0.1, " s"),
    ]


def evaluate(results: dict[str, Any]) -> list[dict[str, str]]:
    verdicts: list[Verdict] = []
    # The HBONE targets are judged on the full data path (ambit-cross) and on the tunnel pair alone (ambit-tunnel).
    for config in HBONE_CONFIGS:
        verdicts += [
            _throughput_vs(results, config, "envoy", "tput1", 1.0),
            _throughput_vs(results, config, "envoy", "tput8", 1.0),
            _added_latency(results, config, "p50"),
            _added_latency(results, config, "p99"),
            _new_connection(results, config),
            _cpu_per_gb(results, config),
        ]
    verdicts += [
        # Like for like: the same two pods on the same node, only the mesh differs. Against the cross-node nomesh
        # the baseline would pay for a core bridge and a second node netns that ambit-same never crosses.
        _throughput_vs(results, "ambit-same", "nomesh-same", "tput1", 0.6),
        _throughput_vs(results, "ambit-attached", "nomesh", "tput1", 0.95),
        _agent_rss(results),
        *_config_scale(results),
    ]
    return [asdict(v) for v in verdicts]
