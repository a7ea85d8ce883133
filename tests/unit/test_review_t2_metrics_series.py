"""A connection's byte series exist from its open to the end, at 0 when no byte moved, as ztunnel's do: its
ConnectionResult::new (src/proxy/metrics.rs) takes the sent and received counters of the connection's labels with
get_or_create when the connection opens, so a series is never missing while the opened and closed ones exist.

Before, a byte counter was only touched when a closed connection had moved bytes that way: a connection that
relayed nothing one way showed that series at 0 at every scrape while it was open (read from its relay) and dropped
it from the next scrape once it closed (Prometheus marks it stale, and a later connection with those labels starts
a new one), and a connection denied or failed before relaying never had byte series at all, while ztunnel has them
at 0."""

from __future__ import annotations

from agent.accesslog import AccessLog
from agent.metrics import Metrics, traffic_label_values
from agent.prometheus import render
from tests.support.workloads import pod_workload

CLIENT = pod_workload("sleep-1", "client", "10.0.0.1", sa="sleep", deployment="sleep")
SERVER = pod_workload("echo-1", "server", "10.0.0.2", sa="echo", deployment="echo")
BYTES = ("istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total")


def _bytes(m: Metrics) -> dict[tuple[str, str], float]:
    """The byte counters' samples by (name, source_workload)."""
    out = {}
    for family in m.registry.collect():
        for s in family.samples:
            if s.name in BYTES:
                out[(s.name, s.labels["source_workload"])] = s.value
    return out


def test_a_connection_that_moved_nothing_one_way_keeps_that_series_after_it_closes() -> None:
    m = Metrics()
    record = AccessLog(m).start("inbound", ("10.0.0.1", 40000), ("10.0.0.2", 80), src=CLIENT, dst=SERVER, mtls=True)
    moved = [0, 0]
    record.relaying(lambda: (moved[0], moved[1]))
    assert _bytes(m) == {(BYTES[0], "sleep"): 0, (BYTES[1], "sleep"): 0}
    moved[0] = 12  # the client wrote; the server never answered
    assert _bytes(m) == {(BYTES[0], "sleep"): 12, (BYTES[1], "sleep"): 0}
    record.finish(12, 0)
    assert _bytes(m) == {(BYTES[0], "sleep"): 12, (BYTES[1], "sleep"): 0}, "no series left the scrape"
    assert "istio_tcp_sent_bytes_total{" in render(m.registry)[0].decode()


def test_a_denied_connection_has_its_byte_series_at_zero() -> None:
    m = Metrics()
    labels = traffic_label_values(reporter="destination", src=CLIENT, dst=SERVER, mtls=True)
    m.connection_opened(labels)
    m.connection_closed(labels, 0, 0, "DENY")
    assert _bytes(m) == {(BYTES[0], "sleep"): 0, (BYTES[1], "sleep"): 0}
