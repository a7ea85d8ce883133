"""Prometheus metrics with Istio's names and labels, so Istio's dashboards and Kiali read Ambit unchanged.

Label names, order and the `unknown` default follow ztunnel's CommonTrafficLabels (reference §6.1). Byte
counters use Istio's convention for both reporters: `received` is what the client sent (request direction),
`sent` what the server returned. Ambit-specific counters (`ambit_*`) count refusals by reason so that bad
input shows up on a dashboard instead of only in a log.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from agent import tunnel
from agent.prometheus import Counter, MetricFamily, Registry, counter_family, gauge_family, render
from agent.tunnel import TunnelStats
from common.spiffe import Identity

UNKNOWN = "unknown"
MUTUAL_TLS = "mutual_tls"

TRAFFIC_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)

# Istio's response flags that make a connection count as failed.
FAILURE_FLAGS = frozenset(
    {"DENY", "CONNECT", "TLS_FAILURE", "H2_HANDSHAKE_FAILURE", "NETWORK_POLICY", "IDENTITY_ERROR"}
)


def _v(value: str | None) -> str:
    return value if value else UNKNOWN


def _workload_values(wl: Any | None) -> tuple[str, str, str, str, str, str, str]:
    """workload, canonical_service, canonical_revision, workload_namespace, app, version, cluster."""
    if wl is None:
        return (UNKNOWN,) * 7
    service, revision = _v(wl.canonical_name), _v(wl.canonical_revision)
    return (
        _v(wl.workload_name or wl.name),
        service,
        revision,
        _v(wl.namespace),
        service,
        revision,
        _v(wl.cluster_id),
    )


def traffic_label_values(
    *,
    reporter: str,
    src: Any | None,
    dst: Any | None,
    service: Any | None = None,
    src_identity: Identity | None = None,
    dst_identity: Identity | None = None,
    mtls: bool,
    response_flags: str = "-",
) -> tuple[str, ...]:
    """Istio's CommonTrafficLabels for one connection, in TRAFFIC_LABELS order. `src`/`dst` are Workload protos,
    `service` a Service. Built straight into a tuple: this runs for every proxied connection.

    The source principal is reported only for mutual TLS (a plaintext peer proved nothing); the destination
    principal is the destination workload's identity whenever it is known, plaintext included, as ztunnel's
    `with_destination` fills it.
    """
    s_wl, s_svc, s_rev, s_ns, s_app, s_ver, s_cluster = _workload_values(src)
    d_wl, d_svc, d_rev, d_ns, d_app, d_ver, d_cluster = _workload_values(dst)
    if service is not None:
        svc_host, svc_ns, svc_name = _v(service.hostname), _v(service.namespace), _v(service.name)
    else:
        svc_host = svc_ns = svc_name = UNKNOWN
    return (
        reporter,
        s_wl,
        s_svc,
        s_rev,
        s_ns,
        str(src_identity) if (mtls and src_identity) else UNKNOWN,
        s_app,
        s_ver,
        s_cluster,
        svc_host,
        svc_ns,
        svc_name,
        d_wl,
        d_svc,
        d_rev,
        d_ns,
        str(dst_identity) if dst_identity else UNKNOWN,
        d_app,
        d_ver,
        d_cluster,
        "tcp",
        response_flags,
        MUTUAL_TLS if mtls else UNKNOWN,
    )


# ztunnel's OnDemandDnsLabels: who needed an endpoint hostname resolved, and which.
ON_DEMAND_DNS_LABELS: tuple[str, ...] = (*TRAFFIC_LABELS[1:9], "hostname")


def traffic_labels(**kwargs: Any) -> dict[str, str]:
    """traffic_label_values as a name -> value mapping."""
    return dict(zip(TRAFFIC_LABELS, traffic_label_values(**kwargs), strict=True))


REPORTER = TRAFFIC_LABELS.index("reporter")
RESPONSE_FLAGS = TRAFFIC_LABELS.index("response_flags")


class _TrafficCollector:
    """Istio's per-connection series as plain dicts, rendered at scrape time.

    Four counters and a gauge move on every proxied connection: a dict increment each, with the label tuple
    the connection already holds, instead of a labelled child looked up per update.
    """

    FAMILIES = (
        ("istio_tcp_connections_opened", "TCP connections opened"),
        ("istio_tcp_connections_closed", "TCP connections closed"),
        ("istio_tcp_received_bytes", "Bytes sent by the client (request direction)"),
        ("istio_tcp_sent_bytes", "Bytes returned by the server (response direction)"),
        ("istio_tcp_connections_failed", "TCP connections that failed (response_flags)"),
    )

    def __init__(self) -> None:
        self.opened: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.closed: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.received: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.sent: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.failed: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.sockets_open: collections.Counter[str] = collections.Counter()

    def collect(self) -> Iterator[MetricFamily]:
        tables = (self.opened, self.closed, self.received, self.sent, self.failed)
        for (name, doc), table in zip(self.FAMILIES, tables, strict=True):
            fam = counter_family(name, doc, labels=TRAFFIC_LABELS)
            for labels, value in list(table.items()):
                fam.add_metric(labels, value)
            yield fam
        gauge = gauge_family("istio_tcp_sockets_open", "Proxied TCP connections open now", labels=["reporter"])
        for reporter, value in sorted(self.sockets_open.items()):
            gauge.add_metric([reporter], value)
        yield gauge


class _TunnelStatsCollector:
    """Reads HBONE's counters at scrape time, so the tunnel code keeps plain integers on its hot path."""

    def __init__(self, stats: TunnelStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[MetricFamily]:
        s = self._stats
        rejects = counter_family(
            "ambit_hbone_rejects", "HBONE connections or streams refused or reset, by reason", labels=["reason"]
        )
        for reason, n in sorted(s.rejects.items()):
            rejects.add_metric([reason], n)
        yield rejects
        errors = counter_family(
            "ambit_hbone_errors", "HBONE connections that failed after being established, by reason", labels=["reason"]
        )
        for reason, n in sorted(s.errors.items()):
            errors.add_metric([reason], n)
        yield errors
        yield counter_family(
            "ambit_hbone_connections_opened", "HBONE (TLS) connections opened", value=s.connections_opened
        )
        yield counter_family(
            "ambit_hbone_connections_closed", "HBONE (TLS) connections closed", value=s.connections_closed
        )
        yield counter_family("ambit_hbone_streams_opened", "HBONE CONNECT streams opened", value=s.streams_opened)
        yield gauge_family(
            "ambit_hbone_streams_active", "HBONE CONNECT streams open now", value=s.streams_opened - s.streams_closed
        )
        yield gauge_family(
            "ambit_relay_buffered_bytes",
            "Memory that relays keep for TCP peers that did not take what arrived over HBONE yet",
            value=tunnel.BUFFERS.total,
        )
        yield counter_family(
            "ambit_relay_buffer_budget_exceeded",
            "Times the relays kept more than their budget and connections keeping bytes held their HBONE credit",
            value=tunnel.BUFFERS.exceeded,
        )


class Metrics:
    """The agent's registry; one instance per agent (tests make their own)."""

    def __init__(self, tunnel_stats: TunnelStats | None = None) -> None:
        self.registry = Registry()
        r = self.registry
        self.traffic = _TrafficCollector()
        r.register(self.traffic)
        self.errors = Counter(
            "ambit_connection_errors",
            "Connections refused, denied or closed early by the agent, by listener and reason",
            ["direction", "reason"],
            registry=r,
        )
        self.on_demand_dns = Counter(
            "istio_on_demand_dns",
            "The total number of requests that used on-demand DNS (unstable)",
            ON_DEMAND_DNS_LABELS,
            registry=r,
        )
        if tunnel_stats is not None:
            r.register(_TunnelStatsCollector(tunnel_stats))

    def connection_opened(self, labels: tuple[str, ...]) -> None:
        """`labels` as traffic_label_values returns them."""
        t = self.traffic
        t.opened[labels] += 1
        t.sockets_open[labels[REPORTER]] += 1

    def connection_closed(self, labels: tuple[str, ...], bytes_up: int, bytes_down: int) -> None:
        """`labels` as at close (final response_flags); bytes_up = client->server, bytes_down = server->client."""
        t = self.traffic
        t.closed[labels] += 1
        t.sockets_open[labels[REPORTER]] -= 1
        if labels[RESPONSE_FLAGS] in FAILURE_FLAGS:
            t.failed[labels] += 1
        if bytes_up:
            t.received[labels] += bytes_up
        if bytes_down:
            t.sent[labels] += bytes_down

    def error(self, direction: str, reason: str) -> None:
        self.errors.labels(direction, reason).inc()

    def on_demand_dns_requested(self, src: Any, src_identity: Identity | None, hostname: str) -> None:
        """A connection from `src` picked an endpoint known only by `hostname` (counted whether or not the answer
        was cached, as ztunnel counts it)."""
        wl, svc, rev, ns, app, ver, cluster = _workload_values(src)
        principal = str(src_identity) if src_identity else UNKNOWN
        self.on_demand_dns.labels(wl, svc, rev, ns, principal, app, ver, cluster, _v(hostname)).inc()

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """Prometheus text (or OpenMetrics when the scraper asks for it) and its content type."""
        return render(self.registry, accept or "")


def sample_value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of `name` whose labels include `labels` (for tests and ambitctl summaries)."""
    total = 0.0
    for fam in metrics.registry.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                total += s.value
    return total
