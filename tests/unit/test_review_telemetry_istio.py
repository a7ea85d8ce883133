"""The agent's telemetry as an operator with ztunnel's dashboards, alerts and log pipelines consumes it.

Each test names the ztunnel behaviour it checks (istio/ztunnel src/proxy/metrics.rs, src/metrics/, src/copy.rs).
"""

from __future__ import annotations

import logging
import os
import resource

import pytest
from prometheus_client.parser import text_string_to_metric_families as parse_text

from agent.accesslog import AccessLog
from agent.metrics import TRAFFIC_LABELS, Metrics, ProtoValues, sample_value, traffic_labels
from agent.prometheus import render, render_async, render_text, wants_openmetrics
from api.istio.workload import workload_pb2 as wpb
from common.spiffe import Identity
from tests.support.waiting import LoopTurns

SRC = wpb.Workload(
    uid="c//Pod/client/sleep-7d9f-abcde",
    name="sleep-7d9f-abcde",
    namespace="client",
    workload_name="sleep",
    canonical_name="sleep",
    canonical_revision="v1",
    cluster_id="Kubernetes",
    locality=wpb.Locality(region="eu-west1", zone="eu-west1-b"),
)
DST = wpb.Workload(
    uid="c//Pod/server/echo-5c6d-fghij",
    name="echo-5c6d-fghij",
    namespace="server",
    workload_name="echo",
    canonical_name="echo",
    cluster_id="Kubernetes",
)
SVC = wpb.Service(name="echo", namespace="server", hostname="echo.server.svc.cluster.local")
SRC_ID = Identity("cluster.local", "client", "sleep")
DST_ID = Identity("cluster.local", "server", "default")


def _record(m: Metrics, direction: str = "outbound") -> object:
    r = AccessLog(m).start(direction, ("10.1.0.5", 40000), ("10.2.0.7", 15008), src=SRC, dst=DST, service=SVC)
    r.src_identity, r.dst_identity, r.mtls = SRC_ID, DST_ID, True
    return r


# ---------------------------------------------------------------------------------------------------- access log


def test_a_failed_connection_is_connection_complete_at_error(caplog: pytest.LogCaptureFixture) -> None:
    """ztunnel's access_log!: one "connection complete" line per connection, INFO when it succeeded and ERROR
    with `error=` when it did not ("connection failed" is only log_early_deny's line, for a connection refused
    before its source and destination were known). A pipeline keyed on the message, or an alert on level=error,
    sees every failure only this way."""
    m = Metrics()
    r = _record(m, "inbound")
    with caplog.at_level(logging.INFO, logger="access"):
        r.finish(error="policy says no", flags="DENY")  # type: ignore[attr-defined]
    [rec] = [x for x in caplog.records if x.name == "access"]
    assert rec.getMessage() == "connection complete"
    assert rec.levelno == logging.ERROR
    assert rec.fields["error"] == "policy says no"  # type: ignore[attr-defined]


def test_early_refusal_is_still_connection_failed_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    """log_early_deny: WARN "connection failed" with src.addr, dst.addr, direction, error."""
    m = Metrics()
    with caplog.at_level(logging.INFO, logger="access"):
        AccessLog(m).refused("inbound", ("10.1.0.5", 1), ("10.2.0.7", 80), "unknown_destination")
    [rec] = [x for x in caplog.records if x.name == "access"]
    assert (rec.getMessage(), rec.levelno) == ("connection failed", logging.WARNING)


def test_access_log_names_the_pod_and_the_clusters(caplog: pytest.LogCaptureFixture) -> None:
    """ConnectionResultBuilder::new logs the workload's `name` (the pod) as src.workload/dst.workload, falling
    back to the canonical service, and src.cluster/dst.cluster (#1994); the metrics keep workload_name."""
    m = Metrics()
    r = _record(m)
    with caplog.at_level(logging.INFO, logger="access"):
        r.finish(10, 20)  # type: ignore[attr-defined]
    [rec] = [x for x in caplog.records if x.name == "access"]
    f = rec.fields  # type: ignore[attr-defined]
    assert f["src.workload"] == "sleep-7d9f-abcde" and f["dst.workload"] == "echo-5c6d-fghij"
    assert f["src.cluster"] == "Kubernetes" and f["dst.cluster"] == "Kubernetes"
    assert sample_value(m, "istio_tcp_connections_closed_total", {"source_workload": "sleep"}) == 1


def test_access_log_falls_back_to_the_canonical_service(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    nameless = wpb.Workload(uid="c//WorkloadEntry/vm/db", namespace="vm", canonical_name="db")
    r = AccessLog(m).start("outbound", ("10.1.0.5", 1), ("10.9.0.1", 5432), src=SRC, dst=nameless)
    with caplog.at_level(logging.INFO, logger="access"):
        r.finish(1, 1)
    [rec] = [x for x in caplog.records if x.name == "access"]
    f = rec.fields  # type: ignore[attr-defined]
    assert f["dst.workload"] == "db"
    assert "dst.cluster" not in f  # unknown: left out, as ztunnel leaves out a None field


# ---------------------------------------------------------------------------------------------------- byte counters


def test_bytes_are_counted_in_the_series_the_connection_opened_with() -> None:
    """ztunnel takes the byte counters of the connection's labels when it is opened (response_flags "-") and
    adds to them as bytes move; only closed/failed carry the final flag. A connection that ended with CONNECT
    after moving bytes adds them to the "-" series, so sum-by-response_flags panels match ztunnel's."""
    m = Metrics()
    r = _record(m)
    r.opened()  # type: ignore[attr-defined]
    r.finish(100, 200, error="reset mid-stream", flags="CONNECT")  # type: ignore[attr-defined]
    assert sample_value(m, "istio_tcp_received_bytes_total", {"response_flags": "-"}) == 100
    assert sample_value(m, "istio_tcp_sent_bytes_total", {"response_flags": "-"}) == 200
    assert sample_value(m, "istio_tcp_received_bytes_total", {"response_flags": "CONNECT"}) == 0
    assert sample_value(m, "istio_tcp_connections_closed_total", {"response_flags": "CONNECT"}) == 1
    assert sample_value(m, "istio_tcp_connections_failed_total", {"response_flags": "CONNECT"}) == 1


def test_bytes_of_an_open_connection_show_at_every_scrape() -> None:
    """ztunnel's copy loop adds every write to the counters (ConnectionResult::increment_send/recv), so
    rate(istio_tcp_sent_bytes_total[1m]) shows a long-lived connection's traffic while it lasts. Counted only at
    close, an hour-long stream is a flat zero for an hour and then one spike. A relaying connection reports its
    live counts; the counters never go down, and nothing is counted twice at close."""
    m = Metrics()
    r = _record(m)
    r.opened()  # type: ignore[attr-defined]
    moved = [0, 0]
    r.relaying(lambda: (moved[0], moved[1]))  # type: ignore[attr-defined]
    seen = []
    for up, down in ((0, 0), (1_000, 50), (70_000, 900)):
        moved[:] = [up, down]
        seen.append(
            (
                sample_value(m, "istio_tcp_received_bytes_total", {"reporter": "source"}),
                sample_value(m, "istio_tcp_sent_bytes_total", {"reporter": "source"}),
            )
        )
    assert seen == [(0, 0), (1_000, 50), (70_000, 900)]
    moved[:] = [80_000, 1_000]
    r.finish(80_000, 1_000)  # type: ignore[attr-defined]
    moved[:] = [999_999, 999_999]  # the relay is gone: no longer read
    assert sample_value(m, "istio_tcp_received_bytes_total") == 80_000
    assert sample_value(m, "istio_tcp_sent_bytes_total") == 1_000


def test_a_record_closed_without_its_counts_keeps_what_moved() -> None:
    """A connection cut while relaying (cancelled: the agent stops, a policy change) may be finished without
    byte counts; what the relay reported is kept, so the counter does not go back down at close."""
    m = Metrics()
    r = _record(m)
    r.opened()  # type: ignore[attr-defined]
    r.relaying(lambda: (5_000, 300))  # type: ignore[attr-defined]
    assert sample_value(m, "istio_tcp_received_bytes_total") == 5_000
    r.finish(error="cancelled")  # type: ignore[attr-defined]
    assert sample_value(m, "istio_tcp_received_bytes_total") == 5_000
    assert sample_value(m, "istio_tcp_sent_bytes_total") == 300


# ---------------------------------------------------------------------------------------------------- labels


def test_locality_labels_follow_istios_label_set() -> None:
    """Since Istio 1.26 (ztunnel #1441) CommonTrafficLabels end with source_region, source_zone,
    destination_region, destination_zone (locality labels, `unknown` when not set)."""
    assert TRAFFIC_LABELS[-4:] == ("source_region", "source_zone", "destination_region", "destination_zone")
    labels = traffic_labels(reporter="source", src=SRC, dst=DST, service=SVC, mtls=True)
    assert (labels["source_region"], labels["source_zone"]) == ("eu-west1", "eu-west1-b")
    assert (labels["destination_region"], labels["destination_zone"]) == ("unknown", "unknown")


# ---------------------------------------------------------------------------------------------------- process


def test_build_and_descriptor_gauges() -> None:
    """ztunnel exports istio_build{component="ztunnel",tag} (the Istio ztunnel dashboard's "Ztunnel Versions"
    panel sums it by tag) and process_open_fds / process_max_fds (src/metrics/process.rs; the usual
    file-descriptor exhaustion alert divides them)."""
    m = Metrics()
    builds = [s for fam in m.registry.collect() for s in fam.samples if s.name == "istio_build"]
    assert len(builds) == 1 and builds[0].value == 1
    assert builds[0].labels["component"] == "ztunnel" and builds[0].labels["tag"]
    opened = len(os.listdir("/proc/self/fd"))
    assert abs(sample_value(m, "process_open_fds") - opened) <= 2
    assert sample_value(m, "process_max_fds") == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert "# TYPE process_open_fds gauge" in render_text(m.registry)


# ---------------------------------------------------------------------------------------------------- scraping


def test_openmetrics_is_recognised_in_any_case() -> None:
    """Media types are case-insensitive (RFC 9110 8.3.1); ztunnel lowercases the Accept header before matching."""
    assert wants_openmetrics("Application/OpenMetrics-Text; version=1.0.0; q=0.5, text/plain;q=0.1")
    assert not wants_openmetrics("text/plain;version=0.0.4")


async def test_a_big_scrape_lets_the_proxy_run_while_it_renders() -> None:
    """Every series of a workload ever seen stays (ztunnel's families never drop one either): after 10,000 Jobs
    talked through a node, its 80,000 traffic series took 2 s of CPU to render, in one piece on the event loop
    that relays every connection. The scrape hands the loop back between pieces and renders each label set
    once per scrape (Istio's four traffic counters share them)."""
    m = Metrics()
    log = AccessLog(m)
    for i in range(600):
        src = wpb.Workload(uid=f"c//Pod/batch/job-{i}", name=f"job-{i}-x", namespace="batch", workload_name=f"job-{i}")
        r = log.start("inbound", ("10.1.0.5", 1), ("10.2.0.7", 80), src=src, dst=DST, service=SVC)
        r.finish(10, 20)
    async with LoopTurns() as loop:
        before = loop.turns
        body, ctype = await render_async(m.registry, "", lines_per_turn=500)
        assert loop.turns - before >= 4  # 2,400 traffic lines and the rest: the loop ran between pieces
    assert (body, ctype) == render(m.registry, "")
    families = {f.name: f for f in parse_text(body.decode())}
    assert len(families["istio_tcp_connections_closed"].samples) == 600


def test_label_values_follow_a_replaced_workload() -> None:
    """Label values are computed once per proto object: the store replaces a workload's proto when it changes,
    and the replacement's values are the ones used (the cache is checked by object, and bounded)."""
    old = wpb.Workload(uid="u", name="p", namespace="ns", workload_name="web", canonical_revision="v1")
    new = wpb.Workload(uid="u", name="p", namespace="ns", workload_name="web", canonical_revision="v2")
    assert traffic_labels(reporter="source", src=old, dst=None, mtls=False)["source_canonical_revision"] == "v1"
    assert traffic_labels(reporter="source", src=new, dst=None, mtls=False)["source_canonical_revision"] == "v2"
    values = ProtoValues(lambda wl: (wl.name,))
    protos = [wpb.Workload(name=f"w{i}") for i in range(ProtoValues.SIZE + 5)]
    assert [values(p) for p in protos] == [(f"w{i}",) for i in range(ProtoValues.SIZE + 5)]
    assert len(values._entries) <= ProtoValues.SIZE  # cleared when full: old protos are not kept alive
