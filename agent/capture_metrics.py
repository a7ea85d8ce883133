"""Prometheus view of the in-kernel capture counters.

The eBPF program counts per enrolled workload (packets, bytes, new connections, fail-closed drops) and per node
(captures per listener, errors) in pinned maps; this collector reads them at scrape time, so the hot path in the
kernel never waits on user space and a restarted agent keeps the totals.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from agent.prometheus import MetricFamily, counter_family
from agent.redirect import Redirector

log = logging.getLogger("agent.capture_metrics")


class CaptureCollector:
    def __init__(self, redirector: Redirector) -> None:
        self.redirector = redirector

    def collect(self) -> Iterator[MetricFamily]:
        try:
            per_workload = self.redirector.counters()
            totals = self.redirector.stats()
            spoofed = self.redirector.spoofed_drops()
        except Exception as e:  # capture not started (yet): report nothing rather than fail the whole scrape
            log.debug("capture counters unavailable", extra={"fields": {"error": repr(e)}})
            return
        packets = counter_family(
            "ambit_capture_packets", "TCP packets sent by each enrolled workload, counted in the kernel", labels=["ip"]
        )
        octets = counter_family(
            "ambit_capture_bytes", "TCP bytes sent by each enrolled workload, counted in the kernel", labels=["ip"]
        )
        conns = counter_family(
            "ambit_capture_connections",
            "New connections captured into the agent per enrolled workload",
            labels=["ip", "direction"],
        )
        drops = counter_family(
            "ambit_capture_fail_closed_drops",
            "Connections of an enrolled workload dropped because no agent listener was there (fail closed)",
            labels=["ip"],
        )
        for ip, c in sorted(per_workload.items()):
            packets.add_metric([ip], c.packets)
            octets.add_metric([ip], c.bytes)
            conns.add_metric([ip, "outbound"], c.connections_out)
            conns.add_metric([ip, "inbound"], c.connections_in)
            drops.add_metric([ip], c.drops)
        events = counter_family("ambit_capture_events", "Node-wide capture program events by kind", labels=["event"])
        for name, value in sorted(totals.items()):
            events.add_metric([name], value)
        spoofing = counter_family(
            "ambit_capture_spoofed_drops",
            "TCP arriving at an interface (a pod's, or the uplink) from the address of an enrolled workload living "
            "elsewhere (dropped)",
            labels=["interface"],
        )
        for ifname, value in sorted(spoofed.items()):
            spoofing.add_metric([ifname], value)
        yield from (packets, octets, conns, drops, events, spoofing)
