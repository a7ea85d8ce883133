"""report.md: the run at a glance. Targets first, then each figure with its ratio to the baseline and to Envoy,
then the machine and its noise, so a reader can judge how far to trust what they just read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import plots, stats
from bench.measures import MAX_ATTEMPTS
from bench.options import ALL_CONFIGS
from bench.stats import added, paired_difference, paired_ratio, ratio

STATUS_MARK = {"met": "**met**", "not met": "**NOT MET**", "not measured": "not measured"}


def _num(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _cell(results: dict[str, Any], config: str, measure: str, metric: str, digits: int = 0, scale: float = 1.0) -> str:
    """Median with (min-max) when there was more than one round; scale turns fractions into percentages."""
    entry = results["configs"].get(config, {}).get("summary", {}).get(measure, {}).get(metric)
    return _spread_cell(entry, digits, scale)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _has_proxy(results: dict[str, Any], config: str) -> bool:
    """Comparing added latency with Envoy's only means something for configurations that put a proxy in the path."""
    return bool(results["configs"][config].get("proxies"))


def _configs(results: dict[str, Any]) -> list[str]:
    return [c for c in ALL_CONFIGS if c in results["configs"]]


def _label(results: dict[str, Any], config: str) -> str:
    entry = results["configs"][config]
    label = f"{config}"
    if entry.get("status") == "failed":
        label += " (FAILED)"
    return label


def _one_line(text: object, limit: int = 400) -> str:
    """Table cells cannot hold newlines or pipes; long reasons are cut here and given in full further down."""
    flat = " / ".join(line.strip() for line in str(text).splitlines() if line.strip()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """Markdown table; the first text_columns are left-aligned text, the rest right-aligned numbers."""
    align = ["---" if i < text_columns else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_one_line(cell) for cell in row) + " |" for row in rows]
    return lines


def _targets(results: dict[str, Any]) -> list[str]:
    rows = [[t["target"], t["goal"], t["value"], STATUS_MARK.get(t["status"], t["status"])] for t in results["targets"]]
    lines = ["## Targets", ""]
    lines += _table(["target", "goal", "measured (medians)", "status"], rows, text_columns=4)
    lines += [
        "",
        "Measured values are medians over the rounds; a target whose configuration produced no number "
        "is *not measured*, never met. The same-node target is judged against `nomesh-same` (the same two pods on "
        "the same node without a mesh), not `nomesh`: like for like, only the mesh differs; the throughput table's "
        "*x no mesh* columns stay relative to the cross-node `nomesh`.",
        "",
    ]
    return lines


def _config_table(results: dict[str, Any]) -> list[str]:
    rows = []
    for config in _configs(results):
        entry = results["configs"][config]
        status = entry.get("status", "?")
        if status == "failed":
            status = f"**FAILED**: {entry.get('reason')}"
        elif entry.get("errors"):
            status = f"ok, with errors in {len(entry['errors'])} measure(s) (see below)"
        rows.append([config, entry.get("title", ""), entry.get("description", ""), status])
    return ["## Configurations", "", *_table(["config", "name", "path", "status"], rows, text_columns=4), ""]


def _throughput(results: dict[str, Any]) -> list[str]:
    rows = []
    for c in _configs(results):
        row = [_label(results, c)]
        for m in ("tput1", "tput8"):
            row += [
                _cell(results, c, m, "MBps"),
                _x(paired_ratio(results, c, "nomesh", m, "MBps")),
                _x(paired_ratio(results, c, "envoy", m, "MBps")),
            ]
        row += [_cell(results, c, "tput1", "cpu_s_per_gb", 2), _cell(results, c, "tput1", "proxy_cores", 2)]
        rows.append(row)
    header = [
        "config",
        "1 stream MB/s",
        "x no mesh",
        "x Envoy",
        "8 streams MB/s",
        "x no mesh",
        "x Envoy",
        "proxy CPU-s/GB (1 stream)",
        "proxy cores busy (1 stream)",
    ]
    return [
        "## Throughput",
        "",
        "iperf3 from the client pod to the server pod (server in the server pod), client to server, MB/s = 10^6 B/s.",
        "Proxy CPU is user + system time of every proxy process of the configuration (all threads), read before and "
        "after; CPU-s/GB divides it by the bytes moved. Ratios are medians of same-round ratios (each round measures "
        "all configurations back to back).",
        "",
        *_table(header, rows),
        "",
    ]


def _latency(results: dict[str, Any], measure: str, title: str) -> list[str]:
    rows = []
    for c in _configs(results):
        a50, a99 = added(results, c, measure, "p50"), added(results, c, measure, "p99")
        e50 = added(results, "envoy", measure, "p50")
        rows.append(
            [
                _label(results, c),
                _cell(results, c, measure, "p50", 1),
                _cell(results, c, measure, "p90", 1),
                _cell(results, c, measure, "p99", 1),
                _cell(results, c, measure, "p999", 1),
                _num(a50, 1),
                _num(a99, 1),
                _x(ratio(a50, e50)) if _has_proxy(results, c) else "-",
                _cell(results, c, measure, "cpu_us_per_req", 1),
                _cell(results, c, measure, "cores_per_1k_rps", 3),
            ]
        )
    header = [
        "config",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "added p50",
        "added p99",
        "added p50 x Envoy's",
        "proxy CPU us/req",
        "proxy cores per 1k req/s",
    ]
    return [f"### {title}", "", *_table(header, rows), ""]


def _connect(results: dict[str, Any]) -> list[str]:
    rows = []
    for c in _configs(results):
        a50 = added(results, c, "conn", "p50")
        rows.append(
            [
                _label(results, c),
                _cell(results, c, "conn", "p50", 0),
                _cell(results, c, "conn", "p99", 0),
                _num(a50, 0),
                _x(ratio(a50, added(results, "envoy", "conn", "p50"))) if _has_proxy(results, c) else "-",
                _cell(results, c, "conn", "rate_per_s", 0),
                _cell(results, c, "conn", "cpu_us_per_req", 0),
            ]
        )
    header = [
        "config",
        "p50 us",
        "p99 us",
        "added p50 us",
        "added x Envoy's",
        "connections/s (sequential)",
        "proxy CPU us/connection",
    ]
    return [
        "## New connection + first byte",
        "",
        "Each sample: connect, write 1 byte, read it back, close; one client, sequential, so connections/s is the "
        "inverse of the mean.",
        "",
        *_table(header, rows),
        "",
    ]


# Each step adds one layer to the one before it, so the gap to Envoy reads as where it comes from.
_STEPS = (
    ("ambit-tunnel", "pytls", "HTTP/2 CONNECT framing and pooling, over a bare Python mTLS relay"),
    ("ambit-cross", "ambit-tunnel", "capture, routing, policy, telemetry and the workload store, over the bare pair"),
    ("ambit-cross", "envoy", "Ambit against the Envoy HBONE pair (the gap the targets ask to close)"),
)
_STEP_FIGURES = (
    ("1 B echo: added p50 us", "lat1", "p50", 1),
    ("new connection: added p50 us", "conn", "p50", 0),
    ("proxy CPU us/request", "lat1", "cpu_us_per_req", 1),
    ("proxy CPU us/connection", "conn", "cpu_us_per_req", 0),
    ("proxy CPU-s/GB", "tput1", "cpu_s_per_gb", 2),
)


def _signed(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:+,.{digits}f}"


def _steps(results: dict[str, Any]) -> list[str]:
    """Same-round differences between configurations that differ by one layer. `pytls` opens a TLS connection per
    user connection (no pool), so its new-connection figures are no floor for a pooled tunnel and are left out."""
    rows = []
    for config, base, what in _STEPS:
        cells = [
            _signed(
                None
                if base == "pytls" and measure == "conn"
                else paired_difference(results, config, base, measure, metric),
                digits,
            )
            for _, measure, metric, digits in _STEP_FIGURES
        ]
        if any(cell != "-" for cell in cells):
            rows.append([f"{config} - {base}", what, *cells])
    if not rows:
        return []
    header = ["step", "what it adds", *(title for title, *_ in _STEP_FIGURES)]
    return [
        "## Where the overhead comes from",
        "",
        "Medians over rounds of the same-round difference between two configurations; a positive number is what the "
        "first costs more than the second.",
        "",
        *_table(header, rows, text_columns=2),
        "",
    ]


def _proxies(results: dict[str, Any]) -> list[str]:
    """Each proxy process on its own: where a pair's cost sits (client or server side, which agent)."""
    rows = []
    for c in _configs(results):
        entry = results["configs"][c]
        rounds = entry.get("rounds", [])
        per_gb = stats.by_role(rounds, "tput1", "cpu_s_per_gb_by_role")
        per_req = stats.by_role(rounds, "lat1", "cpu_us_per_req_by_role")
        per_conn = stats.by_role(rounds, "conn", "cpu_us_per_req_by_role")
        rss = entry.get("proxy_rss_mb") or {}
        for proxy in entry.get("proxies", []):
            role = proxy["role"]
            rows.append(
                [
                    c,
                    role,
                    _spread_cell(per_gb.get(role), 2),
                    _spread_cell(per_req.get(role), 1),
                    _spread_cell(per_conn.get(role), 0),
                    "-" if role not in rss else f"{rss[role]:.1f}",
                ]
            )
    header = ["config", "process", "CPU-s/GB (1 stream)", "CPU us/req (1 B echo)", "CPU us/connection", "RSS MB"]
    lines = ["## Proxy processes", "", "Per process: CPU (user + system, all threads) and RSS after the rounds.", ""]
    lines += _table(header, rows, text_columns=2) if rows else ["No proxy process ran."]
    rss_100 = results.get("agent_rss") or {}
    if rss_100.get("max_rss_mb") is not None:
        lines += [
            "",
            f"Agent with {rss_100.get('local_workloads')} local workloads: **{rss_100['max_rss_mb']:.1f} MB** RSS "
            f"({rss_100.get('note')}).",
        ]
        if rss_100.get("echo_failed"):
            lines.append(f"{rss_100['echo_failed']} of the echo probes failed, e.g. {rss_100.get('echo_failures')}.")
    else:
        lines += ["", f"Agent RSS with 100 local workloads: not measured ({rss_100.get('reason', 'not run')})."]
    return [*lines, ""]


def _spread_cell(entry: dict[str, float] | None, digits: int, scale: float = 1.0) -> str:
    if entry is None:
        return "-"
    text = _num(entry["median"] * scale, digits)
    if entry["n"] > 1:
        text += f" ({_num(entry['min'] * scale, digits)}-{_num(entry['max'] * scale, digits)})"
    return text


def _config_scale(results: dict[str, Any]) -> list[str]:
    scale = results.get("config_scale")
    lines = ["## Config scale (controller)", ""]
    if not scale:
        return [*lines, "Not run in this invocation.", ""]
    if scale.get("status") != "ok":
        return [*lines, f"**FAILED**: {scale.get('reason')}", ""]
    for key, label in scale.get("figures", {}).items():
        lines.append(f"- {label}: {scale.get(key)}")
    for note in scale.get("notes", []):
        lines.append(f"- {note}")
    return [*lines, ""]


def _machine(results: dict[str, Any]) -> list[str]:
    meta = results["meta"]
    m = meta["machine"]
    lines = [
        "## Machine and noise",
        "",
        f"- {m.get('cores')} cores, {m.get('cpu_model')} (AES-NI: {'yes' if m.get('aes_ni') else 'no'}), "
        f"kernel {m.get('kernel')}, {m.get('memory_gib')} GiB RAM, host {m.get('hostname')}",
        f"- software: Python {m.get('python')}, Envoy {m.get('envoy')}, {m.get('iperf3')}, gcc {m.get('gcc')}",
        f"- load average (1/5/15 min): {m.get('load_average_start')} at start, {m.get('load_average_end')} at end",
        f"- CPU pinning: {meta.get('pinning')}",
        f"- rounds: {meta.get('rounds')} ({meta.get('mode')} mode); cells show median (min-max) over rounds; the "
        "order of configurations rotates every round",
        "- every client, server and proxy shares the same cores; single numbers on this machine move by tens of "
        "percent, ratios measured in the same run are steadier",
        "",
        "Other processes (not started by this benchmark or its labs) that used the most CPU during the run:",
        "",
    ]
    lines += _table(
        ["process", "CPU-s"], [[t["process"], f"{t['cpu_s']:.1f}"] for t in meta.get("top_cpu_consumers", [])]
    )
    rows = []
    for c in _configs(results):
        rows.append(
            [
                c,
                _cell(results, c, "tput1", "foreign_cpu_s", 2),
                _cell(results, c, "lat1", "foreign_cpu_s", 2),
                _cell(results, c, "tput1", "steal_frac", 1, scale=100.0),
                _cell(results, c, "lat1", "steal_frac", 1, scale=100.0),
            ]
        )
    header = [
        "config",
        "other processes' CPU-s, 1-stream throughput",
        "... 1 B latency",
        "% stolen by the hypervisor, 1-stream throughput",
        "... 1 B latency",
    ]
    lines += [
        "",
        "While each measure ran: CPU seconds used by processes outside this benchmark, and the share of all CPUs' "
        "time the hypervisor stole (higher = noisier measure). Steal is time this virtual machine's CPUs were ready "
        "to run but the hypervisor ran another guest (the `steal` column of /proc/stat); no process sees it, every "
        f"process just runs slower. A measure with more than {meta['max_steal']:.0%} stolen (`--max-steal`) was run "
        f"again, at most {MAX_ATTEMPTS} attempts in all, and the least stolen attempt kept.",
        "",
        *_table(header, rows),
        "",
        *_steal_summary(results),
    ]
    return lines


def _steal_summary(results: dict[str, Any]) -> list[str]:
    """How much re-measuring the run needed, and how many figures are stolen from even so: the cue to rerun."""
    meta = results["meta"]
    kept = [
        res
        for entry in results["configs"].values()
        for rr in entry.get("rounds", [])
        for res in rr["measures"].values()
        if "steal_frac" in res
    ]
    retried = sum(1 for res in kept if res["attempts"] > 1)
    still = sum(1 for res in kept if res["steal_frac"] > meta["max_steal"])
    return [
        f"Stolen over the whole run: {meta['steal_frac']:.1%} of all CPUs' time ({meta['steal_cpu_s']} CPU-s). "
        f"{retried} of {len(kept)} measures were re-measured; {still} kept a figure still above the limit.",
        "",
    ]


def _wiring(results: dict[str, Any]) -> list[str]:
    lines = ["## How each configuration is wired", ""]
    for c in _configs(results):
        entry = results["configs"][c]
        lines.append(f"- **{c}**: {entry.get('description', '')}")
        for note in entry.get("notes", []):
            lines.append(f"  - {note}")
        if entry.get("status") == "failed":
            lines += [
                "  - FAILED:",
                "",
                "    ```",
                *[f"    {ln}" for ln in str(entry.get("reason")).splitlines()],
                "    ```",
            ]
        for err in entry.get("errors", [])[:6]:
            lines.append(f"  - error: {_one_line(err)}")
    lines += [
        "",
        "The reference pairs (Envoy, Python mTLS) run in the node netns of the plain lab; the client pod uses the "
        "client-side proxy as an explicit proxy (one listener per destination, like the reference Envoy config), "
        "because there is no traffic capture without a mesh. Ambit captures the client pod's connection to the "
        "server pod's own address. Certificates for the reference pairs are generated per run (ECDSA P-256, SPIFFE "
        "URI SANs); Ambit's come from its controller's CA.",
        "",
    ]
    return lines


def render(results: dict[str, Any], images: dict[str, str]) -> str:
    meta = results["meta"]
    head = [
        "# Ambit node benchmark",
        "",
        f"Run {meta.get('started_utc')} to {meta.get('finished_utc')} UTC ({meta.get('wall_s')} s), "
        f"**{meta.get('mode')}** mode, {meta.get('rounds')} round(s), configurations interleaved. "
        f"Machine: {meta['machine'].get('cores')} cores {meta['machine'].get('cpu_model')}, kernel "
        f"{meta['machine'].get('kernel')}, shared (see *Machine and noise*). Pinning: {meta.get('pinning')}.",
        "",
    ]
    if meta.get("interrupted"):
        head += [f"**Interrupted** ({meta['interrupted']}): the numbers below are partial.", ""]
    if meta.get("error"):
        head += [f"**Run error**: {meta['error']}", ""]
    body = [
        *_targets(results),
        *_config_table(results),
        *_throughput(results),
        "## Request/response latency",
        "",
        "Echo over one persistent TCP_NODELAY connection, microseconds per round trip; *added* = median over rounds "
        "of the same-round difference to the no-mesh figure of the same percentile.",
        "",
        *_latency(results, "lat1", "1 B"),
        *_latency(results, "lat1k", "1 KiB"),
        *_connect(results),
        *_steps(results),
        *_proxies(results),
        *_config_scale(results),
        *_machine(results),
        "## Plots",
        "",
        *[f"![{name}]({path})" for name, path in images.items()],
        "",
        *_wiring(results),
    ]
    return "\n".join(head + body) + "\n"


def write(results: dict[str, Any], out: Path) -> None:
    images = plots.write_all(results, out)
    (out / "report.md").write_text(render(results, images))
