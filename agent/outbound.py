"""Outbound (15001): connections captured from enrolled pods, sent on through HBONE, the same-node fast path
or plain passthrough.

The routing decision (`route`) is a pure function of the store (and of which addresses are this node's), so every
case is a table test. Order as in ztunnel's `build_request`: refuse the agent's own ports on this node's
addresses, where a plain connection would land on the agent's listeners (ztunnel: on loopback; a pod outside the
mesh or an outside server that really serves on 15001 stays reachable); a service VIP in PASSTHROUGH mode goes to
the VIP as plain TCP, any other VIP is load-balanced as ztunnel's `load_balance` (healthy endpoints, or all with
health policy ALLOW_ALL, of this network, ranked by locality in STRICT/FAILOVER mode, weighted by capacity), each
at its target port for the service port (a port the service does not declare has no upstream) and at an address of
the client's family where the service's ip_families allow; otherwise an IP that a workload of this network owns is
that workload. An HBONE workload is reached at `podIP:15008` with `:authority podIP:targetPort`, or, when both
ends are enrolled pods on this node, spliced through the kernel after the same checks the destination agent would
make; a destination outside the mesh gets plain TCP. Each leaves from the client pod's own address, as ztunnel's
sockets inside the pod do (see `_passthrough` for where it cannot). Waypoints are not routed to yet: `route` is where
that decision goes.

An endpoint known only by hostname (a ServiceEntry with `resolution: DNS`) is routed like any other, with its
hostname where the address goes (`Route.hostname`); the proxy resolves it when the connection arrives
(agent/ondemand_dns.py, as ztunnel's on-demand DNS) and `resolved` puts the address in, applying the checks
`route` makes on addresses. `route` itself stays a pure function of the store.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from agent import rbac
from agent.accesslog import AccessLog, ConnectionReport
from agent.addressing import (
    AGENT_PORTS,
    HBONE,
    HEALTHY,
    HOST_NETWORK,
    LB_ALLOW_ALL,
    LB_FAILOVER,
    LB_PASSTHROUGH,
    LB_STRICT,
    Address,
    destination_service,
    endpoint_address,
    format_address,
    ip_text,
    is_pod,
    service_sans,
    service_target_port,
    socket_address,
    without_zone,
    workload_baggage,
    workload_identity,
)
from agent.connections import ConnectionRegistry
from agent.identity import CertificateUnavailable
from agent.inpod import InPodConnector
from agent.metrics import CONNECT_FAILURE_FLAGS, Metrics
from agent.ondemand_dns import OnDemandResolver, ResolutionError
from agent.pool import HboneConnectionPool, PoolKey
from agent.relay import SpliceRelay
from agent.sockets import (
    abort,
    canonical_ip,
    connect_upstream,
    destination_before_nat,
    peer_or_close,
    read_waiting,
)
from agent.state import WorkloadStore, service_key
from agent.tunnel import HboneConnectError, relay, ungraceful
from common.log import kv
from common.spiffe import Identity

log = logging.getLogger("agent.outbound")
# HBONE: up to this many bytes the client has already written go out with the CONNECT, in the same TLS write, so
# they do not wait a round trip for the 200 (HboneClientConnection.open_stream). One default-size DATA frame.
EARLY_DATA = 16384
MAX_EARLY_DATA = 65536


# ambit_connection_errors{reason="hbone_<status>"}: the statuses an HBONE peer answers (ztunnel: 400, 401, 503; a
# waypoint's Envoy also 403, 404 and 5xx); any other of the 900 a peer could send shares one label.
_STATUS_REASONS = {status: f"hbone_{status}" for status in (400, 401, 403, 404, 500, 502, 503, 504)}


def connect_error_reason(e: HboneConnectError) -> str:
    return _STATUS_REASONS.get(e.status, "hbone_other")


def _is_loopback(ip: str) -> bool:
    """127/8, ::1, the unspecified addresses (which connect to this host) and their IPv4-mapped forms."""
    ip = canonical_ip(ip)
    return ip.startswith("127.") or ip in ("::1", "0.0.0.0", "::")


def is_node_address(ip: str) -> bool:
    """Whether a plain connection to `ip` from the agent would stay on this node (its loopback, unspecified or
    interface addresses), where the agent's own transparent listeners would take it. The kernel answers: a plain
    socket (no IP_FREEBIND/IP_TRANSPARENT) binds only to a local address. Anything but EADDRNOTAVAIL counts as
    local, so a doubt refuses; with net.ipv4.ip_nonlocal_bind=1 every address does. A link-local address with a
    zone (`fe80::1%3`) is asked on that interface: it is this node's only if that link has it."""
    if _is_loopback(ip):
        return True
    ip = canonical_ip(ip)
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(socket_address((ip, 0)))
        except OSError as e:
            return e.errno != errno.EADDRNOTAVAIL
    return True


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    hbone_port: int = 15008
    # Refused on this node's addresses (a loop into the agent) and, on the same-node path, as a pod's target port
    # (what the destination's inbound refuses); elsewhere they are ports like any other.
    own_ports: frozenset[int] = AGENT_PORTS
    is_node_address: Callable[[str], bool] = is_node_address
    same_node_fast_path: bool = True
    # Connect from the client pod's IP: HBONE, the same-node fast path, and passthrough to a pod
    keep_source_address: bool = True
    # The node's nftables table brings back the replies of a connection the agent made from a pod's address after
    # NAT rewrote them (capture_dnat's reply rule: a masqueraded egress, a destination behind a DNAT): passthrough
    # then keeps the pod's address for every destination but this node's own.
    nat_replies_steered: bool = False
    # Passthrough and same-node connects: ztunnel's CONNECTION_TIMEOUT (src/proxy.rs freebind_connect). A SYN lost
    # three times is answered at the kernel's third retransmission, 7 s after the first.
    connect_timeout: float = 10.0
    early_data: int = EARLY_DATA
    # An endpoint at a loopback address would be the node's own loopback here, not a pod's (ztunnel connects from
    # the pod's network namespace): its local services and the agent's admin port. Only test harnesses whose pods
    # live on 127.x.y.z turn this on.
    loopback_upstreams: bool = False


class RouteKind(enum.Enum):
    HBONE = "hbone"
    SAME_NODE = "same_node"
    PASSTHROUGH = "passthrough"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    target: Address | None = None  # where to connect
    authority: Address | None = None  # HBONE :authority and policy destination (podIP:targetPort)
    workload: Any | None = None  # destination Workload
    service: Any | None = None  # destination Service when addressed by VIP
    reason: str = ""  # REJECT: why (counted as ambit_connection_errors{reason})
    # The endpoint's hostname when it has no address to use: target and authority then carry it in place of the
    # address, until the proxy resolves it (`resolved`).
    hostname: str = ""


def route(
    store: WorkloadStore,
    node: str,
    src: Any,
    dst: Address,
    config: OutboundConfig = OutboundConfig(),
    rng: random.Random | None = None,
) -> Route:
    """Where a connection from workload `src` to original destination `dst` goes."""
    ip, port = dst
    # ztunnel refuses its illegal ports on loopback only: its listeners live in the pod's netns. Ours live in the
    # node's, so a connection to any of the node's addresses would reach them.
    if port in config.own_ports and config.is_node_address(ip):
        return Route(RouteKind.REJECT, reason="self_call")
    # The client's namespace picks among services sharing the VIP, and hides other namespaces' NAMESPACE-visible
    # ones (the VIP is then no service to it); the client's network scopes the VIP, as ztunnel's lookup.
    svc = store.service_by_vip(ip, src.namespace, src.network)
    wl: Any | None
    if svc is not None:
        if svc.load_balancing.mode == LB_PASSTHROUGH:  # no endpoint selection: the original destination, plain TCP
            return _loopback_refusal(ip, None, svc, config) or Route(RouteKind.PASSTHROUGH, target=dst, service=svc)
        picked = _pick_endpoint(store, src, svc, dst, rng or random)
        if picked is None:
            return Route(RouteKind.REJECT, service=svc, reason="no_healthy_upstream")
        wl, ip, port = picked
        if not ip:  # known by hostname only: resolved per connection, by the proxy (see `resolved`)
            return _endpoint_route(node, src, wl, svc, wl.hostname, port, config, by_name=True)
    else:
        wl = store.workload_by_ip(ip)
        # As ztunnel's lookup by network/IP: a workload of another network does not own this address here.
        if wl is None or wl.network != src.network:
            # A pod's own loopback never leaves its netns: a captured connection to one was forged (a hand-written
            # SYN on a node with route_localnet=1), and passed through from here it would reach the node's local
            # services as the node itself (the listener drops those from non-loopback clients: defence in depth).
            return _loopback_refusal(ip, None, None, config) or Route(RouteKind.PASSTHROUGH, target=dst)
    return _loopback_refusal(ip, wl, svc, config) or _endpoint_route(node, src, wl, svc, ip, port, config)


def _loopback_refusal(ip: str, wl: Any, svc: Any | None, config: OutboundConfig) -> Route | None:
    """An endpoint at a loopback address is the node's own loopback here (see OutboundConfig.loopback_upstreams)."""
    if not config.loopback_upstreams and _is_loopback(ip):
        return Route(RouteKind.REJECT, workload=wl, service=svc, reason="loopback_upstream")
    return None


def _endpoint_route(
    node: str, src: Any, wl: Any, svc: Any | None, host: str, port: int, config: OutboundConfig, by_name: bool = False
) -> Route:
    """How to reach workload `wl` at `host`:`port` (`by_name`: `host` is its hostname, to be resolved)."""
    hostname = host if by_name else ""
    # Waypoint routing goes here (wl.waypoint / svc.waypoint); out of scope for now.
    if wl.tunnel_protocol != HBONE:
        # An endpoint picked behind a VIP may sit on this node's address (a host-network pod): dialled at one of
        # the agent's ports it is the agent's own listener, refused as for a dialled address (and in `resolved`).
        if not by_name and port in config.own_ports and config.is_node_address(host):
            return Route(RouteKind.REJECT, workload=wl, service=svc, reason="self_call")
        return Route(RouteKind.PASSTHROUGH, target=(host, port), workload=wl, service=svc, hostname=hostname)
    if config.same_node_fast_path and wl.node == node and src.node == node and src.tunnel_protocol == HBONE:
        if port in config.own_ports:  # what the destination agent's inbound would refuse (a VIP's target port)
            return Route(RouteKind.REJECT, workload=wl, service=svc, reason="self_call")
        return Route(
            RouteKind.SAME_NODE,
            target=(host, port),
            authority=(host, port),
            workload=wl,
            service=svc,
            hostname=hostname,
        )
    return Route(
        RouteKind.HBONE,
        target=(host, config.hbone_port),
        authority=(host, port),
        workload=wl,
        service=svc,
        hostname=hostname,
    )


def resolved(r: Route, ip: str, config: OutboundConfig = OutboundConfig()) -> Route:
    """Route `r`, made for an endpoint known by hostname, with the address that name resolved to in place of it;
    refused where `route` would refuse that address: a loopback upstream, or (connecting to it directly) one of
    this node's addresses at one of the agent's own ports. An IPv6 link-local address keeps its zone
    (`fe80::1%3`) where the agent connects (`target`: without it the connect fails or leaves by the wrong
    interface), not in `authority`: the zone is this node's interface index, meaningless to the peer and to
    policy."""
    assert r.hostname and r.target is not None
    bare = without_zone(ip)
    if refused := _loopback_refusal(bare, r.workload, r.service, config):
        return refused
    if r.kind is RouteKind.PASSTHROUGH and r.target[1] in config.own_ports and config.is_node_address(ip):
        return Route(RouteKind.REJECT, workload=r.workload, service=r.service, reason="self_call")
    authority = None if r.authority is None else (bare, r.authority[1])
    return replace(r, target=(ip, r.target[1]), authority=authority, hostname="")


_Candidate = tuple[Any, str, int]  # endpoint workload, address ("": resolve its hostname), target port


def _pick_endpoint(
    store: WorkloadStore,
    src: Any,
    svc: Any,
    dst: Address,
    rng: Any,  # random.Random, or the module
) -> _Candidate | None:
    """The endpoint, its address ("" for one to reach by hostname) and target port for a connection from `src`
    to `svc`'s VIP `dst`; None when none can take it. The candidates are worked out once per store version (see
    :func:`_candidates`): a service with 100 endpoints cost ~340 us per connection when they were filtered for
    each one."""
    lb = svc.load_balancing
    want_v6 = ":" in dst[0]
    key: tuple[Any, ...] = (id(svc), dst[1], want_v6, src.network)
    if lb.mode == LB_STRICT or lb.mode == LB_FAILOVER:
        loc = src.locality
        key += (loc.region, loc.zone, loc.subzone, src.node, src.cluster_id)
    candidates, weights = store.memoized_for_service(
        service_key(svc), key, lambda: _candidates(store, src, svc, dst[1], want_v6)
    )
    if not candidates:
        return None
    return rng.choice(candidates) if weights is None else rng.choices(candidates, weights)[0]


def _candidates(
    store: WorkloadStore, src: Any, svc: Any, port: int, want_v6: bool
) -> tuple[list[_Candidate], list[int] | None]:
    """The endpoints of `svc` a client like `src` may be sent to on service port `port`, with their weights (None:
    all equal). As ztunnel's load_balance: a port the service does not declare has no upstream; an endpoint serves
    the port it maps itself, else the service's numeric target port (0 = named: an endpoint that does not map it
    cannot serve it); healthy endpoints only unless the health policy is ALLOW_ALL; locality ranking in STRICT and
    FAILOVER modes; weights are capacities, and capacity 0 is never picked."""
    svc_target = service_target_port(svc, port)
    if svc_target is None:
        return [], None
    lb = svc.load_balancing
    any_health = lb.health_policy == LB_ALLOW_ALL
    candidates: list[_Candidate] = []
    weights: list[int] | None = None  # only once some endpoint has a capacity other than the default 1
    for w, ep_target in store.endpoints(svc, port):
        target = ep_target or svc_target
        # Another network is reachable only through an east-west gateway (double HBONE), which Ambit does not
        # do: such an endpoint would be a blackhole.
        if not target or not (any_health or w.status == HEALTHY) or w.network != src.network:
            continue
        addr = endpoint_address(w, want_v6, svc.ip_families)
        if addr is None and not w.hostname:  # with a hostname (and no usable address) it is resolved on use
            continue
        weight = w.capacity.value if w.HasField("capacity") else 1
        if weight != 1 and weights is None:
            weights = [1] * len(candidates)
        if weights is not None:
            weights.append(weight)
        candidates.append((w, "" if addr is None else ip_text(addr), target))
    if candidates and (lb.mode == LB_STRICT or lb.mode == LB_FAILOVER):
        candidates, weights = _closest(src, lb, candidates, weights)
    if weights is not None:  # capacity 0 is never picked (after ranking, as ztunnel's choose_weighted)
        candidates = [c for c, weight in zip(candidates, weights, strict=True) if weight]
        weights = [weight for weight in weights if weight]
    return candidates, weights


def _closest(
    src: Any, lb: Any, candidates: list[_Candidate], weights: list[int] | None
) -> tuple[list[_Candidate], list[int] | None]:
    """ztunnel's locality ranking for STRICT and FAILOVER: an endpoint's rank is how many of the service's
    routing preferences it shares with the source, counted in order up to the first mismatch (a leading NETWORK
    preference counts as all of them when it matches, and is skipped when it does not); STRICT keeps only
    endpoints matching every preference, and the best rank wins."""
    prefs = list(lb.routing_preference)
    network_first = bool(prefs) and prefs[0] == _NETWORK
    best = -1
    ranked: list[tuple[int, int]] = []  # (rank, index)
    for i, (w, _, _) in enumerate(candidates):
        rank = adjust = 0
        for scope in prefs:
            if scope == _NETWORK:
                match = src.network == w.network
                if network_first:
                    if not match:
                        continue
                    adjust = len(prefs) - 1
            else:
                match = _SCOPES[scope](src, w) if scope in _SCOPES else False
            if not match:
                break
            rank += 1
        if lb.mode == LB_STRICT and rank != len(prefs):
            continue
        rank += adjust
        ranked.append((rank, i))
        best = max(best, rank)
    keep = [i for rank, i in ranked if rank == best]
    return [candidates[i] for i in keep], None if weights is None else [weights[i] for i in keep]


_NETWORK = 6  # istio.workload.LoadBalancing.Scope.NETWORK
_SCOPES = {  # the other istio.workload.LoadBalancing.Scope values
    1: lambda a, b: a.locality.region == b.locality.region,
    2: lambda a, b: a.locality.zone == b.locality.zone,
    3: lambda a, b: a.locality.subzone == b.locality.subzone,
    4: lambda a, b: a.node == b.node,
    5: lambda a, b: a.cluster_id == b.cluster_id,
}


def accepted_sans(store: WorkloadStore, svc: Any | None) -> frozenset[Identity]:
    """What an endpoint reached through `svc` may prove besides its own identity: the service's
    `subject_alt_names` (ztunnel's upstream_sans), parsed once per store version; SANs that are no SPIFFE ID are
    ignored, with a warning, as in ztunnel."""
    if svc is None or not svc.subject_alt_names:
        return frozenset()

    def parse() -> frozenset[Identity]:
        found, invalid = service_sans(svc)
        if invalid:
            log.warning(
                "ignoring subject_alt_names that are no SPIFFE ID", extra=kv(service=svc.hostname, sans=invalid)
            )
        return found

    return store.memoized_for_service(service_key(svc), ("sans", id(svc)), parse)


def traceparent() -> str:
    """A W3C traceparent, random per connection: it traces connections, not requests."""
    # Not `secrets`: two getrandom(2) calls per connection for ids that only need to be unique; zero is invalid.
    return f"00-{random.getrandbits(128) or 1:032x}-{random.getrandbits(64) or 1:016x}-00"


def hbone_headers(client: Address, bag: str, service: Any | None = None) -> list[tuple[str, str]]:
    """`forwarded` (with `host=` when a service was addressed, so the destination can report it), a fresh
    `traceparent`, and the source's `baggage` (`bag`, as :func:`workload_baggage` keeps it)."""
    forwarded = f'for="{format_address(client)}"'
    if service is not None:
        forwarded += f";host={service.hostname}"
    headers = [("forwarded", forwarded), ("traceparent", traceparent())]
    if bag:
        headers.append(("baggage", bag))
    return headers


@dataclass(frozen=True, slots=True)
class OutboundConnection:
    workload_uid: str  # the client pod's workload
    src: Address
    original_dst: Address  # what the client dialled (a service VIP, a pod, an address outside the mesh)
    actual_dst: Address  # where the agent connects: podIP:15008 for HBONE, the endpoint otherwise
    protocol: str  # "HBONE" (and its same-node stand-in) or "TCP" (passthrough)


class OutboundProxy:
    """Handles connections accepted on the outbound listener: `await proxy.handle(sock, orig_dst)`."""

    def __init__(
        self,
        store: WorkloadStore,
        certs: Any,
        pool: HboneConnectionPool,
        node: str,
        metrics: Metrics,
        access_log: AccessLog,
        connections: ConnectionRegistry,
        config: OutboundConfig | None = None,
        resolver: OnDemandResolver | None = None,
        in_pod: InPodConnector | None = None,
    ) -> None:
        self.store = store
        self.certs = certs
        self.pool = pool
        self.node = node
        self.metrics = metrics
        self.access_log = access_log
        self.connections = connections
        self.config = config or OutboundConfig()
        self.resolver = resolver or OnDemandResolver()
        self.in_pod = in_pod
        self._active: dict[ConnectionReport, Address] = {}  # connections being carried -> what the client dialled

    def carried(self) -> list[OutboundConnection]:
        """The connections being carried now, for /config_dump's workloadState (ztunnel's ConnectionManager keeps
        its outbound ones too)."""
        return [
            OutboundConnection(
                report.src.uid,
                report.src_addr,
                dialled,
                report.dst_addr,
                "TCP" if report.path == RouteKind.PASSTHROUGH.value else "HBONE",
            )
            for report, dialled in list(self._active.items())
            if report.src is not None
        ]

    async def handle(self, sock: socket.socket, orig_dst: Address) -> None:
        if (client := peer_or_close(sock)) is None:
            return
        src = self.store.workload_by_ip(client[0])
        if src is None:
            self._refuse(sock, client, orig_dst, "unknown_source")
            return
        if src.node != self.node:  # only this node's pods are captured here: never act for another node's pod
            self._refuse(sock, client, orig_dst, "source_not_local")
            return
        if (dialled := destination_before_nat(sock, orig_dst)) is not None and self.store.service_by_vip(
            dialled[0], src.namespace, src.network
        ):
            orig_dst = dialled  # a service VIP the node DNATed before the agent saw it: the agent balances it itself
        r = route(self.store, self.node, src, orig_dst, self.config)
        if r.kind is RouteKind.REJECT:
            self._refuse(sock, client, orig_dst, r.reason)
            return
        if r.hostname:
            found = await self._resolve(sock, client, src, orig_dst, r)
            if found is None:
                return
            r = found
        assert r.target is not None
        # as ztunnel: dst.addr is where the agent connects (podIP:15008 for HBONE), dst.hbone_addr the :authority
        report = self.access_log.start(
            "outbound", client, r.target, src=src, dst=r.workload, service=r.service, path=r.kind.value
        )
        self._active[report] = orig_dst
        td = self.certs.trust_domain
        try:
            if r.workload is not None:  # a workload outside the mesh still has its identity (ztunnel reports it)
                report.dst_identity = workload_identity(r.workload, td)
            if r.kind is not RouteKind.PASSTHROUGH:  # HBONE or its same-node stand-in: mutual TLS between the two
                report.src_identity = workload_identity(src, td)
                report.mtls = True
            if r.kind is RouteKind.HBONE:
                report.hbone_addr = r.authority
                await self._hbone(sock, client, src, r, report)
            elif r.kind is RouteKind.SAME_NODE:
                await self._same_node(sock, client, r, report)
            else:
                await self._passthrough(sock, client, r, report)
        except asyncio.CancelledError:  # at any await (certificate, tunnel, connect, relay): still closed and logged
            # "-", as ztunnel's ConnectionResult dropped unrecorded (its Drop records ClosedFromDrain unflagged)
            report.finish(error="cancelled", flags="-")
            raise
        except Exception as e:  # a failure nothing above expects: the listener logs it; the record still closes
            report.finish(error=f"internal error: {e!r}", flags="CONNECT")
            raise
        finally:
            del self._active[report]

    def _refuse(self, sock: socket.socket, client: Address, dst: Address, reason: str, **detail: Any) -> None:
        self.access_log.refused("outbound", client, dst, reason, **detail)
        abort(sock)

    async def _resolve(self, sock: socket.socket, client: Address, src: Any, dst: Address, r: Route) -> Route | None:
        """`r` with its endpoint's hostname resolved (an address of the family the client dialled preferred, as
        ztunnel's on-demand DNS); None when the connection was refused: the name did not resolve
        (`dns_resolution_failed`, as ztunnel's early failure: logged and counted, no traffic metrics), or to an
        address `route` would refuse."""
        self.metrics.on_demand_dns_requested(src, workload_identity(src, self.certs.trust_domain), r.hostname)
        try:
            ip = await self.resolver.pick(r.hostname, ":" in dst[0])
        except ResolutionError as e:
            self._refuse(sock, client, dst, "dns_resolution_failed", **{"dst.hostname": r.hostname, "cause": str(e)})
            return None
        final = resolved(r, ip, self.config)
        if final.kind is RouteKind.REJECT:
            self._refuse(sock, client, dst, final.reason, **{"dst.hostname": r.hostname, "dst.resolved": ip})
            return None
        return final

    async def _hbone(self, sock: socket.socket, client: Address, src: Any, r: Route, report: ConnectionReport) -> None:
        assert r.target is not None and r.authority is not None
        assert report.src_identity is not None and report.dst_identity is not None
        report.opened()
        try:
            ctx = await self.certs.client_context(report.src_identity)
        except CertificateUnavailable as e:  # ztunnel: fetch_certificate fails, Error::Identity
            self.metrics.error("outbound", "no_certificate")
            report.finish(error=str(e), flags="IDENTITY_ERROR")
            abort(sock)
            return
        except ssl.SSLError as e:  # ztunnel: the certificate makes no client configuration, Error::Tls
            self.metrics.error("outbound", "tls_config")
            report.finish(error=f"client TLS context: {e}", flags="TLS_FAILURE")
            abort(sock)
            return
        try:
            early = read_waiting(sock, self.config.early_data)
        except OSError as e:
            failed = not ungraceful(e)  # a client that reset already is no error for ztunnel's copy (ignore_io_errors)
            report.finish(error=f"client read: {e}" if failed else None, flags="CONNECT" if failed else "-")
            abort(sock)
            return
        try:
            key = PoolKey(
                report.src_identity,
                report.dst_identity,
                r.target,
                accepted_sans(self.store, r.service),
                source=client[0] if self.config.keep_source_address else None,
            )
            stream = await self.pool.open_stream(
                key,
                ctx,
                format_address(r.authority),
                hbone_headers(client, workload_baggage(self.store, src), r.service),
                early,
            )
        except HboneConnectError as e:
            self.metrics.error("outbound", connect_error_reason(e))
            report.finish(error=str(e), flags=CONNECT_FAILURE_FLAGS[e.stage])
            abort(sock)
            return
        result = await relay(sock, stream, report.relaying)
        failure = result.failure  # a reset or broken pipe while relaying is no error (ztunnel's ignore_io_errors)
        report.finish(result.bytes_up, result.bytes_down, error=failure, flags="CONNECT" if failure else "-")

    async def _same_node(self, sock: socket.socket, client: Address, r: Route, report: ConnectionReport) -> None:
        """Policy as the destination would apply it, reported by both sides, bytes spliced in the kernel."""
        assert r.target is not None and r.authority is not None
        inbound = self.access_log.start(
            "inbound",
            client,
            r.authority,
            src=report.src,
            dst=r.workload,
            service=r.service or destination_service(self.store, r.workload, r.authority[1]),
            src_identity=report.src_identity,
            dst_identity=report.dst_identity,
            mtls=True,
            path="same_node",
        )
        conn = rbac.Connection(client[0], r.authority[0], r.authority[1], report.src_identity, client[1])
        await self.connections.splice_authorized(
            sock,
            conn,
            r.workload,
            r.target,
            [report, inbound],
            "outbound",
            # not to itself: the pod's kernel drops a packet from its own address arriving from outside (martian)
            keep_source=self.config.keep_source_address and client[0] != r.target[0],
            connect_timeout=self.config.connect_timeout,
        )

    async def _passthrough(self, sock: socket.socket, client: Address, r: Route, report: ConnectionReport) -> None:
        """Plain TCP to a destination outside the mesh. ztunnel connects from inside the client pod, so the
        destination sees the client's address (what its NetworkPolicy and logs go by, and what a hop-limited answer
        such as IMDSv2's is kept from), and the node's NAT (egress masquerade, a Service's DNAT) and forward hook
        (egress NetworkPolicy) apply to it as to the pod's own. So does the agent, where it finds the pod's
        namespace (agent/inpod.py). Elsewhere it connects from the node's namespace, from the client's address:
        replies come back through a hook that hands them to this socket (the tc program at the destination pod's
        veth or the node's uplink, and after NAT the nftables table's reply rule, see capture_dnat). Not to one of
        this node's own addresses (its services would answer the pod's address through the pod's veth, past the
        agent), nor, without the reply rule, to anything but a pod: those see the node's address."""
        assert r.target is not None
        wl = r.workload
        report.opened()
        try:
            upstream = None
            if self.in_pod is not None and self.config.keep_source_address:
                upstream = await self.in_pod.connect(client[0], r.target, connect_timeout=self.config.connect_timeout)
            if upstream is None:
                keep = self.config.keep_source_address and (
                    (wl is not None and is_pod(wl) and wl.network_mode != HOST_NETWORK)
                    or (self.config.nat_replies_steered and not self.config.is_node_address(r.target[0]))
                )
                upstream = await connect_upstream(
                    r.target, source_ip=client[0] if keep else None, connect_timeout=self.config.connect_timeout
                )
        except (OSError, TimeoutError) as e:
            self.metrics.error("outbound", "connect_failed")
            report.finish(error=f"connect {format_address(r.target)}: {e}", flags="CONNECT")
            abort(sock)
            return
        splice = SpliceRelay(sock, upstream)
        report.relaying(lambda: (splice.bytes_up, splice.bytes_down))
        error: str | None = "cancelled"
        flags = "-"
        try:
            error = (await splice.run()).failure
            flags = "CONNECT" if error else "-"  # a copy error: ztunnel's SendError/ReceiveError, CONNECT
        finally:
            report.finish(splice.bytes_up, splice.bytes_down, error=error, flags=flags)
