"""(e) Ambit attached, not enrolled: the capture program sits on both nodes' uplinks, the pods are not enrolled.

Its own lab (built from the plain topology) so the no-mesh baseline never crosses the program; the program is held
by bench/attach_holder.py, which uses the agent's loader (agent/redirect.py) the way the agent does. Nothing runs
in user space on this path, so there is no proxy CPU to charge: the cost shows up as throughput and latency only.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.drivers.ambit import probe_capture, uplink_programs
from bench.drivers.base import DriverUnavailable, Endpoint
from bench.labs import ECHO_PORT, IPERF_PORT, BenchLabs, Pinning
from bench.procs import ProcessGroup, Tracked
from bench.tools import Tools

READY_TIMEOUT_S = 60.0


class AmbitAttached:
    name = "ambit-attached"
    title = "Ambit attached, not enrolled"
    description = (
        "client pod (node1) -> server pod (node2), not enrolled, across uplinks carrying Ambit's tc capture program "
        "(agent/redirect.py Redirector, no pod enrolled)"
    )

    def __init__(self, labs: BenchLabs, group: ProcessGroup, tools: Tools, pinning: Pinning, work: Path) -> None:
        self._labs = labs
        self._group = group
        self._tools = tools
        self._pinning = pinning
        self._work = work
        self._holders: list[Tracked] = []

    def prepare(self) -> Endpoint:
        site = self._labs.get("attach")
        self._work.mkdir(parents=True, exist_ok=True)
        pending: list[tuple[Tracked, Path]] = []
        for node in site.lab.nodes.values():
            ready = self._work / f"{node.name}.ready"
            ready.unlink(missing_ok=True)
            argv = [sys.executable, "-m", "bench.attach_holder", "--instance", f"{site.lab.name}-{node.name}"]
            argv += ["--uplink", node.uplink, "--ready-file", str(ready)]
            holder = self._group.start(f"attach-holder-{node.name}", argv, netns=node.netns)
            self._holders.append(holder)
            pending.append((holder, ready))
        deadline = time.monotonic() + READY_TIMEOUT_S
        for holder, ready in pending:
            while not ready.exists():
                self._group.check(holder)
                if time.monotonic() > deadline:
                    raise DriverUnavailable(
                        f"{holder.name} not ready after {READY_TIMEOUT_S:.0f} s: {holder.log_tail()}"
                    )
                time.sleep(0.1)
        client, server = site.pod("bench/client"), site.pod("bench/server")
        notes = []
        for node in site.lab.nodes.values():
            programs = uplink_programs(node)
            if "ingress" not in programs:
                raise DriverUnavailable(f"no program on {node.netns} {node.uplink} ingress: {programs!r}")
            notes.append(f"{node.name} {node.uplink}: " + " ".join(programs.split()))
        seen = probe_capture(self._tools, client, site.node(client.node).netns, server.ip)
        if seen:
            raise DriverUnavailable(f"{client.key} is not enrolled but its traffic was captured: {seen[0]}")
        return Endpoint(
            client_netns=client.netns,
            echo=(server.ip, ECHO_PORT),
            iperf=(server.ip, IPERF_PORT),
            client_cpus=self._pinning.for_node(client.node),
            notes=notes,
        )

    def close(self) -> None:
        """SIGTERM makes each holder remove its filters, routing and pins (in its node netns, before lab down)."""
        for holder in self._holders:
            self._group.stop(holder, grace=15.0)
        self._holders.clear()
