"""What the data path derives from one service is kept until that service or one of its endpoints changes (helper S,
agent at large-cluster scale).

The store's memo is emptied by every update, so in a 10,000-pod cluster (updates all the time) the first connection
to a 1,000-endpoint service after each update walked its endpoints again: ~10 ms of the loop. Endpoint lists are now
kept per service, and :meth:`WorkloadStore.memoized_for_service` keeps what depends on a service and its endpoints
only (agent/outbound.py's endpoint candidates, once it uses it).
"""

from __future__ import annotations

import ipaddress

from agent.state import ADDRESS_TYPE, WorkloadStore
from api.istio.workload import workload_pb2 as wpb

KEY = "demo/web.demo.svc.cluster.local"
OTHER = "demo/db.demo.svc.cluster.local"


def service(hostname: str, vip: str, port: int = 80) -> wpb.Service:
    return wpb.Service(
        name=hostname.split(".")[0],
        namespace="demo",
        hostname=hostname,
        addresses=[wpb.NetworkAddress(address=ipaddress.ip_address(vip).packed)],
        ports=[wpb.Port(service_port=port, target_port=8080)],
    )


def pod(i: int, key: str = KEY, target: int = 8080, status: int = wpb.HEALTHY) -> wpb.Workload:
    w = wpb.Workload(
        uid=f"c//Pod/demo/p{i}",
        name=f"p{i}",
        namespace="demo",
        addresses=[ipaddress.ip_address(f"10.1.0.{i}").packed],
        status=status,  # type: ignore[arg-type]
    )
    w.services[key].ports.add(service_port=80, target_port=target)
    return w


def store() -> WorkloadStore:
    s = WorkloadStore()
    s.put([service("web.demo.svc.cluster.local", "10.96.0.1"), service("db.demo.svc.cluster.local", "10.96.0.2")])
    s.put([pod(i) for i in range(1, 4)] + [pod(9, OTHER)])
    return s


def test_an_endpoint_list_outlives_updates_of_other_services_and_follows_its_own() -> None:
    s = store()
    first = s.endpoints(KEY, 80)
    assert sorted(w.name for w, _ in first) == ["p1", "p2", "p3"]
    s.put([pod(10, OTHER)])  # another service's endpoint
    s.put([wpb.Workload(uid="c//Pod/demo/lone", name="lone", namespace="demo")])  # nobody's endpoint
    assert s.endpoints(KEY, 80) is first  # not walked again
    s.put([pod(2, target=9090)])  # one of its endpoints changes
    again = s.endpoints(KEY, 80)
    assert again is not first and dict((w.name, t) for w, t in again)["p2"] == 9090
    s.apply(ADDRESS_TYPE, {}, ["c//Pod/demo/p3"])  # one leaves
    assert sorted(w.name for w, _ in s.endpoints(KEY, 80)) == ["p1", "p2"]
    s.put([service("web.demo.svc.cluster.local", "10.96.0.1", port=81)])  # the service itself changes
    assert s.endpoints(KEY, 80) is not s.endpoints(OTHER, 80)
    assert sorted(w.name for w, _ in s.endpoints(KEY, 80)) == ["p1", "p2"]


def test_memoized_for_service_is_computed_again_only_when_the_service_or_an_endpoint_changes() -> None:
    s = store()
    computed: list[str] = []

    def healthy() -> list[str]:
        computed.append("web")
        return sorted(w.name for w, _ in s.endpoints(KEY, 80) if w.status == wpb.HEALTHY)

    assert s.memoized_for_service(KEY, "healthy", healthy) == ["p1", "p2", "p3"]
    s.put([pod(10, OTHER)])
    assert s.memoized_for_service(KEY, "healthy", healthy) == ["p1", "p2", "p3"]
    assert computed == ["web"]
    s.put([pod(1, status=wpb.UNHEALTHY)])
    assert s.memoized_for_service(KEY, "healthy", healthy) == ["p2", "p3"]
    assert computed == ["web", "web"]
    s.put([service("web.demo.svc.cluster.local", "10.96.0.3")])
    assert s.memoized_for_service(KEY, "healthy", healthy) == ["p2", "p3"]
    assert computed == ["web"] * 3
    s.apply(ADDRESS_TYPE, {}, [KEY])  # the service leaves: nothing is kept for it
    assert s.memoized_for_service(KEY, "healthy", healthy) == ["p2", "p3"]
    assert s.memoized_for_service(KEY, "healthy", healthy) == ["p2", "p3"]
    assert computed == ["web"] * 5
    assert KEY not in s._service_memo and KEY not in s._endpoint_lists
