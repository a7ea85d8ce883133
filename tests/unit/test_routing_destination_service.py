"""destination_service (ztunnel's guess_inbound_service): which of a workload's services a connection to it was
meant for (the destination_service labels). Worked out once per store version per workload, so every inbound
connection does not sort the services again; a store change is seen at once, and what a peer puts in
`forwarded: host=` never becomes a memo entry."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from agent.addressing import destination_service
from agent.state import ADDRESS_TYPE, WorkloadStore
from api.istio.workload import workload_pb2 as wpb

NS = "ns"


def service(name: str, vip: str, *ports: tuple[int, int]) -> wpb.Service:
    return wpb.Service(
        name=name,
        namespace=NS,
        hostname=f"{name}.{NS}.svc.cluster.local",
        addresses=[wpb.NetworkAddress(address=ipaddress.ip_address(vip).packed)],
        ports=[wpb.Port(service_port=sp, target_port=tp) for sp, tp in ports],
    )


def key(name: str) -> str:
    return f"{NS}/{name}.{NS}.svc.cluster.local"


def backend(**services: list[tuple[int, int]]) -> wpb.Workload:
    return wpb.Workload(
        uid=f"Kubernetes//Pod/{NS}/web-1",
        name="web-1",
        namespace=NS,
        addresses=[ipaddress.ip_address("10.1.0.9").packed],
        services={
            key(name): wpb.PortList(ports=[wpb.Port(service_port=sp, target_port=tp) for sp, tp in ports])
            for name, ports in services.items()
        },
    )


def store_with(*msgs: Any) -> tuple[WorkloadStore, Any]:
    s = WorkloadStore()
    s.put(msgs)
    wl = s.workload_by_ip("10.1.0.9")
    assert wl is not None
    return s, wl


def name(svc: Any) -> str | None:
    return None if svc is None else str(svc.name)


def test_the_named_host_wins_then_the_first_service_in_key_order_serving_the_port() -> None:
    s, wl = store_with(
        service("b", "10.96.0.2", (80, 8080), (443, 8443)),
        service("a", "10.96.0.1", (81, 8081), (443, 8443)),
        service("c", "10.96.0.3", (9090, 0)),  # a named target port: the workload's list says which port it is
        backend(b=[(80, 8080), (443, 8443)], a=[(81, 8081), (443, 8443)], c=[(9090, 9091)]),
    )
    assert name(destination_service(s, wl, 8443)) == "a"  # ns/a... sorts before ns/b...
    assert name(destination_service(s, wl, 8443, "b.ns.svc.cluster.local")) == "b"
    assert name(destination_service(s, wl, 8080)) == "b"
    assert name(destination_service(s, wl, 9091)) == "c"
    assert destination_service(s, wl, 9090) is None  # the service port itself is not where it reaches `wl`
    # a host `wl` does not back is no answer by itself: the port decides
    assert name(destination_service(s, wl, 8081, "other.ns.svc.cluster.local")) == "a"
    assert destination_service(s, wl, 9999) is None
    assert destination_service(s, wl, 9999, "ns.svc.cluster.local") is None  # a suffix of a hostname is not one


def test_the_services_are_indexed_once_per_store_version(monkeypatch: pytest.MonkeyPatch) -> None:
    s, wl = store_with(service("a", "10.96.0.1", (80, 8080)), backend(a=[(80, 8080)], gone=[(80, 8080)]))
    asked: list[str] = []
    real = s.service_by_key

    def counting(k: str) -> Any:
        asked.append(k)
        return real(k)

    monkeypatch.setattr(s, "service_by_key", counting)
    for _ in range(5):
        assert name(destination_service(s, wl, 8080)) == "a"
        assert destination_service(s, wl, 8080, "a.ns.svc.cluster.local") is not None
    assert sorted(asked) == [key("a"), key("gone")]  # one pass over the workload's services, not one per call


def test_a_store_change_is_seen_by_the_next_connection() -> None:
    # `wl` backs "a" before the store holds it: "b" answers; once "a" arrives (same workload object), "a" does;
    # when it goes, "b" again
    s, wl = store_with(service("b", "10.96.0.2", (80, 8080)), backend(a=[(80, 8080)], b=[(80, 8080)]))
    assert name(destination_service(s, wl, 8080)) == "b"
    s.put([service("a", "10.96.0.1", (80, 8080))])
    assert s.workload_by_ip("10.1.0.9") is wl
    assert name(destination_service(s, wl, 8080)) == "a"
    s.apply(ADDRESS_TYPE, {}, [key("a")])
    assert name(destination_service(s, wl, 8080)) == "b"


def test_hosts_from_peers_do_not_fill_the_memo() -> None:
    s, wl = store_with(service("a", "10.96.0.1", (80, 8080)), backend(a=[(80, 8080)]))
    for i in range(200):
        assert name(destination_service(s, wl, 8080, f"made-up-{i}.example")) == "a"
    assert len(s.memo) == 1
