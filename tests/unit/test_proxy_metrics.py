"""Istio metric names/labels (agent.metrics), the connection record (agent.accesslog) and the HTTP endpoints
(agent.admin) over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from collections.abc import AsyncIterator

import pytest

from agent import rbac
from agent.accesslog import AccessLog
from agent.admin import admin_server, metrics_server, readiness_server
from agent.metrics import TRAFFIC_LABELS, Metrics, sample_value, traffic_labels
from agent.tunnel import TunnelStats
from api.istio.workload import workload_pb2 as wpb
from common.http import HttpServer
from common.spiffe import Identity

SRC = wpb.Workload(
    uid="c//Pod/client/sleep-1",
    name="sleep-1",
    namespace="client",
    workload_name="sleep",
    canonical_name="sleep",
    canonical_revision="v1",
    cluster_id="Kubernetes",
)
DST = wpb.Workload(uid="c//Pod/server/echo-1", name="echo-1", namespace="server", canonical_name="echo")
SVC = wpb.Service(name="echo", namespace="server", hostname="echo.server.svc.cluster.local")
SRC_ID = Identity("cluster.local", "client", "sleep")
DST_ID = Identity("cluster.local", "server", "default")


def test_label_names_and_order_are_istios() -> None:
    labels = traffic_labels(reporter="destination", src=SRC, dst=DST, service=SVC, mtls=True)
    assert tuple(labels) == TRAFFIC_LABELS
    assert TRAFFIC_LABELS[0] == "reporter" and TRAFFIC_LABELS[-5] == "connection_security_policy"


def test_labels_from_workloads() -> None:
    labels = traffic_labels(
        reporter="destination", src=SRC, dst=DST, service=SVC, src_identity=SRC_ID, dst_identity=DST_ID, mtls=True
    )
    assert labels["source_workload"] == "sleep"
    assert labels["source_canonical_service"] == "sleep"
    assert labels["source_canonical_revision"] == "v1"
    assert labels["source_workload_namespace"] == "client"
    assert labels["source_principal"] == "spiffe://cluster.local/ns/client/sa/sleep"
    assert labels["source_app"] == "sleep" and labels["source_version"] == "v1"
    assert labels["source_cluster"] == "Kubernetes"
    assert labels["destination_workload"] == "echo-1"  # no workload_name: the name
    assert labels["destination_canonical_revision"] == "unknown"
    assert labels["destination_service"] == "echo.server.svc.cluster.local"
    assert labels["destination_service_name"] == "echo"
    assert labels["destination_service_namespace"] == "server"
    assert labels["destination_principal"] == "spiffe://cluster.local/ns/server/sa/default"
    assert labels["request_protocol"] == "tcp"
    assert labels["response_flags"] == "-"
    assert labels["connection_security_policy"] == "mutual_tls"


def test_plaintext_reports_only_the_destination_principal() -> None:
    labels = traffic_labels(
        reporter="destination", src=None, dst=DST, src_identity=SRC_ID, dst_identity=DST_ID, mtls=False
    )
    assert labels["source_principal"] == "unknown"  # a plaintext peer proved nothing
    assert labels["destination_principal"] == "spiffe://cluster.local/ns/server/sa/default"  # the workload's
    assert labels["source_workload"] == "unknown"
    assert labels["destination_service"] == "unknown"
    assert labels["connection_security_policy"] == "unknown"


def test_record_counts_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    log = AccessLog(m)
    r = log.start("inbound", ("10.1.0.5", 40000), ("10.2.0.7", 8080), src=SRC, dst=DST, service=SVC)
    r.src_identity, r.dst_identity, r.mtls = SRC_ID, DST_ID, True
    r.decision = rbac.Decision(rbac.Outcome.ALLOWED, "server/allow")
    r.opened()
    assert sample_value(m, "istio_tcp_connections_opened_total", {"reporter": "destination"}) == 1
    assert sample_value(m, "istio_tcp_sockets_open", {"reporter": "destination"}) == 1
    with caplog.at_level(logging.INFO, logger="access"):
        r.finish(1000, 20)
        r.finish(5, 5)  # idempotent
    sel = {"source_workload": "sleep", "destination_workload": "echo-1", "response_flags": "-"}
    assert sample_value(m, "istio_tcp_connections_closed_total", sel) == 1
    assert sample_value(m, "istio_tcp_received_bytes_total", sel) == 1000  # request direction
    assert sample_value(m, "istio_tcp_sent_bytes_total", sel) == 20
    assert sample_value(m, "istio_tcp_sockets_open") == 0
    [rec] = [r for r in caplog.records if r.name == "access"]
    f = rec.fields  # type: ignore[attr-defined]
    assert rec.getMessage() == "connection complete"
    assert f["src.addr"] == "10.1.0.5:40000" and f["dst.addr"] == "10.2.0.7:8080"
    assert f["src.identity"] == str(SRC_ID) and f["dst.workload"] == "echo-1"
    assert f["bytes_sent"] == 20 and f["bytes_recv"] == 1000  # inbound: the pod sent the 20 response bytes
    assert f["policy.decision"] == "allow" and f["policy.name"] == "server/allow"
    assert f["duration"].endswith("ms")


def test_plaintext_line_logs_no_identities_but_the_metric_keeps_the_destination(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As ztunnel: the access log shows identities only for mutual TLS; destination_principal is always set."""
    m = Metrics()
    r = AccessLog(m).start("inbound", ("10.1.0.5", 1), ("10.2.0.7", 80), dst=DST, dst_identity=DST_ID, mtls=False)
    with caplog.at_level(logging.INFO, logger="access"):
        r.finish(3, 4)
    [rec] = [r for r in caplog.records if r.name == "access"]
    assert "dst.identity" not in rec.fields and "src.identity" not in rec.fields  # type: ignore[attr-defined]
    sel = {"destination_principal": str(DST_ID), "connection_security_policy": "unknown"}
    assert sample_value(m, "istio_tcp_connections_closed_total", sel) == 1


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_bytes_sent_is_what_the_reporting_workload_sent(direction: str, caplog: pytest.LogCaptureFixture) -> None:
    """As ztunnel logs them (ConnectionResult::record_internal): `bytes_sent` is what the reporting side's workload
    sent, the request for the source reporter, the response for the destination reporter; the Istio metrics keep
    the request/response convention for both reporters."""
    m = Metrics()
    report = AccessLog(m).start(direction, ("10.1.0.5", 40000), ("10.2.0.7", 8080))
    with caplog.at_level(logging.INFO, logger="access"):
        report.finish(1000, 20)  # 1000 request bytes (client -> server), 20 response bytes
    [rec] = [r for r in caplog.records if r.name == "access"]
    fields = rec.fields  # type: ignore[attr-defined]
    reporter_sent, reporter_received = (1000, 20) if direction == "outbound" else (20, 1000)
    assert (fields["bytes_sent"], fields["bytes_recv"]) == (reporter_sent, reporter_received)
    assert sample_value(m, "istio_tcp_received_bytes_total") == 1000
    assert sample_value(m, "istio_tcp_sent_bytes_total") == 20


def test_denied_record_has_deny_flag(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    r = AccessLog(m).start("inbound", ("10.1.0.5", 1), ("10.2.0.7", 80), dst=DST)
    r.decision = rbac.Decision(rbac.Outcome.EXPLICITLY_DENIED, "server/deny")
    with caplog.at_level(logging.INFO, logger="access"):
        r.finish(error=r.decision.explain(), flags="DENY")
    assert sample_value(m, "istio_tcp_connections_opened_total", {"response_flags": "-"}) == 1
    assert sample_value(m, "istio_tcp_connections_closed_total", {"response_flags": "DENY"}) == 1
    assert sample_value(m, "istio_tcp_connections_failed_total", {"response_flags": "DENY"}) == 1
    [rec] = [r for r in caplog.records if r.name == "access"]
    assert rec.getMessage() == "connection complete" and rec.levelno == logging.ERROR  # ztunnel's access_log!
    assert rec.fields["policy.decision"] == "deny"  # type: ignore[attr-defined]
    assert "server/deny" in rec.fields["error"]  # type: ignore[attr-defined]


def _get(url: str, method: str = "GET", accept: str | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url, method=method, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, HttpServer]]:
    stats = TunnelStats()
    stats.rejects["no_client_cert"] += 2
    stats.errors["keepalive_timeout"] += 1
    m = Metrics(stats)
    m.error("inbound", "bad_authority")
    state = {"ready": False, "quit": 0}

    class Certs:
        def snapshot(self) -> list[dict[str, str]]:
            return [{"identity": str(DST_ID), "state": "Available"}]

    def quit_() -> None:
        state["quit"] += 1

    s = {
        "admin": admin_server(lambda: {"workloads": [], "certificates": Certs().snapshot()}, Certs().snapshot, quit_),
        "metrics": metrics_server(m),
        "ready": readiness_server(lambda: (bool(state["ready"]), "" if state["ready"] else "waiting for config")),
    }
    for srv in s.values():
        await srv.start("127.0.0.1", 0)
    s["admin"].state = state  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        for srv in s.values():
            await srv.close()


async def test_http_endpoints(servers: dict[str, HttpServer]) -> None:
    def url(name: str, path: str) -> str:
        return f"http://127.0.0.1:{servers[name].port}{path}"

    status, ctype, body = await asyncio.to_thread(_get, url("metrics", "/metrics"))
    assert status == 200 and ctype.startswith("text/plain")
    assert 'ambit_hbone_rejects_total{reason="no_client_cert"} 2.0' in body
    assert 'ambit_hbone_errors_total{reason="keepalive_timeout"} 1.0' in body
    assert 'ambit_connection_errors_total{direction="inbound",reason="bad_authority"} 1.0' in body
    status, ctype, body = await asyncio.to_thread(
        _get, url("metrics", "/stats/prometheus"), accept="application/openmetrics-text"
    )
    assert status == 200 and ctype.startswith("application/openmetrics-text") and body.endswith("# EOF\n")

    status, _, body = await asyncio.to_thread(_get, url("ready", "/healthz/ready"))
    assert (status, body.strip()) == (503, "waiting for config")
    servers["admin"].state["ready"] = True  # type: ignore[attr-defined]
    status, _, _ = await asyncio.to_thread(_get, url("ready", "/healthz/ready"))
    assert status == 200

    status, ctype, body = await asyncio.to_thread(_get, url("admin", "/config_dump"))
    assert status == 200 and ctype == "application/json"
    assert json.loads(body)["certificates"][0]["identity"] == str(DST_ID)
    status, _, body = await asyncio.to_thread(_get, url("admin", "/certs"))
    assert json.loads(body)[0]["state"] == "Available"

    status, _, body = await asyncio.to_thread(_get, url("admin", "/logging?agent.test=debug"), "POST")
    assert status == 200 and json.loads(body)["agent.test"] == "debug"
    assert logging.getLogger("agent.test").level == logging.DEBUG
    status, _, _ = await asyncio.to_thread(_get, url("admin", "/logging?level=loud"), "POST")
    assert status == 400

    assert (await asyncio.to_thread(_get, url("admin", "/quitquitquit")))[0] == 405
    assert (await asyncio.to_thread(_get, url("admin", "/quitquitquit"), "POST"))[0] == 200
    await asyncio.sleep(0)
    assert servers["admin"].state["quit"] == 1  # type: ignore[attr-defined]
    assert (await asyncio.to_thread(_get, url("admin", "/nope")))[0] == 404


async def test_http_garbage_is_400_and_server_survives(servers: dict[str, HttpServer]) -> None:
    port = servers["admin"].port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x16\x03\x01 garbage\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 400")
    writer.close()
    status, _, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/certs")
    assert status == 200
