"""Outbound destination resolution (agent.outbound.route) against a populated WorkloadStore, and the HBONE
request headers."""

from __future__ import annotations

import ipaddress
import random
import re
import socket
from collections import Counter
from typing import Any

import psutil
import pytest

from agent.addressing import baggage, workload_baggage
from agent.outbound import OutboundConfig, RouteKind, hbone_headers, is_node_address, route, traceparent
from agent.state import MEMO_LIMIT, WorkloadStore
from api.istio.workload import workload_pb2 as wpb
from tests.support.workloads import pod_workload

HOST = "echo.server.svc.cluster.local"
KEY = f"server/{HOST}"


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def wl(name: str, addr: str, node: str, *, ports: dict[int, int] | None = None, **kw: Any) -> wpb.Workload:
    services = {}
    if ports is not None:
        services[KEY] = wpb.PortList(ports=[wpb.Port(service_port=s, target_port=t) for s, t in ports.items()])
    return pod_workload(name, "server", addr, node=node, services=services, **kw)


CLIENT = pod_workload("sleep-1", "client", "10.1.0.5", sa="sleep", node="n1", deployment="sleep")


def service(
    vip: str,
    name: str = "echo",
    mode: wpb.LoadBalancing.Mode = wpb.LoadBalancing.UNSPECIFIED_MODE,
    ports: dict[int, int] | None = None,
) -> Any:
    return wpb.Service(
        name=name,
        namespace="server",
        hostname=f"{name}.server.svc.cluster.local",
        addresses=[wpb.NetworkAddress(address=ip(vip))],
        ports=[wpb.Port(service_port=s, target_port=t) for s, t in (ports or {80: 8080}).items()],
        load_balancing=wpb.LoadBalancing(mode=mode),
    )


@pytest.fixture
def store() -> WorkloadStore:
    s = WorkloadStore()
    populate(
        s,
        CLIENT,
        wl("echo-a", "10.2.0.7", "n2", ports={80: 8080}),
        wl("echo-b", "10.2.0.8", "n2", ports={80: 9090}),  # the workload's own target port wins
        wl("echo-sick", "10.2.0.9", "n2", ports={80: 8080}, status=wpb.UNHEALTHY),
        wl("local", "10.1.0.9", "n1"),
        wl("legacy", "10.3.0.4", "n2", hbone=False),
        service("10.96.0.10"),
        service("10.96.0.11", name="empty"),
        service("10.96.0.12", name="passthrough", mode=wpb.LoadBalancing.PASSTHROUGH),
    )
    return s


def populate(store: WorkloadStore, *msgs: Any) -> None:
    store.put(msgs)


NODE_IP = "192.0.2.50"
ON_NODE = OutboundConfig(is_node_address=lambda ip: ip == NODE_IP or ip.startswith("127."))


@pytest.mark.parametrize("port", [15001, 15006, 15008])
def test_agent_ports_are_refused_only_where_they_reach_an_agent(store: WorkloadStore, port: int) -> None:
    """ztunnel refuses its own ports on loopback only (its listeners are in the pod's netns); ours are in the
    node's netns, so on every address of the node. Elsewhere the port is like any other: a pod outside the mesh
    or an outside server serving on it is reachable, a mesh pod's agent refuses it at its inbound (ztunnel's
    SelfCall there), and the same-node splice, standing in for that inbound, refuses it too."""
    for ip in (NODE_IP, "127.0.0.1"):
        r = route(store, "n1", CLIENT, (ip, port), ON_NODE)
        assert (r.kind, r.reason) == (RouteKind.REJECT, "self_call")
    for ip in ("10.3.0.4", "203.0.113.9"):  # a pod outside the mesh; an address nobody in the mesh has
        r = route(store, "n1", CLIENT, (ip, port), ON_NODE)
        assert r.kind is RouteKind.PASSTHROUGH and r.target == (ip, port)
    r = route(store, "n1", CLIENT, ("10.2.0.7", port), ON_NODE)
    assert r.kind is RouteKind.HBONE and r.authority == ("10.2.0.7", port)
    r = route(store, "n1", CLIENT, ("10.1.0.9", port), ON_NODE)
    assert (r.kind, r.reason) == (RouteKind.REJECT, "self_call")
    r = route(store, "n1", CLIENT, (NODE_IP, 8080), ON_NODE)  # the node's other ports are not the agent's
    assert r.kind is RouteKind.PASSTHROUGH


def test_the_node_addresses_are_the_ones_the_kernel_has() -> None:
    """The default check agrees with the interface list (psutil reads it another way, from the same kernel)."""
    local = {
        a.address.split("%")[0]
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family in (socket.AF_INET, socket.AF_INET6)
    }
    assert local and all(is_node_address(a) for a in local if not a.startswith("fe80:"))
    assert is_node_address("0.0.0.0") and is_node_address("::ffff:127.0.0.1")
    outside = next(f"198.51.100.{i}" for i in range(1, 255) if f"198.51.100.{i}" not in local)
    assert not is_node_address(outside)


def test_workload_ip_goes_through_hbone_to_15008(store: WorkloadStore) -> None:
    r = route(store, "n1", CLIENT, ("10.2.0.7", 8080))
    assert r.kind is RouteKind.HBONE
    assert r.target == ("10.2.0.7", 15008)
    assert r.authority == ("10.2.0.7", 8080)  # no port mapping without a service
    assert r.workload is not None and r.workload.name == "echo-a" and r.service is None


def test_vip_balances_over_healthy_endpoints_with_target_ports(store: WorkloadStore) -> None:
    seen: Counter[tuple[str, int] | None] = Counter()
    rng = random.Random(7)
    for _ in range(200):
        r = route(store, "n1", CLIENT, ("10.96.0.10", 80), rng=rng)
        assert r.kind is RouteKind.HBONE and r.service is not None and r.service.hostname == HOST
        assert r.authority is not None and r.target == (r.authority[0], 15008)
        seen[r.authority] += 1
    assert set(seen) == {("10.2.0.7", 8080), ("10.2.0.8", 9090)}  # never the unhealthy one
    assert min(seen.values()) > 50


def test_vip_without_endpoints(store: WorkloadStore) -> None:
    r = route(store, "n1", CLIENT, ("10.96.0.11", 80))
    assert (r.kind, r.reason) == (RouteKind.REJECT, "no_healthy_upstream")
    r = route(store, "n1", CLIENT, ("10.96.0.12", 80))
    assert r.kind is RouteKind.PASSTHROUGH and r.target == ("10.96.0.12", 80)


def test_same_node_fast_path(store: WorkloadStore) -> None:
    r = route(store, "n1", CLIENT, ("10.1.0.9", 7000))
    assert r.kind is RouteKind.SAME_NODE and r.target == ("10.1.0.9", 7000) == r.authority
    off = route(store, "n1", CLIENT, ("10.1.0.9", 7000), OutboundConfig(same_node_fast_path=False))
    assert off.kind is RouteKind.HBONE and off.target == ("10.1.0.9", 15008)


def test_outside_the_mesh_is_passthrough(store: WorkloadStore) -> None:
    r = route(store, "n1", CLIENT, ("10.3.0.4", 5432))
    assert r.kind is RouteKind.PASSTHROUGH and r.target == ("10.3.0.4", 5432)
    assert r.workload is not None and r.workload.name == "legacy"
    r = route(store, "n1", CLIENT, ("192.0.2.1", 443))
    assert r.kind is RouteKind.PASSTHROUGH and r.target == ("192.0.2.1", 443) and r.workload is None


def test_headers() -> None:
    headers = dict(hbone_headers(("10.1.0.5", 40123), baggage(CLIENT)))
    assert headers["forwarded"] == 'for="10.1.0.5:40123"'
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", headers["traceparent"])
    assert headers["baggage"] == (
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=client,k8s.deployment.name=sleep,"
        "service.name=sleep,service.version=v1"
    )
    assert dict(hbone_headers(("fd00::5", 1), baggage(CLIENT)))["forwarded"] == 'for="[fd00::5]:1"'
    with_service = dict(hbone_headers(("10.1.0.5", 1), baggage(CLIENT), service("10.96.0.10")))
    assert with_service["forwarded"] == f'for="10.1.0.5:1";host={HOST}'
    assert traceparent() != traceparent()
    assert baggage(wpb.Workload()) == ""


# ---- service VIP resolution as ztunnel's find_upstream / load_balance / pick_workload_destination ----------------


def resolve(store: WorkloadStore, dst: tuple[str, int], n: int = 1, src: Any = CLIENT) -> Counter[Any]:
    """How `n` connections to `dst` are routed: (kind, target, authority, workload name, reason) counts."""
    rng = random.Random(11)
    out: Counter[Any] = Counter()
    for _ in range(n):
        r = route(store, "n1", src, dst, rng=rng)
        out[(r.kind, r.target, r.authority, r.workload.name if r.workload else None, r.reason)] += 1
    return out


def test_port_missing_from_the_service_is_no_upstream() -> None:
    """ztunnel: a VIP port the service does not declare has no upstream (NoHealthyUpstream), not the endpoint on
    that same port."""
    s = WorkloadStore()
    populate(s, CLIENT, wl("echo-a", "10.2.0.7", "n2", ports={80: 8080}), service("10.96.0.10"))
    assert set(resolve(s, ("10.96.0.10", 443))) == {
        (RouteKind.REJECT, None, None, None, "no_healthy_upstream"),
    }


def test_named_target_port_needs_the_endpoints_own_mapping() -> None:
    """Service target port 0 is a named port: only endpoints that map it are candidates (ztunnel's
    build_request_target_port); one without a mapping is filtered out, never reached on the service port."""
    s = WorkloadStore()
    populate(
        s,
        CLIENT,
        wl("named", "10.2.0.7", "n2", ports={80: 1234}),
        wl("unnamed", "10.2.0.8", "n2", ports={8080: 9999}),  # maps another port only
        service("10.96.0.10", ports={80: 0, 8080: 0}),
    )
    assert set(resolve(s, ("10.96.0.10", 80), 40)) == {
        (RouteKind.HBONE, ("10.2.0.7", 15008), ("10.2.0.7", 1234), "named", ""),
    }
    only_unnamed = WorkloadStore()
    populate(
        only_unnamed, CLIENT, wl("unnamed", "10.2.0.8", "n2", ports={8080: 9999}), service("10.96.0.10", ports={80: 0})
    )
    assert set(resolve(only_unnamed, ("10.96.0.10", 80))) == {
        (RouteKind.REJECT, None, None, None, "no_healthy_upstream"),
    }


def test_passthrough_service_is_never_load_balanced() -> None:
    """LoadBalancing PASSTHROUGH: no endpoint selection at all, plain TCP to the original destination, even with
    healthy endpoints (ztunnel's find_upstream returns OriginalDestination before looking at them)."""
    s = WorkloadStore()
    mode = wpb.LoadBalancing.PASSTHROUGH
    populate(s, CLIENT, wl("echo-a", "10.2.0.7", "n2", ports={80: 8080}), service("10.96.0.10", mode=mode))
    assert set(resolve(s, ("10.96.0.10", 80), 20)) == {
        (RouteKind.PASSTHROUGH, ("10.96.0.10", 80), None, None, ""),
    }


def test_health_policy_allow_all_includes_unhealthy_endpoints() -> None:
    s = WorkloadStore()
    svc = service("10.96.0.10")
    svc.load_balancing.health_policy = wpb.LoadBalancing.ALLOW_ALL
    populate(s, CLIENT, wl("echo-sick", "10.2.0.9", "n2", ports={80: 8080}, status=wpb.UNHEALTHY), svc)
    assert set(resolve(s, ("10.96.0.10", 80))) == {
        (RouteKind.HBONE, ("10.2.0.9", 15008), ("10.2.0.9", 8080), "echo-sick", ""),
    }
    svc.load_balancing.health_policy = wpb.LoadBalancing.ONLY_HEALTHY
    populate(s, svc)
    assert set(resolve(s, ("10.96.0.10", 80))) == {(RouteKind.REJECT, None, None, None, "no_healthy_upstream")}


def dual_service(families: wpb.IPFamilies) -> wpb.Service:
    svc = service("10.96.0.10", ports={80: 80})
    svc.addresses.append(wpb.NetworkAddress(address=ip("fd96::10")))
    svc.ip_families = families
    return svc


def test_endpoint_address_follows_the_vip_family_and_the_service_ip_families() -> None:
    """ztunnel's pick_workload_destination: an address the service's ip_families allow, of the family the client
    used when the endpoint has one, else the endpoint's other family (ztunnel's service_ip_families)."""
    dual = wl("dual", "10.2.0.7", "n2", ports={80: 80})
    dual.addresses.append(ip("fd02::7"))
    v4only = wl("v4only", "10.2.0.8", "n2", ports={80: 80})
    cases = [
        (dual, wpb.IPV6_ONLY, "10.96.0.10", ("fd02::7", 80)),
        (dual, wpb.IPV4_ONLY, "fd96::10", ("10.2.0.7", 80)),
        (dual, wpb.DUAL, "10.96.0.10", ("10.2.0.7", 80)),
        (dual, wpb.DUAL, "fd96::10", ("fd02::7", 80)),
        (dual, wpb.AUTOMATIC, "fd96::10", ("fd02::7", 80)),
        (v4only, wpb.DUAL, "fd96::10", ("10.2.0.8", 80)),  # no IPv6 address: its IPv4 one, not "no upstream"
        (v4only, wpb.IPV6_ONLY, "10.96.0.10", None),  # nothing the service's families allow
    ]
    for endpoint, families, vip, authority in cases:
        s = WorkloadStore()
        populate(s, CLIENT, endpoint, dual_service(families))
        r = route(s, "n1", CLIENT, (vip, 80))
        if authority is None:
            assert (r.kind, r.reason) == (RouteKind.REJECT, "no_healthy_upstream"), (endpoint.name, families, vip)
        else:
            assert (r.kind, r.authority, r.target) == (RouteKind.HBONE, authority, (authority[0], 15008)), (
                endpoint.name,
                families,
                vip,
            )


def test_other_networks_are_not_reachable_without_a_gateway() -> None:
    """Ambit has no east-west gateways (double HBONE): an endpoint on another network is never picked, and a
    workload address looked up from this network is not one on another network (ztunnel keys by network/IP)."""
    s = WorkloadStore()
    remote = wl("remote", "10.2.0.7", "n2", ports={80: 8080}, network="west")
    populate(s, CLIENT, remote, wl("near", "10.2.0.8", "n2", ports={80: 8080}), service("10.96.0.10"))
    assert set(resolve(s, ("10.96.0.10", 80), 30)) == {
        (RouteKind.HBONE, ("10.2.0.8", 15008), ("10.2.0.8", 8080), "near", ""),
    }
    assert set(resolve(s, ("10.2.0.7", 8080))) == {(RouteKind.PASSTHROUGH, ("10.2.0.7", 8080), None, None, "")}


def test_host_network_workload_is_not_the_owner_of_its_ip() -> None:
    """Host-network pods share the node's IP: a connection to that IP is passthrough to the node, not attributed
    to (or tunnelled to) whichever of them arrived last (ztunnel's build_request_host_network); behind a service
    the endpoint itself is still used."""
    s = WorkloadStore()
    hostnet = wl("hostnet", "10.2.0.1", "n2", ports={80: 8080}, hbone=False, network_mode=wpb.HOST_NETWORK)
    populate(s, CLIENT, hostnet, service("10.96.0.10"))
    assert set(resolve(s, ("10.2.0.1", 22))) == {(RouteKind.PASSTHROUGH, ("10.2.0.1", 22), None, None, "")}
    assert set(resolve(s, ("10.96.0.10", 80))) == {
        (RouteKind.PASSTHROUGH, ("10.2.0.1", 8080), None, "hostnet", ""),
    }


def test_endpoints_are_weighted_by_capacity() -> None:
    """ztunnel picks endpoints weighted by `capacity` (unset = 1; 0 = never, e.g. a WorkloadEntry weight 0)."""
    s = WorkloadStore()
    big = wl("big", "10.2.0.7", "n2", ports={80: 8080})
    big.capacity.value = 3
    off = wl("off", "10.2.0.9", "n2", ports={80: 8080})
    off.capacity.value = 0
    populate(s, CLIENT, big, wl("one", "10.2.0.8", "n2", ports={80: 8080}), off, service("10.96.0.10"))
    seen = Counter(key[3] for key in resolve(s, ("10.96.0.10", 80), 800).elements())
    assert set(seen) == {"big", "one"}
    assert 2.2 < seen["big"] / seen["one"] < 4.0  # 3:1 (600:200 expected; fixed seed)


def locality_store(mode: wpb.LoadBalancing.Mode, *prefs: wpb.LoadBalancing.Scope) -> tuple[WorkloadStore, Any]:
    client = pod_workload(
        "sleep-1", "client", "10.1.0.5", sa="sleep", node="n1", locality=wpb.Locality(region="r1", zone="z1")
    )
    svc = service("10.96.0.10")
    svc.load_balancing.mode = mode
    svc.load_balancing.routing_preference.extend(prefs)
    s = WorkloadStore()
    populate(
        s,
        client,
        svc,
        wl("same-zone", "10.2.0.7", "n2", ports={80: 8080}, locality=wpb.Locality(region="r1", zone="z1")),
        wl("same-region", "10.2.0.8", "n3", ports={80: 8080}, locality=wpb.Locality(region="r1", zone="z2")),
        wl("far", "10.2.0.9", "n4", ports={80: 8080}, locality=wpb.Locality(region="r2", zone="z1")),
    )
    return s, client


def names(store: WorkloadStore, client: Any, n: int = 60) -> set[str | None]:
    return {
        key[3] if key[0] is not RouteKind.REJECT else key[4] for key in resolve(store, ("10.96.0.10", 80), n, client)
    }


def test_failover_prefers_the_closest_endpoints() -> None:
    """FAILOVER: only the endpoints matching most of the routing preferences, in order (ztunnel's rank)."""
    s, client = locality_store(wpb.LoadBalancing.FAILOVER, wpb.LoadBalancing.REGION, wpb.LoadBalancing.ZONE)
    assert names(s, client) == {"same-zone"}
    s.apply("type.googleapis.com/istio.workload.Address", {}, removed=["Kubernetes//Pod/server/same-zone"])
    assert names(s, client) == {"same-region"}
    s.apply("type.googleapis.com/istio.workload.Address", {}, removed=["Kubernetes//Pod/server/same-region"])
    assert names(s, client) == {"far"}  # failover: a mismatch is still better than nothing


@pytest.mark.parametrize("addr", ["127.0.0.1", "127.3.2.1", "::1", "0.0.0.0"])
def test_an_endpoint_on_loopback_is_refused(addr: str) -> None:
    """Connected from the node, a WorkloadEntry or ServiceEntry endpoint at a loopback address would reach the
    node's own services (the agent's admin port among them), not a pod's: refused, by VIP and directly."""
    s = WorkloadStore()
    populate(s, CLIENT, service("10.96.0.10"), wl("sneaky", addr, "n2", ports={80: 8080}))
    for dst in (("10.96.0.10", 80), (addr, 8080)):
        r = route(s, "n1", CLIENT, dst)
        assert (r.kind, r.reason) == (RouteKind.REJECT, "loopback_upstream"), dst
    allowed = route(s, "n1", CLIENT, ("10.96.0.10", 80), OutboundConfig(loopback_upstreams=True))
    assert allowed.kind is RouteKind.HBONE and allowed.authority == (addr, 8080)


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"])
def test_a_loopback_destination_no_workload_owns_is_refused_not_passed_through(addr: str) -> None:
    """A pod's loopback never leaves its netns, so a captured connection to one was forged (security review: on a
    node with route_localnet=1 a hand-written SYN to 127.0.0.1:10248 was passed through, from the node's loopback)."""
    s = WorkloadStore()
    populate(s, CLIENT)
    r = route(s, "n1", CLIENT, (addr, 10248))
    assert (r.kind, r.reason) == (RouteKind.REJECT, "loopback_upstream")
    assert route(s, "n1", CLIENT, (addr, 10248), OutboundConfig(loopback_upstreams=True)).kind is RouteKind.PASSTHROUGH


def test_endpoint_choice_is_reused_only_by_clients_alike() -> None:
    """The candidates are worked out once per store version and reused: per client network, family and (when
    ranked) locality, and never across a change of the store."""
    s, client = locality_store(wpb.LoadBalancing.FAILOVER, wpb.LoadBalancing.REGION, wpb.LoadBalancing.ZONE)
    elsewhere = pod_workload(
        "sleep-2", "client", "10.1.0.6", sa="sleep", node="n1", locality=wpb.Locality(region="r2", zone="z1")
    )
    populate(s, elsewhere)
    assert names(s, client) == {"same-zone"}
    assert names(s, elsewhere) == {"far"}  # not the first client's answer
    assert names(s, client) == {"same-zone"}
    populate(s, wl("same-zone-2", "10.2.0.10", "n2", ports={80: 8080}, locality=wpb.Locality(region="r1", zone="z1")))
    assert names(s, client) == {"same-zone", "same-zone-2"}  # a new endpoint is seen at once


def test_baggage_is_built_once_per_store_version(store: WorkloadStore, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []

    def fake(wl: Any) -> str:
        built.append(wl.name)
        return f"k8s.pod={wl.name}"

    monkeypatch.setattr("agent.addressing.baggage", fake)
    assert workload_baggage(store, CLIENT) == "k8s.pod=sleep-1" == workload_baggage(store, CLIENT)
    assert built == ["sleep-1"]  # the second CONNECT from this client reused it
    populate(store, wl("echo-c", "10.2.0.11", "n2"))  # any change: what the memo holds may be stale
    workload_baggage(store, CLIENT)
    assert built == ["sleep-1", "sleep-1"]


def test_memo_starts_over_when_full() -> None:
    s = WorkloadStore()
    for i in range(MEMO_LIMIT):
        s.memoized(("k", i), lambda: 0)
    assert len(s.memo) == MEMO_LIMIT and s.memoized(("k", 1), lambda: -1) == 0  # still there: no recompute
    assert s.memoized("one more", lambda: 1) == 1 and len(s.memo) == 1


def test_strict_requires_every_routing_preference() -> None:
    """STRICT (e.g. internalTrafficPolicy Local = NODE): endpoints matching all preferences, or no upstream."""
    s, client = locality_store(wpb.LoadBalancing.STRICT, wpb.LoadBalancing.REGION)
    assert names(s, client) == {"same-zone", "same-region"}
    s, client = locality_store(wpb.LoadBalancing.STRICT, wpb.LoadBalancing.NODE)
    assert names(s, client) == {"no_healthy_upstream"}
    s, client = locality_store(wpb.LoadBalancing.UNSPECIFIED_MODE, wpb.LoadBalancing.NODE)
    assert names(s, client) == {"same-zone", "same-region", "far"}  # no mode: preferences are not applied


def test_same_node_fast_path_needs_an_enrolled_source(store: WorkloadStore) -> None:
    """The splice stands in for HBONE between two enrolled pods; a source the store does not show as enrolled
    gets no such shortcut (the tunnel, with its own checks, as for any other destination)."""
    unenrolled = pod_workload("sleep-2", "client", "10.1.0.6", sa="sleep", node="n1", hbone=False)
    r = route(store, "n1", unenrolled, ("10.1.0.9", 7000))
    assert r.kind is RouteKind.HBONE and r.target == ("10.1.0.9", 15008)


def test_same_node_refuses_an_agent_port_behind_a_service() -> None:
    """A VIP port whose target is one of the agent's ports: the destination agent refuses that CONNECT
    (self_call), so the same-node splice, which stands in for it, refuses it too instead of dialling the pod."""
    store = WorkloadStore()
    populate(store, CLIENT, wl("local", "10.1.0.9", "n1", ports={80: 15006}), service("10.96.0.20", ports={80: 15006}))
    r = route(store, "n1", CLIENT, ("10.96.0.20", 80))
    assert (r.kind, r.reason) == (RouteKind.REJECT, "self_call")
    r = route(store, "n2", CLIENT, ("10.96.0.20", 80))  # from another node: the destination agent answers it
    assert r.kind is RouteKind.HBONE and r.authority == ("10.1.0.9", 15006)


def test_namespace_visible_service_is_no_service_to_other_namespaces() -> None:
    """Service visibility NAMESPACE: only clients of the service's namespace see the VIP as a service; for the
    others it is an address like any other (plain TCP to it), as ztunnel's visibility-filtered VIP lookup."""
    s = WorkloadStore()
    svc = service("10.96.0.10")
    svc.visibility = wpb.Service.NAMESPACE
    neighbour = pod_workload("tool-1", "server", "10.1.0.6", sa="tool", node="n1")
    populate(s, CLIENT, neighbour, wl("echo-a", "10.2.0.7", "n2", ports={80: 8080}), svc)
    assert set(resolve(s, ("10.96.0.10", 80))) == {(RouteKind.PASSTHROUGH, ("10.96.0.10", 80), None, None, "")}
    assert set(resolve(s, ("10.96.0.10", 80), src=neighbour)) == {
        (RouteKind.HBONE, ("10.2.0.7", 15008), ("10.2.0.7", 8080), "echo-a", ""),
    }
