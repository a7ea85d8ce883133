"""Turn a validated topology and a lab name into concrete names and addresses, without touching the system.

Only network namespace names are global on a machine, so every one of them starts with the lab name; links,
bridges and addresses live inside the lab's namespaces, which is what lets two labs built from the same YAML
(same pod IPs) run side by side.

Wiring (mirrors the eBPF spike's proven topology):
- core netns: bridge ``br0`` holding ``core_ip``; one veth per node enslaved to it; routes to every pod CIDR.
- node netns: uplink ``eth0`` with the node IP on the lab's node subnet; routes to the other nodes' pod CIDRs;
  per pod a host-side veth carrying the link-local gateway and a /32 route to the pod.
- pod netns: ``eth0`` with the /32 pod IP and a default route via the gateway.

A dual-stack lab (nodes with an IPv6 ``spec.podCIDRs`` entry) wires IPv6 the same way beside IPv4: the node link
gets a ULA /64 derived from the lab name (each node and the core take the host number of their IPv4 address in it),
each IPv6 pod CIDR is routed via its node's IPv6 address, and pods get a /128 and a default route via the
link-local gateway ``fe80::1`` on their host-side veth. An IPv6-only lab (nodes with only an IPv6 range) is wired
the same way with no IPv4 at all; its primary fields (``ip``, ``pod_cidr``, ``core_ip``) hold the IPv6 addresses.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from lab.errors import LabConfigError
from lab.topology import Topology

LAB_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
IFNAMSIZ = 15
NODE_UPLINK = "eth0"
POD_IFACE = "eth0"
CORE_BRIDGE = "br0"
# Calico's trick: every pod's default gateway is the same link-local address, present on each host-side veth.
POD_GATEWAY = IPv4Address("169.254.1.1")
POD_GATEWAY6 = IPv6Address("fe80::1")


@dataclass(frozen=True)
class NodeInfo:
    """A lab node as tests and tools see it (addresses as text, ready for sockets and command lines)."""

    ip: str
    netns: str
    pod_cidr: str
    uplink: str
    name: str
    core_link: str  # this node's veth end inside the core netns
    ip6: str = ""  # dual-stack labs only, like pod_cidr6
    pod_cidr6: str = ""


@dataclass(frozen=True)
class PodInfo:
    ip: str
    netns: str  # the node's netns for hostNetwork pods
    node: str
    name: str
    namespace: str
    host_veth: str  # node-side veth; "" for hostNetwork pods
    service_account: str
    labels: dict[str, str]
    host_network: bool
    ip6: str = ""  # the IPv6 address of a pod in a dual-stack lab (its node's for hostNetwork pods)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class LabPlan:
    name: str
    core_netns: str
    core_ip: str
    node_subnet: str
    nodes: dict[str, NodeInfo]
    pods: dict[str, PodInfo]  # by "namespace/name"
    core_ip6: str = ""  # labs with IPv6 only (dual-stack or IPv6-only)
    node_subnet6: str = ""

    @property
    def ipv6(self) -> bool:
        """Whether the lab has IPv6 (dual-stack or IPv6-only)."""
        return bool(self.node_subnet6)

    @property
    def ipv4(self) -> bool:
        """Whether the lab has IPv4; the primary fields (``ip``, ``pod_cidr``, ``core_ip``) of an IPv6-only lab hold
        its IPv6 addresses, as Kubernetes' ``status.podIP`` does in an IPv6-only cluster."""
        return ":" not in self.node_subnet

    @property
    def dual_stack(self) -> bool:
        return self.ipv4 and self.ipv6

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabPlan:
        return cls(
            name=d["name"],
            core_netns=d["core_netns"],
            core_ip=d["core_ip"],
            node_subnet=d["node_subnet"],
            nodes={k: NodeInfo(**v) for k, v in d["nodes"].items()},
            pods={k: PodInfo(**v) for k, v in d["pods"].items()},
            core_ip6=d.get("core_ip6", ""),
            node_subnet6=d.get("node_subnet6", ""),
        )

    @property
    def netns_names(self) -> list[str]:
        """Creation order: core first, then nodes, then pods (deletion can go in any order)."""
        names = [self.core_netns, *(n.netns for n in self.nodes.values())]
        names += [p.netns for p in self.pods.values() if not p.host_network]
        return names


def check_name(name: str) -> None:
    if not LAB_NAME_RE.match(name):
        raise LabConfigError(
            [f"lab name {name!r}: must be 1-32 characters of a-z, 0-9 and '-' (no leading/trailing '-')"]
        )


def _short_hash(text: str, n: int = 4) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def _ifname(prefix: str, base: str, salt: str) -> str:
    """A readable, unique-enough interface name that fits IFNAMSIZ (15)."""
    clean = re.sub(r"[^a-z0-9]", "", base.lower())
    room = IFNAMSIZ - len(prefix) - 5
    name = f"{prefix}{clean[:room]}-{_short_hash(salt)}"
    assert len(name) <= IFNAMSIZ
    return name


def _node_subnet(topo: Topology, lab_name: str) -> IPv4Network:
    """The YAML's InternalIPs decide when given; otherwise a /24 derived from the lab name that avoids pod CIDRs
    and service VIPs (labs are isolated anyway; distinct ranges just make mixed-up output easier to spot)."""
    given = [n.internal_ip for n in topo.nodes.values() if n.internal_ip is not None]
    if given:
        return IPv4Network(f"{given[0]}/24", strict=False)
    taken = [n.pod_cidr for n in topo.nodes.values() if n.pod_cidr is not None]
    vips = [s.cluster_ip for s in topo.services if s.cluster_ip is not None]
    start = int(_short_hash(lab_name, 6), 16)
    for i in range(250):
        subnet = IPv4Network(f"10.{(start + i) % 250 + 1}.0.0/24")
        if not any(subnet.overlaps(c) for c in taken) and not any(v in subnet for v in vips):
            return subnet
    raise LabConfigError([f"{topo.config_dir}: no free 10.x.0.0/24 for node addresses; set Node InternalIPs"])


def _node_subnet6(topo: Topology, lab_name: str) -> IPv6Network | None:
    """For a topology with IPv6, a ULA /64 (fd00::/8) derived from the lab name that avoids the IPv6 pod CIDRs."""
    taken = [n.pod_cidr6 for n in topo.nodes.values() if n.pod_cidr6 is not None]
    if not taken:
        return None
    start = int(_short_hash(lab_name, 12), 16)
    for i in range(250):
        subnet = IPv6Network(((0xFD << 120) | (((start + i) % (1 << 56)) << 64), 64))
        if not any(subnet.overlaps(c) for c in taken):
            return subnet
    raise LabConfigError([f"{topo.config_dir}: no free fd00::/8 /64 for node IPv6 addresses"])


def _mirror(ip: IPv4Address, subnet: IPv4Network, subnet6: IPv6Network | None) -> str:
    """The IPv6 twin of a node-link address: the same host number in the IPv6 node subnet ("" when IPv4 only)."""
    if subnet6 is None:
        return ""
    return str(subnet6.network_address + (int(ip) - int(subnet.network_address)))


def make_plan(topo: Topology, lab_name: str) -> LabPlan:
    check_name(lab_name)
    # An IPv6-only lab numbers its nodes as an IPv4 one would, in the IPv6 node subnet, and configures no IPv4.
    subnet = _node_subnet(topo, lab_name)
    subnet6 = _node_subnet6(topo, lab_name)
    ipv6_only = all(n.pod_cidr is None for n in topo.nodes.values())
    hosts = list(subnet.hosts())
    nodes: dict[str, NodeInfo] = {}
    used: set[IPv4Address] = {n.internal_ip for n in topo.nodes.values() if n.internal_ip is not None}
    free = (h for h in hosts if h not in used)
    for index, spec in enumerate(topo.nodes.values()):
        ip = spec.internal_ip or next(free)
        used.add(ip)
        ip6 = _mirror(ip, subnet, subnet6)
        nodes[spec.name] = NodeInfo(
            name=spec.name,
            netns=f"{lab_name}-node-{spec.name}",
            ip=ip6 if ipv6_only else str(ip),
            pod_cidr=str(spec.pod_cidr or spec.pod_cidr6),
            uplink=NODE_UPLINK,
            core_link=_ifname(f"n{index}", spec.name, spec.name),
            ip6=ip6,
            pod_cidr6=str(spec.pod_cidr6 or ""),
        )
    core_ip = next(h for h in reversed(hosts) if h not in used)
    pods: dict[str, PodInfo] = {}
    veths: dict[tuple[str, str], str] = {}
    for pod in topo.pods:
        node = nodes[pod.node]
        host_veth = "" if pod.host_network else _ifname("v", pod.name, pod.key)
        if host_veth:
            clash = veths.setdefault((pod.node, host_veth), pod.key)
            if clash != pod.key:
                raise LabConfigError(
                    [f"{pod.ref}: metadata.name: veth name {host_veth} collides with pod {clash}; rename one"]
                )
        pods[pod.key] = PodInfo(
            name=pod.name,
            namespace=pod.namespace,
            node=pod.node,
            netns=node.netns if pod.host_network else f"{lab_name}-pod-{pod.namespace}-{pod.name}",
            ip=node.ip if pod.host_network else str(pod.ip or pod.ip6),
            host_veth=host_veth,
            service_account=pod.service_account,
            labels=dict(pod.labels),
            host_network=pod.host_network,
            ip6=node.ip6 if pod.host_network else str(pod.ip6 or ""),
        )
    return LabPlan(
        lab_name,
        f"{lab_name}-core",
        _mirror(core_ip, subnet, subnet6) if ipv6_only else str(core_ip),
        str(subnet6 if ipv6_only else subnet),
        nodes,
        pods,
        core_ip6=_mirror(core_ip, subnet, subnet6),
        node_subnet6=str(subnet6 or ""),
    )
