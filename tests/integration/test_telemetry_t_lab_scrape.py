"""A real agent's scrape in the mesh lab (examples/basic): curl asks for gzip as Prometheus does, and the agent
answers gzipped with its DNAT capture table's no-listener counter, read by the agent's own poller from the table
it wrote in its node's netns, and its series-expiry counter."""

from __future__ import annotations

import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from lab import netns
from tests.integration.conftest import LabFactory
from tests.support.mesh import wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "basic"


def _scrape(netns_name: str, ip: str) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    done = subprocess.run(
        netns.nsenter_argv(netns_name, ["curl", "-sS", "--compressed", "-D", "-", f"http://{ip}:15020/metrics"]),
        capture_output=True,
        timeout=30,
        check=True,
    )
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    return head.decode().lower(), samples


def test_a_lab_agent_serves_gzip_with_the_dnat_counter_and_the_expiry_counter(lab_factory: LabFactory) -> None:
    lab = lab_factory(EXAMPLE, mesh=True)
    node = lab.node("node2")  # demo/server-1 is enrolled here: the agent keeps a DNAT capture table
    drop = ("ambit_capture_dnat_no_listener_packets_total", (("action", "drop"), ("family", "ipv4")))

    def polled() -> bool:  # the poller reads the table every 15 s; the first read may precede the table
        return drop in _scrape(node.netns, node.ip)[1]

    wait_for(polled, "node2's agent exports its DNAT table's counter", timeout=60)
    head, samples = _scrape(node.netns, node.ip)
    assert "content-encoding: gzip" in head
    assert samples[drop] == 0  # every SYN found its listener
    assert samples[("ambit_capture_dnat_counter_read_errors_total", ())] == 0
    assert samples[("ambit_metric_series_expired_total", ())] == 0
