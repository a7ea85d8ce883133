"""Reviewer O2: the inbound destination_service labels pick the service as ztunnel's guess_inbound_service
(src/proxy.rs): the first of the workload's services whose own target port is the connection's port, or whose port
the workload maps to it in its port list (a named target port). The workload's list was the only source: an empty
list, or one without that port, left the connection with destination_service="unknown"."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, cast

import pytest

from agent.accesslog import AccessLog
from agent.addressing import destination_service
from agent.inbound import InboundProxy
from agent.metrics import Metrics, sample_value
from agent.outbound import OutboundProxy, Route, RouteKind
from agent.state import WorkloadStore
from agent.tunnel import RelayResult
from api.istio.workload import workload_pb2 as wpb
from common.spiffe import Identity
from tests.unit.test_proxy_connections import CURL, SERVER, _Certs, _FakeRequest, fake_pod_and_relay, server_registry

NS = "server"
SERVER_ID = Identity("cluster.local", "server", "default")


def service(name: str, vip: str, *ports: tuple[int, int]) -> wpb.Service:
    return wpb.Service(
        name=name,
        namespace=NS,
        hostname=f"{name}.{NS}.svc.cluster.local",
        addresses=[wpb.NetworkAddress(address=ipaddress.ip_address(vip).packed)],
        ports=[wpb.Port(service_port=sp, target_port=tp) for sp, tp in ports],
    )


def backing(**services: list[tuple[int, int]]) -> wpb.Workload:
    """SERVER, backing the named services with these port lists (service port, target port)."""
    wl = wpb.Workload()
    wl.CopyFrom(SERVER)
    for name, ports in services.items():
        wl.services[f"{NS}/{name}.{NS}.svc.cluster.local"].ports.extend(
            wpb.Port(service_port=sp, target_port=tp) for sp, tp in ports
        )
    return wl


async def reported_service(
    monkeypatch: pytest.MonkeyPatch, wl: wpb.Workload, svcs: list[wpb.Service], port: int, host: str = ""
) -> str:
    """What an inbound HBONE connection to SERVER's `port` is reported against (destination_service)."""
    store, metrics, registry = server_registry()
    store.put([*svcs, wl])
    current = store.workload_by_ip("10.2.0.7")
    proxy = InboundProxy(store, _Certs(), "n2", metrics, AccessLog(metrics), registry)
    fake_pod_and_relay(monkeypatch, RelayResult(0, 0, None))
    req = _FakeRequest(f"10.2.0.7:{port}", CURL)
    if host:
        req.headers.append(("forwarded", f'for="10.1.0.6:1";host={host}'))
    await proxy._connect(req, current, SERVER_ID, ("10.2.0.7", 15008), ("10.1.0.6", 1))  # type: ignore[arg-type]
    assert req.statuses == [200]
    for name in ("a", "b", "unknown"):
        label = name if name == "unknown" else f"{name}.{NS}.svc.cluster.local"
        if sample_value(metrics, "istio_tcp_connections_opened_total", {"destination_service": label}):
            return name
    raise AssertionError("no connection counted")


async def test_an_empty_port_list_falls_back_to_the_services_target_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    wl = backing(a=[])
    assert await reported_service(monkeypatch, wl, [service("a", "10.96.0.1", (80, 8080))], 8080) == "a"


async def test_a_port_the_list_does_not_map_is_the_services_target_port(monkeypatch: pytest.MonkeyPatch) -> None:
    wl = backing(a=[(80, 8080)])
    svc = service("a", "10.96.0.1", (80, 8080), (90, 9090))
    assert await reported_service(monkeypatch, wl, [svc], 9090) == "a"


async def test_a_named_target_port_is_matched_through_the_workloads_list(monkeypatch: pytest.MonkeyPatch) -> None:
    wl = backing(a=[(80, 8081)])
    assert await reported_service(monkeypatch, wl, [service("a", "10.96.0.1", (80, 0))], 8081) == "a"
    assert await reported_service(monkeypatch, wl, [service("a", "10.96.0.1", (80, 0))], 80) == "unknown"


async def test_the_named_host_still_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    wl = backing(a=[], b=[])
    svcs = [service("a", "10.96.0.1", (80, 8080)), service("b", "10.96.0.2", (81, 8080))]
    assert await reported_service(monkeypatch, wl, svcs, 8080) == "a"
    assert await reported_service(monkeypatch, wl, svcs, 8080, host=f"b.{NS}.svc.cluster.local") == "b"


def name(svc: Any) -> str | None:
    return None if svc is None else str(svc.name)


def _store(wl: wpb.Workload, *svcs: wpb.Service) -> tuple[WorkloadStore, Any]:
    store = WorkloadStore()
    store.put([*svcs, wl])
    found = store.workload_by_ip("10.2.0.7")
    assert found is not None
    return store, found


def test_the_first_service_in_key_order_serving_the_port_by_either_rule() -> None:
    """ztunnel tries the services in turn, each by its target ports and then by the workload's mapping: `a`
    serving 9090 by its own target port comes before `b` serving it through the workload's list."""
    store, wl = _store(
        backing(a=[], b=[(80, 9090)]), service("a", "10.96.0.1", (90, 9090)), service("b", "10.96.0.2", (80, 0))
    )
    assert name(destination_service(store, wl, 9090)) == "a"


def test_a_mapping_for_a_port_the_service_does_not_declare_is_no_match() -> None:
    """The workload's list is read for the service's ports only (ztunnel: endpoint port of each service port)."""
    store, wl = _store(backing(a=[(99, 9999)]), service("a", "10.96.0.1", (80, 8080)))
    assert destination_service(store, wl, 9999) is None
    assert name(destination_service(store, wl, 8080)) == "a"


def test_the_index_is_per_store_version() -> None:
    store, wl = _store(backing(a=[]), service("a", "10.96.0.1", (80, 8080)))
    assert name(destination_service(store, wl, 8080)) == "a"
    store.put([service("a", "10.96.0.1", (80, 8081))])
    assert destination_service(store, wl, 8080) is None
    assert name(destination_service(store, wl, 8081)) == "a"


async def test_the_same_node_paths_inbound_report_uses_the_same_rule() -> None:
    """The same-node splice reports the destination's side itself: a pod dialled by its address (no VIP) is
    reported against the service as the destination agent would."""
    store, wl = _store(backing(a=[]), service("a", "10.96.0.1", (80, 8080)))
    reports: list[Any] = []

    class Connections:
        async def splice_authorized(self, sock: Any, conn: Any, wl: Any, to: Any, recs: Any, *a: Any, **k: Any) -> None:
            reports.extend(recs)

    metrics = Metrics()
    proxy = OutboundProxy(store, _Certs(), cast(Any, None), "n2", metrics, AccessLog(metrics), cast(Any, Connections()))
    r = Route(RouteKind.SAME_NODE, target=("10.2.0.7", 8080), authority=("10.2.0.7", 8080), workload=wl)
    out = AccessLog(metrics).start("outbound", ("10.2.0.9", 5000), ("10.2.0.7", 8080), dst=wl, path="same_node")
    a, b = socket.socketpair()
    try:
        await proxy._same_node(a, ("10.2.0.9", 5000), r, out)
    finally:
        a.close()
        b.close()
    [_, inbound] = reports
    assert name(inbound.service) == "a"
