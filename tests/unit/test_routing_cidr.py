"""Service addresses that are CIDRs (a ServiceEntry's `addresses: [10.10.0.0/16]`, sent with a prefix `length`),
as ztunnel's ServiceStore: an address with a host's length is an exact VIP; a shorter prefix is searched only when
no exact VIP answers, the best by (client's namespace, longest prefix, canonical), visibility and network as for
exact VIPs."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from agent.outbound import RouteKind, route
from agent.state import ADDRESS_TYPE, WorkloadStore
from agent.xds import validate_address
from api.istio.workload import workload_pb2 as wpb
from tests.support.workloads import pod_workload


def entry(ns: str, name: str, *cidrs: str, network: str = "", canonical: bool = False, **kw: Any) -> wpb.Service:
    addresses = []
    for text in cidrs:
        net = ipaddress.ip_network(text, strict=False)
        addr = wpb.NetworkAddress(network=network, address=net.network_address.packed)
        if "/" in text:
            addr.length = net.prefixlen
        addresses.append(addr)
    return wpb.Service(
        name=name,
        namespace=ns,
        hostname=f"{name}.example.com",
        addresses=addresses,
        ports=[wpb.Port(service_port=443, target_port=443)],
        canonical=canonical,
        **kw,
    )


def name_at(store: WorkloadStore, ip: str, ns: str | None = "client", network: str = "") -> str | None:
    svc = store.service_by_vip(ip, ns, network)
    return None if svc is None else svc.name


def test_an_address_inside_the_cidr_is_the_service() -> None:
    s = WorkloadStore()
    s.put([entry("egress", "corp", "10.10.0.0/16"), entry("egress", "v6", "fd00:10::/64")])
    assert name_at(s, "10.10.200.7") == "corp"  # was None: the store indexed only 10.10.0.0 itself
    assert name_at(s, "10.11.0.1") is None
    assert name_at(s, "fd00:10::1234") == "v6" and name_at(s, "fd00:11::1") is None


def test_an_exact_vip_answers_before_any_cidr() -> None:
    s = WorkloadStore()
    s.put(
        [
            entry("client", "wide", "10.10.0.0/16"),
            entry("other", "exact", "10.10.0.5"),
            entry("x", "host", "10.10.0.6/32"),
        ]
    )
    assert name_at(s, "10.10.0.5") == "exact"  # though the CIDR is in the client's own namespace
    assert name_at(s, "10.10.0.6") == "host"  # a host's length is an exact VIP
    assert name_at(s, "10.10.0.7") == "wide"


def test_namespace_then_longest_prefix_then_canonical_then_arrival() -> None:
    s = WorkloadStore()
    s.put([entry("a", "wide", "10.0.0.0/8"), entry("b", "narrow", "10.1.0.0/16")])
    assert name_at(s, "10.1.2.3", "elsewhere") == "narrow"
    assert name_at(s, "10.1.2.3", "a") == "wide"  # the client's namespace beats specificity
    s.put([entry("c", "narrow-canonical", "10.1.0.0/16", canonical=True)])
    assert name_at(s, "10.1.2.3", "elsewhere") == "narrow-canonical"
    s.put([entry("d", "narrow-late", "10.1.0.0/16")])
    assert name_at(s, "10.1.2.3", "elsewhere") == "narrow-canonical"
    s.apply(ADDRESS_TYPE, {}, removed=["c/narrow-canonical.example.com"])
    assert name_at(s, "10.1.2.3", "elsewhere") == "narrow"  # the first of equal rank
    s.put([entry("e", "everything", "0.0.0.0/0")])
    assert name_at(s, "192.0.2.1", "elsewhere") == "everything"


def test_visibility_network_and_updates_apply_to_cidrs() -> None:
    s = WorkloadStore()
    private = entry("a", "private", "10.0.0.0/8", visibility=wpb.Service.NAMESPACE)
    s.put([private, entry("b", "west", "10.0.0.0/24", network="west")])
    assert name_at(s, "10.0.0.1", "a") == "private"
    assert name_at(s, "10.0.0.1", "b") is None
    assert name_at(s, "10.0.0.1", "b", "west") == "west"
    s.put([entry("a", "private", "172.16.0.0/12", visibility=wpb.Service.NAMESPACE)])  # the entry changed
    assert name_at(s, "10.0.0.1", "a") is None and name_at(s, "172.16.3.4", "a") == "private"
    s.apply(ADDRESS_TYPE, {}, removed=["a/private.example.com"])
    assert name_at(s, "172.16.3.4", "a") is None


def test_outbound_treats_an_address_in_the_cidr_as_that_service() -> None:
    s = WorkloadStore()
    svc = entry("egress", "corp", "10.10.0.0/16")
    client = pod_workload("app", "client", "10.1.0.5", node="n1")
    gw = pod_workload(
        "egress-gw",
        "egress",
        "10.2.0.9",
        node="n2",
        services={"egress/corp.example.com": wpb.PortList(ports=svc.ports)},
    )
    s.put([svc, client, gw])
    r = route(s, "n1", client, ("10.10.44.1", 443))
    assert r.kind is RouteKind.HBONE and r.authority == ("10.2.0.9", 443) and r.service is not None
    assert r.service.name == "corp"
    passthrough = entry(
        "egress", "corp", "10.10.0.0/16", load_balancing=wpb.LoadBalancing(mode=wpb.LoadBalancing.PASSTHROUGH)
    )
    s.put([passthrough])
    r = route(s, "n1", client, ("10.10.44.1", 443))
    assert r.kind is RouteKind.PASSTHROUGH and r.target == ("10.10.44.1", 443) and r.service is not None


@pytest.mark.parametrize(("raw", "length"), [(b"\x0a\x00\x00\x00", 33), (b"\xfd" + b"\x00" * 15, 129)])
def test_a_prefix_longer_than_the_address_is_refused_at_the_xds_boundary(raw: bytes, length: int) -> None:
    svc = wpb.Service(name="bad", namespace="x", hostname="bad.example.com")
    svc.addresses.append(wpb.NetworkAddress(address=raw, length=length))
    reason = validate_address("x/bad.example.com", wpb.Address(service=svc))
    assert reason is not None and f"prefix length {length}" in reason
