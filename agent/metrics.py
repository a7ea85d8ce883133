"""Prometheus metrics with Istio's names and labels, so Istio's dashboards and Kiali read Ambit unchanged.

Label names, order and the `unknown` default follow ztunnel's CommonTrafficLabels (reference §6.1). Byte
counters use Istio's convention for both reporters: `received` is what the client sent (request direction),
`sent` what the server returned. Ambit-specific counters (`ambit_*`) count refusals by reason so that bad
input shows up on a dashboard instead of only in a log.
"""

from __future__ import annotations

import collections
import os
import resource
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from agent import tunnel
from agent.prometheus import Counter, Gauge, MetricFamily, Registry, counter_family, gauge_family, render_async
from agent.tunnel import ConnectStage, TunnelStats
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
    # ztunnel's LocalityLabels (Istio 1.26+), flattened after the rest; present once a workload is known, which
    # every record here has.
    "source_region",
    "source_zone",
    "destination_region",
    "destination_zone",
)

# Istio's response flags that make a connection count as failed.
FAILURE_FLAGS = frozenset(
    {"DENY", "CONNECT", "TLS_FAILURE", "H2_HANDSHAKE_FAILURE", "NETWORK_POLICY", "IDENTITY_ERROR"}
)

# The source's flag for a tunnel that could not be opened, as ztunnel's extract_failure_reason (src/proxy/metrics.rs)
# maps the proxy::Error its pool and h2 client raise for each stage: only MaybeHBONENetworkPolicyError, Http2Handshake
# and H2 have flags of their own; HttpStatus (a 401 included: DENY is the destination's) and Io (the TLS connector's
# failures too, tokio-rustls' io::Error becoming Error::Io, not Error::Tls) fall through to CONNECT.
CONNECT_FAILURE_FLAGS: dict[ConnectStage, str] = {
    ConnectStage.POOL: "CONNECT",
    ConnectStage.TCP: "CONNECT",
    ConnectStage.TCP_TIMEOUT: "NETWORK_POLICY",
    ConnectStage.TLS: "CONNECT",
    ConnectStage.HTTP2: "H2_HANDSHAKE_FAILURE",
    ConnectStage.RESPONSE: "CONNECT",
}


def _v(value: str | None) -> str:
    return value if value else UNKNOWN


_UNKNOWN_WORKLOAD = (UNKNOWN,) * 9
_UNKNOWN_SERVICE = (UNKNOWN,) * 3


V = TypeVar("V")


class ProtoValues(Generic[V]):
    """Values derived from a workload or service proto, computed once per proto object.

    An attribute of a (upb) proto costs 0.15-0.3 us to read, and the nine label values a workload gives were most
    of a connection's label cost. Keyed by the object, whose identity is checked (the store replaces a proto when
    it changes, never edits it); an entry keeps its proto alive, so the id is not reused while cached. Cleared
    when full: a miss only recomputes. SIZE bounds what replaced protos it keeps alive (~3 KB each: 3 MB at
    most). The values' strings are shared by every series of the workload.
    """

    SIZE = 1024

    def __init__(self, compute: Callable[[Any], V]) -> None:
        self._compute = compute
        self._entries: dict[int, tuple[Any, V]] = {}

    def __call__(self, proto: Any) -> V:
        hit = self._entries.get(id(proto))
        if hit is not None and hit[0] is proto:
            return hit[1]
        values = self._compute(proto)
        if len(self._entries) >= self.SIZE:
            self._entries.clear()
        self._entries[id(proto)] = (proto, values)
        return values


def workload_key(wl: Any) -> tuple[str, str]:
    """The workload's name and namespace as its series' labels carry them (source_ or destination_workload and
    _workload_namespace)."""
    return _v(wl.workload_name or wl.name), _v(wl.namespace)


def _compute_workload(wl: Any) -> tuple[str, ...]:
    service, revision = _v(wl.canonical_name), _v(wl.canonical_revision)
    locality = wl.locality
    name, namespace = workload_key(wl)
    return (
        name,
        service,
        revision,
        namespace,
        service,
        revision,
        _v(wl.cluster_id),
        _v(locality.region),
        _v(locality.zone),
    )


def service_label_values(svc: Any) -> tuple[str, str, str]:
    """The service's destination_service, destination_service_namespace and destination_service_name, as its
    series' labels carry them."""
    return (_v(svc.hostname), _v(svc.namespace), _v(svc.name))


_workload_labels = ProtoValues(_compute_workload)
_service_labels = ProtoValues(service_label_values)


def _workload_values(wl: Any | None) -> tuple[str, ...]:
    """workload, canonical_service, canonical_revision, workload_namespace, app, version, cluster, region, zone."""
    return _UNKNOWN_WORKLOAD if wl is None else _workload_labels(wl)


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
    s_wl, s_svc, s_rev, s_ns, s_app, s_ver, s_cluster, s_region, s_zone = _workload_values(src)
    d_wl, d_svc, d_rev, d_ns, d_app, d_ver, d_cluster, d_region, d_zone = _workload_values(dst)
    svc_host, svc_ns, svc_name = _UNKNOWN_SERVICE if service is None else _service_labels(service)
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
        s_region,
        s_zone,
        d_region,
        d_zone,
    )


# ztunnel's OnDemandDnsLabels: who needed an endpoint hostname resolved, and which.
ON_DEMAND_DNS_LABELS: tuple[str, ...] = (*TRAFFIC_LABELS[1:9], "hostname")


def traffic_labels(**kwargs: Any) -> dict[str, str]:
    """traffic_label_values as a name -> value mapping."""
    return dict(zip(TRAFFIC_LABELS, traffic_label_values(**kwargs), strict=True))


REPORTER = TRAFFIC_LABELS.index("reporter")
RESPONSE_FLAGS = TRAFFIC_LABELS.index("response_flags")


Progress = Callable[[], tuple[int, int]]
"""A relay's live byte counts: (client -> server, server -> client)."""


class _TrafficCollector:
    """Istio's per-connection series as plain dicts, rendered at scrape time.

    Four counters and a gauge move on every proxied connection: a dict increment each, with the label tuple
    the connection already holds, instead of a labelled child looked up per update. Bytes of connections still
    relaying are read from their relays at scrape time, so the data path never touches a counter.
    """

    FAMILIES = (  # ztunnel's help texts
        ("istio_tcp_connections_opened", "The total number of TCP connections opened"),
        ("istio_tcp_connections_closed", "The total number of TCP connections closed"),
        ("istio_tcp_received_bytes", "The size of total bytes received during request in case of a TCP connection"),
        ("istio_tcp_sent_bytes", "The size of total bytes sent during response in case of a TCP connection"),
        ("istio_tcp_connections_failed", "The total number of TCP connections that failed to establish (unstable)"),
    )

    def __init__(self) -> None:
        self.opened: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.closed: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.received: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.sent: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.failed: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.sockets_open: collections.Counter[str] = collections.Counter()
        # Relaying connections: (labels, their live client->server and server->client counts), by record.
        self.live: dict[object, tuple[tuple[str, ...], Progress]] = {}

    def collect(self) -> Iterator[MetricFamily]:
        received, sent = self.received, self.sent
        if self.live:
            # Open connections' bytes on top of the closed ones', read now: the counters move while a
            # connection lasts, as ztunnel's do (it adds every write), instead of jumping at its close.
            received, sent = received.copy(), sent.copy()
            for labels, progress in list(self.live.values()):
                up, down = progress()
                received[labels] += up
                sent[labels] += down
        tables = (self.opened, self.closed, received, sent, self.failed)
        for (name, doc), table in zip(self.FAMILIES, tables, strict=True):
            fam = counter_family(name, doc, labels=TRAFFIC_LABELS)
            for labels, value in list(table.items()):
                fam.add_metric(labels, value)
            yield fam
        gauge = gauge_family(
            "istio_tcp_sockets_open", "The current number of open TCP sockets (unstable)", labels=["reporter"]
        )
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


def build_tag() -> str:
    """The installed package's version, from its metadata file: importlib.metadata would load the email parser,
    csv and zipfile (0.7 MB of RSS on every node) for one label."""
    for entry in sys.path:
        for meta in Path(entry or ".").glob("ambit-*.dist-info/METADATA"):
            with meta.open(encoding="utf-8") as lines:
                for line in lines:
                    if line.startswith("Version:"):
                        return line.split(":", 1)[1].strip()
    return UNKNOWN


class _ProcessCollector:
    """ztunnel's process figures (src/metrics/process.rs), which fd-exhaustion alerts divide: a proxy holds two
    descriptors per relayed connection, and running out refuses every new one."""

    def collect(self) -> Iterator[MetricFamily]:
        try:
            open_fds = len(os.listdir("/proc/self/fd")) - 1  # less the one listing the directory
        except OSError:
            open_fds = None
        if open_fds is not None:
            yield gauge_family("process_open_fds", "Number of open file descriptors", value=open_fds)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        yield gauge_family("process_max_fds", "Maximum number of file descriptors", value=soft)


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
        # As ztunnel (src/metrics/meta.rs): the Istio ztunnel dashboard's versions panel sums it by tag.
        Gauge("istio_build", "Istio component build info", ["component", "tag"], registry=r).labels(
            "ztunnel", build_tag()
        ).set(1)
        r.register(_ProcessCollector())
        if tunnel_stats is not None:
            r.register(_TunnelStatsCollector(tunnel_stats))

    def open_connections(self) -> int:
        """Proxied connections counted open and not yet closed (both reporters: istio_tcp_sockets_open)."""
        return sum(self.traffic.sockets_open.values())

    def connection_opened(self, labels: tuple[str, ...]) -> None:
        """`labels` as traffic_label_values returns them."""
        t = self.traffic
        t.opened[labels] += 1
        t.sockets_open[labels[REPORTER]] += 1

    def connection_closed(self, labels: tuple[str, ...], bytes_up: int, bytes_down: int, flags: str = "-") -> None:
        """`labels` as the connection was opened with; bytes_up = client->server, bytes_down = server->client.

        As ztunnel: the bytes go to the series the connection was opened with (it takes those counters when
        the connection starts and adds to them as bytes move), while closed and failed carry the final
        response flag. Both byte series are kept, at 0 when nothing moved that way: ztunnel's exist from the
        connection's open (get_or_create), and one that showed at 0 while the connection relayed must not leave the
        scrape at its close."""
        t = self.traffic
        t.received[labels] += bytes_up
        t.sent[labels] += bytes_down
        t.sockets_open[labels[REPORTER]] -= 1
        if flags != labels[RESPONSE_FLAGS]:
            labels = (*labels[:RESPONSE_FLAGS], flags, *labels[RESPONSE_FLAGS + 1 :])
            if flags in FAILURE_FLAGS:
                t.failed[labels] += 1
        t.closed[labels] += 1

    def relaying(self, key: object, labels: tuple[str, ...], progress: Progress) -> None:
        """Add `progress`'s counts to `labels`' byte counters at every scrape until `relay_ended(key)`."""
        self.traffic.live[key] = (labels, progress)

    def relay_ended(self, key: object) -> None:
        self.traffic.live.pop(key, None)

    def error(self, direction: str, reason: str) -> None:
        self.errors.labels(direction, reason).inc()

    def on_demand_dns_requested(self, src: Any, src_identity: Identity | None, hostname: str) -> None:
        """A connection from `src` picked an endpoint known only by `hostname` (counted whether or not the answer
        was cached, as ztunnel counts it)."""
        wl, svc, rev, ns, app, ver, cluster, _, _ = _workload_values(src)
        principal = str(src_identity) if src_identity else UNKNOWN
        self.on_demand_dns.labels(wl, svc, rev, ns, principal, app, ver, cluster, _v(hostname)).inc()

    async def render(self, accept: str | None = None, gzip: bool = False) -> tuple[bytes, str]:
        """Prometheus text (or OpenMetrics when the scraper asks for it), gzipped if asked, and its content type,
        handing the event loop back while a large scrape renders."""
        return await render_async(self.registry, accept or "", gzip=gzip)


def sample_value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of `name` whose labels include `labels` (for tests and ambitctl summaries)."""
    total = 0.0
    for fam in metrics.registry.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                total += s.value
    return total
