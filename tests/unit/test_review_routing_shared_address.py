"""Which workload owns an address several workloads claim, as ztunnel's WorkloadByAddr::get (src/state/workload.rs):
a Pod beats a WorkloadEntry or ServiceEntry endpoint (they can name any address, a pod's IP cannot be spoofed by
another pod), then an HBONE workload beats one outside the mesh, then the latest (re)inserted wins.

Ambit finds a connection's source workload, and the certificate it serves on inbound, by address, so the workload
answering for a pod's IP decides that pod's identity on both ends."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from agent.outbound import OutboundConfig, RouteKind, route
from agent.state import ADDRESS_TYPE, WorkloadStore
from api.istio.workload import workload_pb2 as wpb
from tests.support.workloads import pod_workload

POD_IP = "10.2.0.7"
NODE_ONLY = OutboundConfig(is_node_address=lambda ip: ip.startswith("127."))


def entry(name: str, ns: str, ip: str, **kw: Any) -> wpb.Workload:
    """A WorkloadEntry's workload, as the controller (and istiod) name it."""
    return wpb.Workload(
        uid=f"Kubernetes/networking.istio.io/WorkloadEntry/{ns}/{name}",
        name=name,
        namespace=ns,
        service_account="intruder",
        addresses=[ipaddress.ip_address(ip).packed],
        tunnel_protocol=wpb.HBONE,
        **kw,
    )


VICTIM = pod_workload("db-0", "prod", POD_IP, sa="db", node="n2")
SPOOF = entry("spoof", "tenant", POD_IP)
CLIENT = pod_workload("app", "prod", "10.1.0.5", sa="app", node="n1")


@pytest.mark.parametrize("order", [(VICTIM, SPOOF), (SPOOF, VICTIM)], ids=["entry-last", "pod-last"])
def test_a_pod_owns_its_address_over_a_workload_entry_naming_it(order: tuple[wpb.Workload, ...]) -> None:
    store = WorkloadStore()
    for wl in order:
        store.put([wl])
    found = store.workload_by_ip(POD_IP)
    assert found is not None and found.uid == VICTIM.uid
    # Outbound to the pod's address goes to the pod, verified as the pod's identity, not the entry's.
    store.put([CLIENT])
    r = route(store, "n1", CLIENT, (POD_IP, 5432), NODE_ONLY)
    assert r.kind is RouteKind.HBONE and r.workload is not None and r.workload.uid == VICTIM.uid


def test_an_hbone_pod_owns_the_address_over_a_pod_outside_the_mesh() -> None:
    enrolled = pod_workload("new", "prod", POD_IP, node="n2")
    legacy = pod_workload("old", "legacy", POD_IP, node="n2", hbone=False)
    for order in ((enrolled, legacy), (legacy, enrolled)):
        store = WorkloadStore()
        for wl in order:
            store.put([wl])
        found = store.workload_by_ip(POD_IP)
        assert found is not None and found.uid == enrolled.uid


def test_among_equals_the_latest_update_wins_and_removal_hands_the_address_back() -> None:
    a = pod_workload("a", "prod", POD_IP, node="n2")
    b = pod_workload("b", "prod", POD_IP, node="n2")
    store = WorkloadStore()
    store.put([a])
    store.put([b])
    assert store.workload_by_ip(POD_IP).uid == b.uid  # type: ignore[union-attr]
    store.put([a])  # an update re-inserts, as ztunnel's remove-then-insert
    assert store.workload_by_ip(POD_IP).uid == a.uid  # type: ignore[union-attr]
    store.put([SPOOF])
    store.apply(ADDRESS_TYPE, {}, removed=[a.uid, b.uid])
    assert store.workload_by_ip(POD_IP).uid == SPOOF.uid  # type: ignore[union-attr]
    store.apply(ADDRESS_TYPE, {}, removed=[SPOOF.uid])
    assert store.workload_by_ip(POD_IP) is None


def test_host_network_pods_are_not_candidates_for_their_nodes_address() -> None:
    """ztunnel does not index host-network workloads by address at all: a WorkloadEntry at the node's address owns
    it even though a host-network Pod (which would outrank it) shares it."""
    node_ip = "192.0.2.10"
    hostnet = pod_workload("node-exporter", "monitoring", node_ip, node="n2", hbone=False)
    hostnet.network_mode = wpb.HOST_NETWORK
    vm = entry("vm", "legacy", node_ip)
    store = WorkloadStore()
    store.put([vm])
    store.put([hostnet])
    assert store.workload_by_ip(node_ip).uid == vm.uid  # type: ignore[union-attr]
    store.apply(ADDRESS_TYPE, {}, removed=[vm.uid])
    assert store.workload_by_ip(node_ip) is None
