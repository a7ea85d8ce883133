"""Throughput of pod-to-pod TCP with the capture program attached but the pods not enrolled, against no program.

Run as root: `python -m tests.support.redirect_iperf [--seconds 3] [--rounds 3]`. Prints a table (median MB/s per
configuration, interleaved rounds); asserts nothing. BENCH owns the benchmark suite; this is the capture-specific
measurement behind the "attached but not enrolled stays >= 0.95x direct" target.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

from agent.redirect import RedirectConfig, Redirector, cleanup
from tests.support import redirect_topology as rt


def _iperf(topo: rt.Topology, src: rt.Pod, dst: rt.Pod, seconds: int) -> float:
    out = subprocess.run(
        ["ip", "netns", "exec", src.netns, "iperf3", "-c", dst.ip, "-t", str(seconds), "-J"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 8e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    topo = rt.up()
    cfg = RedirectConfig(instance=topo.prefix, uplinks=(topo.uplink,))
    r = Redirector(cfg)
    results: dict[str, list[float]] = {"direct": [], "attached, not enrolled": []}
    try:
        pa, pb, pc = topo.pods["pa"], topo.pods["pb"], topo.pods["pc"]
        topo.spawn(pb.netns, "iperf3", "-s", "--forceflush", ready="Server listening")
        with rt.enter(topo.node):
            r.start()
        for _ in range(args.rounds):
            r.reconcile(set(), {pa.ip, pb.ip, pc.ip})  # nothing enrolled: no pod interface has the program
            results["direct"].append(_iperf(topo, pa, pb, args.seconds))
            # pc enrolled, so pa and pb carry the program as non-enrolled peers: TCP pays a map lookup per packet.
            r.reconcile({pc.ip}, {pa.ip, pb.ip, pc.ip})
            assert "ambit:" in topo.tc("filter", "show", "dev", pa.node_if, "ingress")
            results["attached, not enrolled"].append(_iperf(topo, pa, pb, args.seconds))
    finally:
        r.close()
        with rt.enter(topo.node):
            cleanup(cfg)
        topo.down()
    base = statistics.median(results["direct"])
    for name, vals in results.items():
        med = statistics.median(vals)
        print(f"{name:24s} median {med:8.0f} MB/s  x{med / base:.2f}  runs {[round(v) for v in vals]}")


if __name__ == "__main__":
    main()
