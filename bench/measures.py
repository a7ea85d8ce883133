"""The measures run against every configuration, and the proxy cost charged to each.

Each measure runs a client in the client pod against the backends in the server pod, reads the proxies' CPU before
and after, and notes the CPU everybody else used meanwhile and what the hypervisor stole. Results are plain dicts
(they go to results.json as is); a measure that fails returns {"error": reason} rather than raising, so one bad measure
never hides the others.

A measure during which the hypervisor stole more than max_steal of the machine is run again: the slowdown steal
causes is not the proxy's, and it comes in bursts, so a second try seconds later is usually clean.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench import procs
from bench.cpu import CpuSnapshot, cpu_seconds, foreign_cpu, own_process_tree, read_steal, steal_between
from bench.drivers.base import Endpoint
from bench.options import Durations
from bench.tools import Tools

Result = dict[str, object]

MAX_ATTEMPTS = 3
"""The first run and up to two re-measures: enough to step past a burst of steal, bounded so a VM that is stolen
from all the time still finishes its run (the report then shows the steal)."""


@dataclass(frozen=True)
class Measure:
    name: str
    title: str
    kind: str  # "throughput" | "latency" | "connect"
    streams: int = 1
    size: int = 1

    def expected_seconds(self, d: Durations) -> float:
        if self.kind == "throughput":
            return d.iperf_wall + 0.5
        if self.kind == "latency":
            return min(d.pingpong_max_seconds, (d.pingpong_samples + d.pingpong_warmup) * 200e-6) + 0.2
        return min(d.conn_max_seconds, (d.conn_samples + d.conn_warmup) * 1e-3) + 0.2


MEASURES: tuple[Measure, ...] = (
    Measure("tput1", "throughput, 1 stream", "throughput", streams=1),
    Measure("tput8", "throughput, 8 streams", "throughput", streams=8),
    Measure("lat1", "echo latency, 1 B", "latency", size=1),
    Measure("lat1k", "echo latency, 1 KiB", "latency", size=1024),
    Measure("conn", "new connection + first byte", "connect", size=1),
)


def _accounted(endpoint: Endpoint, body: Callable[[], Result]) -> Result:
    pids = endpoint.proxy_pids()
    snap0 = CpuSnapshot.take()
    steal0 = read_steal()
    before = {p.role: cpu_seconds([p.pid]) for p in endpoint.proxies}
    t0 = time.monotonic()
    try:
        result = body()
    except (subprocess.TimeoutExpired, OSError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    wall = time.monotonic() - t0
    stolen_s, stolen_frac = steal_between(steal0, read_steal(), wall)
    by_role = {p.role: round(cpu_seconds([p.pid]) - before[p.role], 4) for p in endpoint.proxies}
    ours = own_process_tree() | set(pids)
    result["wall_s"] = round(wall, 3)
    result["proxy_cpu_s"] = round(sum(by_role.values()), 4) if pids else None
    result["proxy_cpu_by_role"] = by_role
    result["foreign_cpu_s"] = round(foreign_cpu(CpuSnapshot.take().since(snap0), ours), 3)
    result["steal_cpu_s"] = round(stolen_s, 3)
    result["steal_frac"] = round(stolen_frac, 4)
    return result


def _iperf(endpoint: Endpoint, streams: int, d: Durations) -> Result:
    host, port = endpoint.iperf
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(d.iperf_seconds), "-P", str(streams), "-J"]
    if d.iperf_omit:
        argv += ["-O", str(d.iperf_omit)]
    out = procs.run(argv, netns=endpoint.client_netns, cpus=endpoint.client_cpus, timeout=d.iperf_wall + 40)
    try:
        doc = json.loads(out.stdout)
    except json.JSONDecodeError:
        return {"error": f"iperf3 exited {out.returncode}: {(out.stderr or out.stdout)[-400:].strip()}"}
    if "error" in doc:
        return {"error": f"iperf3: {doc['error']}"}
    received = doc["end"]["sum_received"]
    mbps = received["bits_per_second"] / 8e6
    return {
        "MBps": round(mbps, 1),
        "bytes": received["bytes"],
        "seconds": round(received["seconds"], 3),
        "retransmits": doc["end"].get("sum_sent", {}).get("retransmits"),
    }


def _pingpong(tools: Tools, endpoint: Endpoint, size: int, mode: str, d: Durations) -> Result:
    host, port = endpoint.echo
    if mode == "conn":
        samples, warmup, budget = d.conn_samples, d.conn_warmup, d.conn_max_seconds
    else:
        samples, warmup, budget = d.pingpong_samples, d.pingpong_warmup, d.pingpong_max_seconds
    argv = [str(tools.pingpong), host, str(port), str(size), str(samples), str(warmup), mode, str(budget)]
    out = procs.run(argv, netns=endpoint.client_netns, cpus=endpoint.client_cpus, timeout=budget + 60)
    if out.returncode != 0:
        return {"error": f"pingpong exited {out.returncode}: {out.stderr.strip()[-400:]}"}
    parsed: Result = json.loads(out.stdout)
    return parsed


def _steal_frac(result: Result) -> float:
    value = result.get("steal_frac")
    return float(value) if isinstance(value, int | float) else 0.0


def another_attempt(attempts: Sequence[Result], max_steal: float) -> bool:
    """Re-measure only a clean run that was stolen from: a failed attempt is reported as it is, never retried away."""
    last = attempts[-1]
    return len(attempts) < MAX_ATTEMPTS and "error" not in last and _steal_frac(last) > max_steal


def kept_attempt(attempts: Sequence[Result]) -> Result:
    """The least-stolen attempt, unless the last one failed: the loop stops there and the error must show."""
    if "error" in attempts[-1]:
        return attempts[-1]
    return min(attempts, key=_steal_frac)


def run_measure(
    measure: Measure,
    tools: Tools,
    endpoint: Endpoint,
    d: Durations,
    max_steal: float,
    on_retry: Callable[[int, float], None] | None = None,
) -> Result:
    """measure_once until another_attempt says stop; on_retry(attempt number, steal_frac that caused it) lets the
    caller show the extra attempt. The kept result records how many attempts ran and every attempt's steal."""
    attempts = [measure_once(measure, tools, endpoint, d)]
    while another_attempt(attempts, max_steal):
        if on_retry is not None:
            on_retry(len(attempts) + 1, _steal_frac(attempts[-1]))
        attempts.append(measure_once(measure, tools, endpoint, d))
    kept = kept_attempt(attempts)
    kept["attempts"] = len(attempts)
    kept["steal_fracs"] = [_steal_frac(a) for a in attempts]
    return kept


def measure_once(measure: Measure, tools: Tools, endpoint: Endpoint, d: Durations) -> Result:
    if measure.kind == "throughput":
        result = _accounted(endpoint, lambda: _iperf(endpoint, measure.streams, d))
        _derive_throughput(result, d)
    else:
        mode = "conn" if measure.kind == "connect" else "persistent"
        result = _accounted(endpoint, lambda: _pingpong(tools, endpoint, measure.size, mode, d))
        _derive_requests(result, d, mode)
    return result


def _derive_throughput(result: Result, d: Durations) -> None:
    """CPU-s per GB counts the omitted warm-up second too, assuming it ran at the measured rate."""
    proxy_cpu = result.get("proxy_cpu_s")
    mbps = result.get("MBps")
    if isinstance(proxy_cpu, float) and isinstance(mbps, float) and mbps > 0:
        gigabytes = mbps * d.iperf_wall / 1000.0
        result["cpu_s_per_gb"] = round(proxy_cpu / gigabytes, 3)
        result["proxy_cores"] = round(proxy_cpu / d.iperf_wall, 3)
        result["cpu_s_per_gb_by_role"] = {role: round(cpu / gigabytes, 3) for role, cpu in _by_role(result).items()}


def _derive_requests(result: Result, d: Durations, mode: str) -> None:
    """CPU per request, and the share of a core 1,000 req/s would keep busy (warm-up requests included)."""
    proxy_cpu = result.get("proxy_cpu_s")
    samples = result.get("samples")
    if not isinstance(proxy_cpu, float) or not isinstance(samples, int) or samples <= 0:
        return
    warmup = d.conn_warmup if mode == "conn" else d.pingpong_warmup
    per_request = proxy_cpu / (samples + warmup)
    result["cpu_us_per_req"] = round(per_request * 1e6, 1)
    result["cores_per_1k_rps"] = round(per_request * 1000, 4)
    requests = samples + warmup
    result["cpu_us_per_req_by_role"] = {role: round(cpu / requests * 1e6, 1) for role, cpu in _by_role(result).items()}


def _by_role(result: Result) -> dict[str, float]:
    by_role = result.get("proxy_cpu_by_role")
    return by_role if isinstance(by_role, dict) else {}
