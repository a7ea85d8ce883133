"""Lab YAML validation: every bad input is reported as `<file>:<Kind>/<ns>/<name>: <field>: <reason>`, all at once,
before anything is created."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from lab import cluster, topology
from lab.errors import LabConfigError
from lab.plan import IFNAMSIZ, make_plan

NODE1 = """
apiVersion: v1
kind: Node
metadata: {name: node1}
spec: {podCIDR: 10.244.1.0/24}
"""
NODE2 = """
apiVersion: v1
kind: Node
metadata: {name: node2}
spec: {podCIDR: 10.244.2.0/24}
"""


def pod(name: str, ip: str | None = "10.244.1.10", node: str | None = "node1", ns: str = "demo") -> str:
    spec = f"nodeName: {node}" if node else "serviceAccountName: sa"
    status = f"status: {{podIP: {ip}}}" if ip else ""
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}}}
spec: {{{spec}}}
{status}
"""


def write(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def problems(tmp_path: Path, files: dict[str, str]) -> list[str]:
    d = write(tmp_path, files)
    with pytest.raises(LabConfigError) as info:
        topology.load(d)
    return info.value.problems


def docs(*parts: str) -> str:
    return "\n---\n".join(parts)


CASES = [
    pytest.param(
        docs(NODE1, pod("a", node=None)),
        ["{f}:Pod/demo/a: spec.nodeName: required"],
        id="missing-nodeName",
    ),
    pytest.param(
        docs(NODE1, pod("a", node="node9")),
        ["{f}:Pod/demo/a: spec.nodeName: node 'node9' is not defined by any Node object"],
        id="unknown-node",
    ),
    pytest.param(
        docs(NODE1, pod("a"), pod("b")),
        ["{f}:Pod/demo/b: status.podIP: 10.244.1.10 is already used by {f}:Pod/demo/a"],
        id="duplicate-pod-ip",
    ),
    pytest.param(
        docs(NODE1, pod("a", ip="10.244.2.10")),
        ["{f}:Pod/demo/a: status.podIP: 10.244.2.10 is outside node 'node1' podCIDR 10.244.1.0/24"],
        id="pod-ip-outside-node-cidr",
    ),
    pytest.param(
        docs(NODE1, pod("a", ip="10.244.1.0")),
        ["{f}:Pod/demo/a: status.podIP: 10.244.1.0 is the network or broadcast address of 10.244.1.0/24"],
        id="pod-ip-network-address",
    ),
    pytest.param(
        docs(NODE1, pod("a", ip=None)),
        ["{f}:Pod/demo/a: status.podIP: required (the lab does not allocate pod addresses)"],
        id="missing-pod-ip",
    ),
    pytest.param(
        docs(NODE1, pod("a", ip="not-an-ip")),
        ["{f}:Pod/demo/a: status.podIP: 'not-an-ip' is not an IP address"],
        id="bad-pod-ip",
    ),
    pytest.param(
        docs(NODE1, NODE2.replace("10.244.2.0/24", "10.244.1.128/25")),
        ["{f}:Node/node2: spec.podCIDR: 10.244.1.128/25 overlaps {f}:Node/node1 podCIDR 10.244.1.0/24"],
        id="overlapping-pod-cidrs",
    ),
    pytest.param(
        docs(NODE1.replace("10.244.1.0/24", "10.244.1.5/24")),
        ["{f}:Node/node1: spec.podCIDR: '10.244.1.5/24' is not a network address (10.244.1.5/24 has host bits set)"],
        id="cidr-host-bits",
    ),
    pytest.param(
        docs(NODE1.replace("spec: {podCIDR: 10.244.1.0/24}", "")),
        ["{f}:Node/node1: spec.podCIDR: required"],
        id="missing-pod-cidr",
    ),
    pytest.param(
        docs(NODE1, "kind: Deployment\nmetadata: {name: x, namespace: demo}\n"),
        [
            "{f}:Deployment/demo/x: kind: unknown kind 'Deployment' (known: AuthorizationPolicy, EndpointSlice, "
            "Gateway, HTTPRoute, Namespace, Node, PeerAuthentication, Pod, RequestAuthentication, Service, "
            "ServiceEntry, WorkloadEntry)"
        ],
        id="unknown-kind",
    ),
    pytest.param(
        docs(NODE1, "apiVersion: v1\nmetadata: {name: x}\n"),
        ["{f}:?/default/x: kind: required"],
        id="missing-kind",
    ),
    pytest.param(
        docs(NODE1, "kind: Pod\nmetadata: {namespace: demo}\nspec: {nodeName: node1}\n"),
        ["{f}:Pod/demo/?: metadata.name: required"],
        id="missing-name",
    ),
    pytest.param(
        docs(NODE1, pod("a"), pod("a", ip="10.244.1.11")),
        ["{f}:Pod/demo/a: metadata.name: duplicate of the object in {f}"],
        id="duplicate-object",
    ),
    pytest.param(
        docs(
            NODE1,
            "kind: Service\nmetadata: {name: s, namespace: demo}\n"
            "spec: {clusterIP: 10.244.1.99, ports: [{port: 80, targetPort: 8080}]}\n",
        ),
        ["{f}:Service/demo/s: spec.clusterIP: 10.244.1.99 is inside {f}:Node/node1 podCIDR 10.244.1.0/24"],
        id="service-vip-in-pod-cidr",
    ),
    pytest.param(
        docs(NODE1, "kind: Service\nmetadata: {name: s, namespace: demo}\nspec: {ports: [{port: 70000}]}\n"),
        ["{f}:Service/demo/s: spec.ports[0].port: 70000 is not a port number (1-65535)"],
        id="service-bad-port",
    ),
    pytest.param(
        docs(NODE1, "kind: Service\nmetadata: {name: s, namespace: demo}\nspec: {selector: {app: x}}\n"),
        ["{f}:Service/demo/s: spec.ports: required (a non-empty list)"],
        id="service-no-ports",
    ),
    pytest.param(
        docs(NODE1, "kind: Namespace\nmetadata: {name: demo, labels: {enrolled: true}}\n"),
        ["{f}:Namespace/demo: metadata.labels: must be a mapping of strings to strings (quote values like 'true')"],
        id="non-string-label",
    ),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_bad_input_names_file_object_and_field(tmp_path: Path, text: str, expected: list[str]) -> None:
    f = str(tmp_path / "cluster.yaml")
    assert problems(tmp_path, {"cluster.yaml": text}) == [e.format(f=f) for e in expected]


def test_every_problem_is_reported_in_one_run(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        {
            "a-nodes.yaml": NODE1,
            "b-pods.yaml": docs(pod("a", node=None), pod("b", ip="10.9.9.9")),
        },
    )
    b = tmp_path / "b-pods.yaml"
    assert found == [
        f"{b}:Pod/demo/a: spec.nodeName: required",
        f"{b}:Pod/demo/b: status.podIP: 10.9.9.9 is outside node 'node1' podCIDR 10.244.1.0/24",
    ]
    assert str(b) in str(LabConfigError(found))


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    found = problems(tmp_path, {"a.yaml": NODE1, "broken.yaml": "kind: Pod\nmetadata: {name: [unclosed\n"})
    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path / 'broken.yaml'}: yaml: ")


def test_hidden_and_non_yaml_files_are_ignored(tmp_path: Path) -> None:
    files = {"c.yaml": docs(NODE1, pod("a")), ".#c.yaml": "garbage: [", "README.md": "kind: Nonsense"}
    topo = topology.load(write(tmp_path, files))
    assert [p.key for p in topo.pods] == ["demo/a"]


def test_no_nodes_is_an_error(tmp_path: Path) -> None:
    found = problems(tmp_path, {"ns.yaml": "kind: Namespace\nmetadata: {name: demo}\n"})
    assert found == [f"{tmp_path}: kind: no Node objects: a lab needs at least one node"]


def test_controller_kinds_pass_through(tmp_path: Path) -> None:
    policy = (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: demo}\n"
        "spec: {action: DENY, rules: [{}]}\n"
    )
    topo = topology.load(write(tmp_path, {"c.yaml": docs(NODE1, pod("a"), policy)}))
    assert [str(r) for r in topo.controller_objects] == [f"{tmp_path / 'c.yaml'}:AuthorizationPolicy/demo/p"]
    assert [p.key for p in topo.pods] == ["demo/a"]


def test_example_cluster_is_valid() -> None:
    topo = topology.load(Path(__file__).parents[2] / "examples" / "basic")
    assert set(topo.nodes) == {"node1", "node2"}
    assert topo.namespace_labels("demo") == {"istio.io/dataplane-mode": "ambient"}
    assert topo.namespace_labels("legacy") == {}
    by_key = {p.key: p for p in topo.pods}
    client = by_key["demo/client"]
    nodes_of_demo = {p.node for p in topo.pods if p.namespace == "demo"}
    assert nodes_of_demo == {"node1", "node2"}
    assert any(p.node == client.node and p.key != client.key and p.namespace == "demo" for p in topo.pods)


def test_invalid_config_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lab.up must fail on validation before claiming a name, creating a netns or starting anything."""
    touched: list[str] = []
    monkeypatch.setattr(cluster, "_claim", lambda plan: touched.append("claim"))
    monkeypatch.setattr(cluster.netns, "add", lambda name: touched.append(name))
    d = write(tmp_path, {"c.yaml": docs(NODE1, pod("a", node=None))})
    with pytest.raises(LabConfigError):
        cluster.Lab.up(d, name="ambit-unit")
    assert touched == []


def test_plan_names_fit_and_carry_the_lab_prefix(tmp_path: Path) -> None:
    long_pod = pod("a-very-long-pod-name-that-goes-on", ip="10.244.1.20")
    topo = topology.load(write(tmp_path, {"c.yaml": docs(NODE1, NODE2, pod("a"), long_pod)}))
    plan = make_plan(topo, "ambit-1a2b")
    assert all(n.startswith("ambit-1a2b-") for n in plan.netns_names)
    assert len(set(plan.netns_names)) == len(plan.netns_names) == 1 + 2 + 2
    links = [p.host_veth for p in plan.pods.values()] + [n.core_link for n in plan.nodes.values()]
    assert all(0 < len(link) <= IFNAMSIZ for link in links)
    assert len(set(links)) == len(links)
    other = make_plan(topo, "ambit-ffff")
    assert not set(plan.netns_names) & set(other.netns_names)


def test_plan_derives_node_addresses_outside_pod_cidrs(tmp_path: Path) -> None:
    topo = topology.load(write(tmp_path, {"c.yaml": docs(NODE1, NODE2, pod("a"))}))
    plan = make_plan(topo, "ambit-0000")
    subnet = ipaddress.ip_network(plan.node_subnet)
    assert not any(subnet.overlaps(ipaddress.ip_network(n.pod_cidr)) for n in plan.nodes.values())
    assert all(ipaddress.ip_address(n.ip) in subnet for n in plan.nodes.values())
    ips = [n.ip for n in plan.nodes.values()] + [plan.core_ip]
    assert len(set(ips)) == 3


@pytest.mark.parametrize("name", ["", "UPPER", "-lead", "trail-", "has_underscore", "x" * 33])
def test_bad_lab_names_are_rejected(tmp_path: Path, name: str) -> None:
    topo = topology.load(write(tmp_path, {"c.yaml": docs(NODE1, pod("a"))}))
    with pytest.raises(LabConfigError, match="lab name"):
        make_plan(topo, name)


def test_host_network_pod_lives_in_its_node(tmp_path: Path) -> None:
    node = NODE1.replace("spec:", "status: {addresses: [{type: InternalIP, address: 10.50.0.7}]}\nspec:")
    host_pod = "kind: Pod\nmetadata: {name: h, namespace: kube-system}\nspec: {nodeName: node1, hostNetwork: true}\n"
    topo = topology.load(write(tmp_path, {"c.yaml": docs(node, host_pod)}))
    plan = make_plan(topo, "ambit-0001")
    h = plan.pods["kube-system/h"]
    assert (h.ip, h.netns, h.host_veth) == ("10.50.0.7", plan.nodes["node1"].netns, "")
    assert plan.node_subnet == "10.50.0.0/24" and plan.core_ip == "10.50.0.254"
    assert h.netns not in plan.netns_names[1 + len(plan.nodes) :]  # no netns of its own
