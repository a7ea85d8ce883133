"""The no-mesh baselines: each server pod sits where its name says, and the same-node one mirrors ambit-same's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import pytest

from bench.drivers.base import DriverUnavailable
from bench.drivers.nomesh import NOMESH_PATHS, NoMesh, NoMeshPath
from bench.labs import ECHO_PORT, IPERF_PORT, SERVER_PODS, TOPOLOGY, BenchLabs, Pinning
from lab import PodInfo, topology

PATHS = {p.name: p for p in NOMESH_PATHS}


def _pods(config_dir: str) -> dict[str, topology.PodSpec]:
    return {f"{p.namespace}/{p.name}": p for p in topology.load(TOPOLOGY / config_dir).pods}


@pytest.mark.parametrize("path", NOMESH_PATHS, ids=lambda p: p.name)
def test_plain_topology_places_each_server_as_its_configuration_says(path: NoMeshPath) -> None:
    pods = _pods("plain")
    assert (pods["bench/client"].node == pods[path.server_key].node) is path.same_node
    assert path.server_key in SERVER_PODS["plain"], "no backends would run in the server pod"


def test_same_node_baseline_is_placed_like_the_mesh_labs_same_node_server() -> None:
    plain, mesh = _pods("plain"), _pods("mesh")
    ours, theirs = plain[PATHS["nomesh-same"].server_key], mesh["bench-mesh/server-local"]
    assert (ours.node, ours.ip, ours.service_account) == (theirs.node, theirs.ip, theirs.service_account)
    assert plain["bench/client"].node == mesh["bench-mesh/client"].node


def _pod(name: str, node: str, ip: str) -> PodInfo:
    return PodInfo(ip, f"ns-{name}", node, name, "bench", f"veth-{name}", name, {}, host_network=False)


@dataclass
class _Site:
    pods: dict[str, PodInfo] = field(default_factory=dict)

    def pod(self, key: str) -> PodInfo:
        return self.pods[key]


@dataclass
class _Labs:
    site: _Site

    def get(self, kind: str) -> _Site:
        assert kind == "plain"
        return self.site


def _driver(name: str, server_node: str) -> NoMesh:
    path = PATHS[name]
    site = _Site({"bench/client": _pod("client", "node1", "10.71.1.10")})
    site.pods[path.server_key] = _pod(path.server_key.split("/")[1], server_node, "10.71.9.9")
    return NoMesh(path, cast(BenchLabs, _Labs(site)), Pinning(enabled=True))


@pytest.mark.parametrize(("name", "server_node"), [("nomesh", "node2"), ("nomesh-same", "node1")])
def test_driver_dials_its_server_pod_directly(name: str, server_node: str) -> None:
    endpoint = _driver(name, server_node).prepare()
    assert endpoint.client_netns == "ns-client"
    assert endpoint.echo == ("10.71.9.9", ECHO_PORT)
    assert endpoint.iperf == ("10.71.9.9", IPERF_PORT)
    assert endpoint.client_cpus == [0]
    assert endpoint.proxies == []


@pytest.mark.parametrize(("name", "server_node"), [("nomesh", "node1"), ("nomesh-same", "node2")])
def test_driver_refuses_a_placement_that_contradicts_its_name(name: str, server_node: str) -> None:
    with pytest.raises(DriverUnavailable, match=f"{name} needs bench/client and bench/"):
        _driver(name, server_node).prepare()
