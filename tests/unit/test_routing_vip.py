"""Which service a VIP shared by several services is, for a given client (WorkloadStore.service_by_vip and the
outbound route), as ztunnel's ServiceStore.get_best_by_vip: keyed by (network, VIP), NAMESPACE-visible services
hidden from other namespaces, then the client's own namespace, then `canonical`, then the first to arrive."""

from __future__ import annotations

import ipaddress
from typing import Any

from agent.outbound import RouteKind, route
from agent.state import ADDRESS_TYPE, WorkloadStore
from api.istio.workload import workload_pb2 as wpb
from tests.support.workloads import pod_workload

VIP = "10.96.0.10"


def svc(ns: str, name: str = "db", *, network: str = "", canonical: bool = False, namespaced: bool = False) -> Any:
    return wpb.Service(
        name=name,
        namespace=ns,
        hostname=f"{name}.{ns}.svc.cluster.local",
        addresses=[wpb.NetworkAddress(network=network, address=ipaddress.ip_address(VIP).packed)],
        ports=[wpb.Port(service_port=80, target_port=8080)],
        canonical=canonical,
        visibility=wpb.Service.NAMESPACE if namespaced else wpb.Service.PUBLIC,
    )


def key(s: Any) -> str:
    return f"{s.namespace}/{s.hostname}"


def best(store: WorkloadStore, ns: str | None, network: str = "") -> str | None:
    found = store.service_by_vip(VIP, ns, network)
    return None if found is None else key(found)


def test_the_clients_namespace_wins_whatever_the_arrival_order() -> None:
    a, b = svc("team-a"), svc("team-b")
    for order in ((a, b), (b, a)):
        s = WorkloadStore()
        s.put(order)
        assert best(s, "team-a") == key(a)
        assert best(s, "team-b") == key(b)
        assert best(s, "elsewhere") == key(order[0])  # no preference applies: the first to arrive


def test_canonical_beats_arrival_order_but_not_the_clients_namespace() -> None:
    s = WorkloadStore()
    first, canonical = svc("entries", name="db-entry"), svc("db", canonical=True)
    s.put([first])
    s.put([canonical])
    assert best(s, "elsewhere") == key(canonical)
    assert best(s, "entries") == key(first)
    assert best(s, None) == key(canonical)


def test_a_namespace_visible_service_is_skipped_for_the_next_visible_one() -> None:
    s = WorkloadStore()
    private, public = svc("team-a", namespaced=True), svc("team-b")
    s.put([private])
    s.put([public])
    assert best(s, "team-c") == key(public)  # was None: only one service per VIP was kept, and it was hidden
    assert best(s, "team-a") == key(private)
    s.apply(ADDRESS_TYPE, {}, removed=[key(public)])
    assert best(s, "team-c") is None
    assert best(s, None) == key(private)  # no client: no filtering


def test_removing_one_service_keeps_the_others_at_the_vip() -> None:
    s = WorkloadStore()
    a, b = svc("team-a"), svc("team-b")
    s.put([a])
    s.put([b])
    s.apply(ADDRESS_TYPE, {}, removed=[key(a)])
    assert best(s, "team-a") == key(b)
    s.apply(ADDRESS_TYPE, {}, removed=[key(b)])
    assert best(s, "team-a") is None


def test_within_one_namespace_the_latest_arrival_answers() -> None:
    s = WorkloadStore()
    old, new = svc("team-a", name="db-old"), svc("team-a", name="db-new")
    s.put([old])
    s.put([new])
    assert best(s, "team-a") == key(new)
    assert best(s, "elsewhere") == key(new)


def test_the_vip_is_scoped_by_network() -> None:
    s = WorkloadStore()
    east, west = svc("team-a", network="east"), svc("team-b", network="west")
    s.put([east, west])
    assert best(s, "team-b", "east") == key(east)  # team-b's own service is on another network
    assert best(s, "team-a", "west") == key(west)
    assert best(s, "team-a", "") is None


def test_outbound_routes_each_client_to_its_own_namespaces_service() -> None:
    """A Kubernetes Service and another namespace's ServiceEntry on one VIP: each client reaches the endpoints
    of the service of its own namespace (before, every client reached whichever arrived last)."""
    s = WorkloadStore()
    a, b = svc("team-a"), svc("team-b")
    ep_a = pod_workload("db-a", "team-a", "10.2.0.7", node="n2", services={key(a): wpb.PortList(ports=a.ports)})
    ep_b = pod_workload("db-b", "team-b", "10.2.0.8", node="n2", services={key(b): wpb.PortList(ports=b.ports)})
    client_a = pod_workload("app", "team-a", "10.1.0.5", node="n1")
    client_b = pod_workload("app", "team-b", "10.1.0.6", node="n1")
    s.put([a, b, ep_a, ep_b, client_a, client_b])
    for client, endpoint in ((client_a, "db-a"), (client_b, "db-b")):
        r = route(s, "n1", client, (VIP, 80))
        assert r.kind is RouteKind.HBONE and r.workload is not None and r.workload.name == endpoint
        assert r.service is not None and r.service.namespace == client.namespace
