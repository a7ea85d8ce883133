"""Dual-stack and IPv6-only lab topologies: IPv6 pod ranges (spec.podCIDRs) and pod addresses (status.podIPs) are
read as Kubernetes writes them, every mistake is named by file, object and field, and the plan gives nodes IPv6
addresses of their own while IPv4 labs plan exactly as before."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from lab import topology
from lab.errors import LabConfigError
from lab.plan import LabPlan, make_plan

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def node(name: str, cidrs: str) -> str:
    return f"apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {cidrs}\n"


def pod(name: str, status: str, on: str = "node1") -> str:
    return f"kind: Pod\nmetadata: {{name: {name}, namespace: demo}}\nspec: {{nodeName: {on}}}\nstatus: {status}\n"


N1 = node("node1", '{podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, "fd00:1::/64"]}')
N2 = node("node2", '{podCIDR: 10.244.2.0/24, podCIDRs: [10.244.2.0/24, "fd00:2::/64"]}')
A = pod("a", '{podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}, {ip: "fd00:1::10"}]}')


def service(name: str, spec: str) -> str:
    return f"kind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec: {spec}\n"


PORTS = "ports: [{port: 80}]"


def problems(tmp_path: Path, *docs: str) -> list[str]:
    (tmp_path / "c.yaml").write_text("\n---\n".join(docs))
    with pytest.raises(LabConfigError) as info:
        topology.load(tmp_path)
    return [p.replace(f"{tmp_path}/", "").removeprefix("c.yaml:") for p in info.value.problems]


CASES = [
    pytest.param(
        [node("node1", '{podCIDR: 10.244.1.0/24, podCIDRs: ["fd00:1::/64", 10.244.1.0/24]}')],
        ["Node/node1: spec.podCIDRs: the first entry 'fd00:1::/64' must equal spec.podCIDR"],
        id="first-cidr-differs",
    ),
    pytest.param(
        [node("node1", "{podCIDRs: [10.244.1.0/24, 10.244.9.0/24]}")],
        ["Node/node1: spec.podCIDRs[1]: a second IPv4 entry (at most one per family)"],
        id="two-ipv4-cidrs",
    ),
    pytest.param(
        [node("node1", '{podCIDRs: [10.244.1.0/24, "fd00:1::1/64"]}')],
        ["Node/node1: spec.podCIDRs[1]: 'fd00:1::1/64' is not a network address (fd00:1::1/64 has host bits set)"],
        id="ipv6-cidr-host-bits",
    ),
    pytest.param(
        [N1, node("node2", "{podCIDR: 10.244.2.0/24}")],
        ["Node/node2: spec.podCIDRs: IPv6 range required: other nodes have one (all or none)"],
        id="mixed-nodes",
    ),
    pytest.param(
        [N1, node("node2", '{podCIDRs: [10.244.2.0/24, "fd00:1:0:0:8000::/65"]}')],
        ["Node/node2: spec.podCIDRs: fd00:1:0:0:8000::/65 overlaps c.yaml:Node/node1 podCIDRs fd00:1::/64"],
        id="overlapping-ipv6-cidrs",
    ),
    pytest.param(
        [N1, pod("a", '{podIPs: [{ip: 10.244.1.10}, {ip: "fd00:2::10"}]}')],
        ["Pod/demo/a: status.podIPs: fd00:2::10 is outside node 'node1' podCIDRs fd00:1::/64"],
        id="pod-ip6-outside-cidr",
    ),
    pytest.param(
        [node("node1", "{podCIDR: 10.244.1.0/24}"), pod("a", '{podIPs: [{ip: 10.244.1.10}, {ip: "fd00:1::10"}]}')],
        ["Pod/demo/a: status.podIPs: fd00:1::10: node 'node1' has no IPv6 podCIDR"],
        id="pod-ip6-on-ipv4-node",
    ),
    pytest.param(
        [N1, A, pod("b", '{podIPs: [{ip: 10.244.1.11}, {ip: "fd00:1::10"}]}')],
        ["Pod/demo/b: status.podIPs: fd00:1::10 is already used by c.yaml:Pod/demo/a"],
        id="duplicate-pod-ip6",
    ),
    pytest.param(
        [N1, pod("a", '{podIP: 10.244.1.10, podIPs: [{ip: "fd00:1::10"}, {ip: 10.244.1.10}]}')],
        ["Pod/demo/a: status.podIPs: the first entry 'fd00:1::10' must equal status.podIP"],
        id="first-pod-ip-differs",
    ),
    pytest.param(
        [N1, pod("a", '{podIPs: [{ip: "fd00:1::10"}]}')],
        ["Pod/demo/a: status.podIPs: no IPv4 address: node 'node1' has 10.244.1.0/24"],
        id="ipv6-only-pod-on-dual-stack-node",
    ),
    pytest.param(
        [N1, pod("a", '{podIPs: [{ip: 10.244.1.10}, {ip: "fd00:1::"}]}')],
        ["Pod/demo/a: status.podIPs: fd00:1:: is the subnet-router anycast address of fd00:1::/64"],
        id="pod-ip6-subnet-router",
    ),
    pytest.param(
        [N1, pod("a", '{podIPs: [{ip: 10.244.1.10}, {ip: "fd00:1::zz"}]}')],
        ["Pod/demo/a: status.podIPs[1]: 'fd00:1::zz' is not an IP address"],
        id="bad-pod-ip6",
    ),
    pytest.param(
        [N1, service("s", f'{{clusterIP: 10.96.0.1, clusterIPs: ["fd00:96::1", 10.96.0.1], {PORTS}}}')],
        ["Service/demo/s: spec.clusterIPs: the first entry 'fd00:96::1' must equal spec.clusterIP"],
        id="first-cluster-ip-differs",
    ),
    pytest.param(
        [N1, service("s", f"{{clusterIPs: [10.96.0.1, 10.96.0.2], {PORTS}}}")],
        ["Service/demo/s: spec.clusterIPs[1]: a second IPv4 entry (at most one per family)"],
        id="two-ipv4-cluster-ips",
    ),
    pytest.param(
        [N1, service("s", f'{{clusterIP: "fd00:1::99", {PORTS}}}')],
        ["Service/demo/s: spec.clusterIPs: fd00:1::99 is inside c.yaml:Node/node1 podCIDRs fd00:1::/64"],
        id="ipv6-vip-in-pod-cidr",
    ),
    pytest.param(
        [N1, *(service(name, f'{{clusterIP: "fd00:96::1", {PORTS}}}') for name in "st")],
        ["Service/demo/t: spec.clusterIPs: fd00:96::1 is already used by c.yaml:Service/demo/s"],
        id="duplicate-ipv6-vip",
    ),
]


@pytest.mark.parametrize(("docs", "expected"), CASES)
def test_bad_dual_stack_input_is_named(tmp_path: Path, docs: list[str], expected: list[str]) -> None:
    assert problems(tmp_path, *docs) == expected


def test_either_family_may_come_first(tmp_path: Path) -> None:
    """An IPv6-primary dual-stack node and pod (Kubernetes allows both orders) are read the same."""
    (tmp_path / "c.yaml").write_text(
        "\n---\n".join(
            [
                node("node1", '{podCIDR: "fd00:1::/64", podCIDRs: ["fd00:1::/64", 10.244.1.0/24]}'),
                pod("a", '{podIP: "fd00:1::10", podIPs: [{ip: "fd00:1::10"}, {ip: 10.244.1.10}]}'),
            ]
        )
    )
    topo = topology.load(tmp_path)
    assert topo.nodes["node1"].pod_cidr == ipaddress.ip_network("10.244.1.0/24")
    assert topo.nodes["node1"].pod_cidr6 == ipaddress.ip_network("fd00:1::/64")
    assert (topo.pods[0].ip, topo.pods[0].ip6) == (
        ipaddress.ip_address("10.244.1.10"),
        ipaddress.ip_address("fd00:1::10"),
    )


def test_dual_stack_plan_gives_nodes_and_pods_both_families() -> None:
    plan = make_plan(topology.load(EXAMPLES / "dualstack"), "ambit-ds01")
    assert plan.dual_stack
    subnet6 = ipaddress.IPv6Network(plan.node_subnet6)
    assert subnet6.prefixlen == 64 and subnet6.subnet_of(ipaddress.IPv6Network("fd00::/8"))
    node_ips6 = {ipaddress.ip_address(n.ip6) for n in plan.nodes.values()}
    assert len(node_ips6) == len(plan.nodes) and ipaddress.ip_address(plan.core_ip6) not in node_ips6
    assert all(ip in subnet6 for ip in node_ips6) and ipaddress.ip_address(plan.core_ip6) in subnet6
    for n in plan.nodes.values():
        assert not subnet6.overlaps(ipaddress.ip_network(n.pod_cidr6))
    server = plan.pods["demo/server"]
    assert (server.ip, server.ip6) == ("10.244.2.10", "fd00:10:244:2::10")
    assert ipaddress.ip_address(server.ip6) in ipaddress.ip_network(plan.nodes[server.node].pod_cidr6)
    assert LabPlan.from_dict(plan.to_dict()) == plan
    other = make_plan(topology.load(EXAMPLES / "dualstack"), "ambit-ds02")
    assert other.node_subnet6 != plan.node_subnet6, "the node /64 follows the lab name"


def test_ipv4_plan_is_unchanged_and_old_records_load() -> None:
    plan = make_plan(topology.load(EXAMPLES / "basic"), "ambit-v4")
    assert not plan.dual_stack
    assert all(n.ip6 == n.pod_cidr6 == "" for n in plan.nodes.values())
    assert all(p.ip6 == "" for p in plan.pods.values())
    # A state file written before dual-stack labs existed has none of the IPv6 keys.
    record = plan.to_dict()
    for key in ("core_ip6", "node_subnet6"):
        del record[key]
    for entry in [*record["nodes"].values(), *record["pods"].values()]:
        entry.pop("ip6")
        entry.pop("pod_cidr6", None)
    assert LabPlan.from_dict(record) == plan


def test_services_may_be_dual_stack_or_ipv6_only(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "\n---\n".join(
            [
                N1,
                service("dual", f'{{clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, "fd00:96::1"], {PORTS}}}'),
                service("v6", f'{{clusterIP: "fd00:96::2", {PORTS}}}'),
                service("v4", f"{{clusterIP: 10.96.0.3, {PORTS}}}"),
            ]
        )
    )
    vips = {s.name: (s.cluster_ip, s.cluster_ip6) for s in topology.load(tmp_path).services}
    assert vips == {
        "dual": (ipaddress.ip_address("10.96.0.1"), ipaddress.ip_address("fd00:96::1")),
        "v6": (None, ipaddress.ip_address("fd00:96::2")),
        "v4": (ipaddress.ip_address("10.96.0.3"), None),
    }


def test_ipv6_only_plan_has_ipv6_primary_addresses_and_no_ipv4(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "\n---\n".join(
            [
                node("node1", '{podCIDRs: ["fd00:1::/64"]}'),
                node("node2", '{podCIDR: "fd00:2::/64"}'),
                pod("a", '{podIP: "fd00:1::10"}'),
                pod("b", '{podIPs: [{ip: "fd00:2::10"}]}', on="node2"),
            ]
        )
    )
    plan = make_plan(topology.load(tmp_path), "ambit-v6x")
    assert (plan.ipv4, plan.ipv6, plan.dual_stack) == (False, True, False)
    assert plan.node_subnet == plan.node_subnet6 and plan.core_ip == plan.core_ip6
    assert [(n.ip == n.ip6, n.pod_cidr, n.pod_cidr6) for n in plan.nodes.values()] == [
        (True, "fd00:1::/64", "fd00:1::/64"),
        (True, "fd00:2::/64", "fd00:2::/64"),
    ]
    assert {k: (p.ip, p.ip6) for k, p in plan.pods.items()} == {
        "demo/a": ("fd00:1::10", "fd00:1::10"),
        "demo/b": ("fd00:2::10", "fd00:2::10"),
    }
    assert all(ipaddress.ip_address(n.ip) in ipaddress.ip_network(plan.node_subnet) for n in plan.nodes.values())


@pytest.mark.parametrize(
    ("docs", "expected"),
    [
        pytest.param(
            [node("node1", '{podCIDRs: ["fd00:1::/64"]}'), node("node2", "{podCIDR: 10.244.2.0/24}")],
            [
                "Node/node1: spec.podCIDRs: IPv4 range required: other nodes have one (all or none)",
                "Node/node2: spec.podCIDRs: IPv6 range required: other nodes have one (all or none)",
            ],
            id="ipv6-only-beside-ipv4-node",
        ),
        pytest.param(
            [node("node1", '{podCIDRs: ["fd00:1::/64"]}'), pod("a", "{podIP: 10.244.1.10}")],
            [
                "Pod/demo/a: status.podIPs: no IPv6 address: node 'node1' has fd00:1::/64",
                "Pod/demo/a: status.podIP: 10.244.1.10: node 'node1' has no IPv4 podCIDR",
            ],
            id="ipv4-pod-on-ipv6-only-node",
        ),
        pytest.param(
            [
                'kind: Node\nmetadata: {name: node1}\nspec: {podCIDRs: ["fd00:1::/64"]}\n'
                "status: {addresses: [{type: InternalIP, address: 10.10.0.1}]}\n"
            ],
            ["Node/node1: status.addresses[0]: an IPv6-only lab gives its nodes addresses itself"],
            id="internal-ip-on-ipv6-only-node",
        ),
    ],
)
def test_bad_ipv6_only_input_is_named(tmp_path: Path, docs: list[str], expected: list[str]) -> None:
    assert problems(tmp_path, *docs) == expected
