"""Agent RSS with 100 local workloads: a mesh lab with 100 enrolled pods on node1, each reached once over HBONE.

The target is about the agent's footprint on a realistically full node: per-workload state from the controller,
certificates for the pods' identities (20 service accounts, as a node hosts several) and an inbound HBONE
connection per pod. The RSS is read until it stops growing. Full runs only: the lab starts 101 pod workloads.

`python -m bench.agent_memory [--out DIR]` runs this measure alone (about a minute), to check a memory change
without a full bench run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml

from bench.cpu import rss_bytes
from bench.drivers.ambit import agent_pids
from bench.drivers.base import DriverUnavailable
from bench.labs import BenchLabs, Pinning
from bench.procs import ProcessGroup
from bench.tools import build_tools

LOCAL_WORKLOADS = 100
SERVICE_ACCOUNTS = 20
WORKLOAD_ECHO_PORT = 9000  # every lab pod runs lab.workload, which echoes here
SETTLE_S = 5.0
SETTLE_TIMEOUT_S = 60.0


def write_topology(out: Path) -> Path:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}, "spec": {"podCIDR": "10.72.0.0/23"}},
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node2"}, "spec": {"podCIDR": "10.72.2.0/24"}},
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "bench-rss", "labels": {"istio.io/dataplane-mode": "ambient"}},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "caller", "namespace": "bench-rss"},
            "spec": {"nodeName": "node2", "serviceAccountName": "caller"},
            "status": {"podIP": "10.72.2.10"},
        },
    ]
    for i in range(LOCAL_WORKLOADS):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"w{i:03d}", "namespace": "bench-rss", "labels": {"app": f"app{i % 20}"}},
                "spec": {"nodeName": "node1", "serviceAccountName": f"sa{i % SERVICE_ACCOUNTS}"},
                "status": {"podIP": f"10.72.0.{10 + i}"},
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return out


def measure(labs: BenchLabs, out: Path) -> dict[str, Any]:
    """Never raises for a failed measurement: the reason goes into the report."""
    from lab.client import tcp_echo

    try:
        site = labs.get("rss", write_topology(out / "topology-rss"))
        agents = agent_pids(site)
        if "node1" not in agents:
            raise DriverUnavailable("no live ambit-agent on node1 of the 100-workload lab")
        caller = site.pod("bench-rss/caller")
        failures = []
        for i in range(LOCAL_WORKLOADS):
            pod = site.pod(f"bench-rss/w{i:03d}")
            try:
                if tcp_echo(caller.netns, pod.ip, WORKLOAD_ECHO_PORT, b"rss") != b"rss":
                    failures.append(pod.name)
            except OSError as exc:
                failures.append(f"{pod.name}: {exc}")
        samples = _settle(agents["node1"])
        return {
            "max_rss_mb": round(max(samples) / 1e6, 1),
            "final": _breakdown(agents["node1"]),
            "local_workloads": LOCAL_WORKLOADS,
            "service_accounts": SERVICE_ACCOUNTS,
            "echo_failures": failures[:5],
            "echo_failed": len(failures),
            "note": f"node1 agent with {LOCAL_WORKLOADS} enrolled local pods ({SERVICE_ACCOUNTS} service accounts), "
            f"each reached once over HBONE from a pod on node2; RSS read until stable for {SETTLE_S:.0f} s",
        }
    except DriverUnavailable as exc:
        return {"reason": f"100-workload lab: {exc}"}
    finally:
        labs.release("rss")


def _breakdown(pid: int) -> dict[str, float]:
    """Where the final RSS is (heap and stacks vs mapped libraries) and how many threads hold malloc arenas."""
    fields: dict[str, float] = {}
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return fields
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[f"{key}_mb"] = round(int(value.split()[0]) * 1024 / 1e6, 1)
        elif key == "Threads":
            fields["threads"] = int(value)
    return fields


def _settle(pid: int) -> list[int]:
    """RSS samples every 0.5 s until the maximum has not grown for SETTLE_S (or SETTLE_TIMEOUT_S passed)."""
    samples = [rss_bytes(pid)]
    start = last_growth = time.monotonic()
    while time.monotonic() - last_growth < SETTLE_S and time.monotonic() - start < SETTLE_TIMEOUT_S:
        time.sleep(0.5)
        value = rss_bytes(pid)
        if value > max(samples):
            last_growth = time.monotonic()
        samples.append(value)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results/rss-<time>)")
    args = parser.parse_args(argv)
    out: Path = args.out or Path(__file__).resolve().parent / "results" / time.strftime("rss-%Y%m%d-%H%M%S")
    group = ProcessGroup(out / "logs")
    labs = BenchLabs(group, build_tools(out / "bin"), Pinning(False), out / "logs")
    try:
        result = measure(labs, out)
    finally:
        labs.close()
        group.stop_all()
    (out / "agent_rss.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if "max_rss_mb" in result else 1


if __name__ == "__main__":
    raise SystemExit(main())
