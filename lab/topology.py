"""Load and validate a lab cluster from a directory of Kubernetes-style YAML objects.

The same directory feeds ``ambit-controller --config-dir``, so the lab understands only the objects it builds
(Node, Namespace, Pod, Service) and lets the controller's kinds through untouched. Everything is checked before
the lab creates anything, and every problem is reported at once as ``<file>:<Kind>/<ns>/<name>: <field>: <reason>``
so a broken file never leaves half a cluster behind.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import yaml

from lab.errors import LabConfigError

LAB_KINDS = frozenset({"Node", "Namespace", "Pod", "Service"})
# Kinds the controller reads from the same directory; the lab has nothing to build for them.
CONTROLLER_KINDS = frozenset(
    {
        "AuthorizationPolicy",
        "PeerAuthentication",
        "RequestAuthentication",
        "ServiceEntry",
        "WorkloadEntry",
        "EndpointSlice",
        "Gateway",
        "HTTPRoute",
    }
)
CLUSTER_SCOPED = frozenset({"Node", "Namespace"})
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class ObjectRef:
    """Where an object came from; renders as the prefix of every error about it."""

    file: str
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        scope = self.name if self.kind in CLUSTER_SCOPED else f"{self.namespace}/{self.name}"
        return f"{self.file}:{self.kind}/{scope}"


@dataclass(frozen=True)
class NodeSpec:
    """A node's pod ranges, one per family (``spec.podCIDRs``): IPv4 (``pod_cidr``), IPv6 (``pod_cidr6``) or both;
    every node of a lab has the same families."""

    name: str
    pod_cidr: IPv4Network | None
    internal_ip: IPv4Address | None
    ref: ObjectRef
    pod_cidr6: IPv6Network | None = None


@dataclass(frozen=True)
class NamespaceSpec:
    name: str
    labels: dict[str, str]


@dataclass(frozen=True)
class PodSpec:
    name: str
    namespace: str
    node: str
    ip: IPv4Address | None  # None for hostNetwork pods (their node's address) and on IPv6-only nodes
    service_account: str
    labels: dict[str, str]
    host_network: bool
    ref: ObjectRef
    ip6: IPv6Address | None = None  # the IPv6 entry of status.podIPs on a dual-stack node

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target_port: int | str
    protocol: str


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    namespace: str
    cluster_ip: IPv4Address | None
    selector: dict[str, str]
    ports: list[ServicePort]
    ref: ObjectRef
    cluster_ip6: IPv6Address | None = None  # of a dual-stack or IPv6-only Service (spec.clusterIPs)


@dataclass
class Topology:
    config_dir: Path
    nodes: dict[str, NodeSpec] = field(default_factory=dict)
    namespaces: dict[str, NamespaceSpec] = field(default_factory=dict)
    pods: list[PodSpec] = field(default_factory=list)
    services: list[ServiceSpec] = field(default_factory=list)
    controller_objects: list[ObjectRef] = field(default_factory=list)

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        ns = self.namespaces.get(namespace)
        return dict(ns.labels) if ns else {}


class _Problems:
    """Collects problems instead of raising on the first, so one run reports every mistake."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: ObjectRef | str, fld: str, reason: str) -> None:
        self.items.append(f"{where}: {fld}: {reason}")


@dataclass
class _Raw:
    ref: ObjectRef
    body: dict[str, Any]


def load(config_dir: str | Path) -> Topology:
    """Parse and validate ``config_dir``; raise :class:`LabConfigError` listing every problem."""
    root = Path(config_dir)
    problems = _Problems()
    if not root.is_dir():
        raise LabConfigError([f"{root}: not a directory"])
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix in YAML_SUFFIXES and not p.name.startswith(".")  # skip editor temp files
    )
    if not files:
        raise LabConfigError([f"{root}: no *.yaml files"])
    raws = list(_read_objects(files, problems))
    topo = Topology(config_dir=root)
    _check_duplicates(raws, problems)
    for raw in raws:
        kind = raw.ref.kind
        if kind == "Node":
            node = _parse_node(raw, problems)
            if node and node.name not in topo.nodes:
                topo.nodes[node.name] = node
        elif kind == "Namespace":
            topo.namespaces[raw.ref.name] = NamespaceSpec(raw.ref.name, _labels(raw, "metadata.labels", problems))
    for raw in raws:
        if raw.ref.kind == "Pod":
            pod = _parse_pod(raw, topo, problems)
            if pod:
                topo.pods.append(pod)
        elif raw.ref.kind == "Service":
            svc = _parse_service(raw, problems)
            if svc:
                topo.services.append(svc)
        elif raw.ref.kind in CONTROLLER_KINDS:
            topo.controller_objects.append(raw.ref)
    _check_addresses(topo, problems)
    if not topo.nodes and not problems.items:
        problems.add(str(root), "kind", "no Node objects: a lab needs at least one node")
    if problems.items:
        raise LabConfigError(problems.items)
    return topo


def _read_objects(files: list[Path], problems: _Problems) -> Iterator[_Raw]:
    for path in files:
        fname = str(path)
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, UnicodeDecodeError) as e:
            problems.add(fname, "file", f"unreadable: {e}")
            continue
        except yaml.YAMLError as e:
            problems.add(fname, "yaml", str(e).replace("\n", " "))
            continue
        for index, doc in enumerate(docs):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                problems.add(f"{fname}:document[{index}]", "document", "not a mapping (expected a Kubernetes object)")
                continue
            meta = doc.get("metadata")
            meta = meta if isinstance(meta, dict) else {}
            kind = doc.get("kind")
            name = meta.get("name")
            ns = meta.get("namespace", "default")
            ref = ObjectRef(
                fname,
                kind if isinstance(kind, str) and kind else "?",
                ns if isinstance(ns, str) else "?",
                name if isinstance(name, str) and name else "?",
            )
            if ref.kind == "?":
                problems.add(ref, "kind", "required")
                continue
            if ref.kind not in LAB_KINDS and ref.kind not in CONTROLLER_KINDS:
                known = ", ".join(sorted(LAB_KINDS | CONTROLLER_KINDS))
                problems.add(ref, "kind", f"unknown kind {ref.kind!r} (known: {known})")
                continue
            if not isinstance(doc.get("metadata"), dict):
                problems.add(ref, "metadata", "required (a mapping)")
                continue
            if ref.name == "?":
                problems.add(ref, "metadata.name", "required")
                continue
            if ref.namespace == "?":
                problems.add(ref, "metadata.namespace", "must be a string")
                continue
            yield _Raw(ref, doc)


def _check_duplicates(raws: list[_Raw], problems: _Problems) -> None:
    seen: dict[tuple[str, str, str], ObjectRef] = {}
    for raw in raws:
        ns = "" if raw.ref.kind in CLUSTER_SCOPED else raw.ref.namespace
        key = (raw.ref.kind, ns, raw.ref.name)
        first = seen.setdefault(key, raw.ref)
        if first is not raw.ref:
            problems.add(raw.ref, "metadata.name", f"duplicate of the object in {first.file}")


def _get(body: Mapping[str, Any], path: str) -> Any:
    cur: Any = body
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


def _labels(raw: _Raw, path: str, problems: _Problems) -> dict[str, str]:
    value = _get(raw.body, path)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        problems.add(raw.ref, path, "must be a mapping of strings to strings (quote values like 'true')")
        return {}
    return dict(value)


def _ipv4(raw: _Raw, path: str, value: Any, problems: _Problems) -> IPv4Address | None:
    try:
        addr = ipaddress.ip_address(value if isinstance(value, str) else "")
    except ValueError:
        problems.add(raw.ref, path, f"{value!r} is not an IP address")
        return None
    if not isinstance(addr, IPv4Address):
        problems.add(raw.ref, path, f"{value} is IPv6; only the IPv4 address may be given here")
        return None
    return addr


def _families(
    raw: _Raw,
    path: str,
    values: list[Any],
    parse: Any,
    what: str,
    problems: _Problems,
    indexed: bool = True,
    detail: bool = False,
) -> tuple[Any, Any] | None:
    """Split a dual-stack list (``spec.podCIDRs``, ``status.podIPs``, ``spec.clusterIPs``) into its IPv4 and IPv6
    entries, as Kubernetes allows them: at most one of each family, in either order. ``parse`` turns one text into
    an address or network (raising ValueError); ``indexed`` is false for a single value given without its list
    (``spec.podCIDR``); ``detail`` adds the parser's reason (worth it for a network's host bits)."""
    found: dict[int, Any] = {}
    for i, text in enumerate(values):
        where = f"{path}[{i}]" if indexed else path
        try:
            value = parse(text if isinstance(text, str) else "")
        except ValueError as e:
            problems.add(raw.ref, where, f"{text!r} is not {what}" + (f" ({e})" if detail else ""))
            return None
        if value.version in found:
            problems.add(raw.ref, where, f"a second IPv{value.version} entry (at most one per family)")
            return None
        found[value.version] = value
    return found.get(4), found.get(6)


def _parse_node(raw: _Raw, problems: _Problems) -> NodeSpec | None:
    cidr_text = _get(raw.body, "spec.podCIDR")
    cidrs_texts = _get(raw.body, "spec.podCIDRs")
    if cidrs_texts is not None and (not isinstance(cidrs_texts, list) or not cidrs_texts):
        problems.add(raw.ref, "spec.podCIDRs", "must be a non-empty list of network addresses")
        return None
    if cidr_text is None and cidrs_texts is None:
        problems.add(raw.ref, "spec.podCIDR", "required")
        return None
    if cidr_text is not None and cidrs_texts is not None and cidrs_texts[0] != cidr_text:
        problems.add(raw.ref, "spec.podCIDRs", f"the first entry {cidrs_texts[0]!r} must equal spec.podCIDR")
        return None
    split = _families(
        raw,
        "spec.podCIDRs" if cidrs_texts is not None else "spec.podCIDR",
        cidrs_texts or [cidr_text],
        lambda t: ipaddress.ip_network(t, strict=True),
        "a network address",
        problems,
        indexed=cidrs_texts is not None,
        detail=True,
    )
    if split is None:
        return None
    cidr, cidr6 = split
    internal: IPv4Address | None = None
    addresses = _get(raw.body, "status.addresses") or []
    if not isinstance(addresses, list):
        problems.add(raw.ref, "status.addresses", "must be a list")
        return None
    for i, entry in enumerate(addresses):
        if isinstance(entry, dict) and entry.get("type") == "InternalIP":
            if cidr is None:
                problems.add(raw.ref, f"status.addresses[{i}]", "an IPv6-only lab gives its nodes addresses itself")
                return None
            internal = _ipv4(raw, f"status.addresses[{i}].address", entry.get("address"), problems)
            if internal is None:
                return None
    return NodeSpec(raw.ref.name, cidr, internal, raw.ref, cidr6)


def _parse_pod(raw: _Raw, topo: Topology, problems: _Problems) -> PodSpec | None:
    ok = True
    node_name = _get(raw.body, "spec.nodeName")
    if not isinstance(node_name, str) or not node_name:
        problems.add(raw.ref, "spec.nodeName", "required")
        ok = False
    elif node_name not in topo.nodes:
        problems.add(raw.ref, "spec.nodeName", f"node {node_name!r} is not defined by any Node object")
        ok = False
    host_network = _get(raw.body, "spec.hostNetwork") or False
    if not isinstance(host_network, bool):
        problems.add(raw.ref, "spec.hostNetwork", "must be true or false")
        ok = False
    sa = _get(raw.body, "spec.serviceAccountName") or "default"
    if not isinstance(sa, str):
        problems.add(raw.ref, "spec.serviceAccountName", "must be a string")
        ok = False
    ip_text = _get(raw.body, "status.podIP")
    ips_entries = _get(raw.body, "status.podIPs")
    ip: IPv4Address | None = None
    ip6: IPv6Address | None = None
    if ips_entries is not None:
        texts = (
            [e.get("ip") if isinstance(e, dict) else None for e in ips_entries] if isinstance(ips_entries, list) else []
        )
        if not texts:
            problems.add(raw.ref, "status.podIPs", "must be a non-empty list of {ip: ADDRESS}")
            ok = False
        elif ip_text is not None and texts[0] != ip_text:
            problems.add(raw.ref, "status.podIPs", f"the first entry {texts[0]!r} must equal status.podIP")
            ok = False
        elif host_network:
            problems.add(raw.ref, "status.podIPs", "a hostNetwork pod uses its node's addresses; omit it")
            ok = False
        else:
            split = _families(raw, "status.podIPs", texts, ipaddress.ip_address, "an IP address", problems)
            if split is None:
                ok = False
            else:
                ip, ip6 = split
    elif ip_text is None:
        if not host_network:
            problems.add(raw.ref, "status.podIP", "required (the lab does not allocate pod addresses)")
            ok = False
    elif host_network:
        ip = _ipv4(raw, "status.podIP", ip_text, problems)
        ok = ok and ip is not None
    else:
        split = _families(
            raw, "status.podIP", [ip_text], ipaddress.ip_address, "an IP address", problems, indexed=False
        )
        if split is None:
            ok = False
        else:
            ip, ip6 = split
    labels = _labels(raw, "metadata.labels", problems)
    if not ok:
        return None
    assert isinstance(node_name, str) and isinstance(sa, str)
    return PodSpec(raw.ref.name, raw.ref.namespace, node_name, ip, sa, labels, bool(host_network), raw.ref, ip6)


def _parse_service(raw: _Raw, problems: _Problems) -> ServiceSpec | None:
    ok = True
    cluster_ip: IPv4Address | None = None
    cluster_ip6: IPv6Address | None = None
    ip_text = _get(raw.body, "spec.clusterIP")
    ips_texts = _get(raw.body, "spec.clusterIPs")
    if ips_texts is not None and (not isinstance(ips_texts, list) or not ips_texts):
        problems.add(raw.ref, "spec.clusterIPs", "must be a non-empty list of IP addresses")
        ok = False
    elif ips_texts is not None and ip_text is not None and ips_texts[0] != ip_text:
        problems.add(raw.ref, "spec.clusterIPs", f"the first entry {ips_texts[0]!r} must equal spec.clusterIP")
        ok = False
    elif (ips_texts or [ip_text])[0] not in (None, "None", ""):
        split = _families(
            raw,
            "spec.clusterIPs" if ips_texts is not None else "spec.clusterIP",
            ips_texts or [ip_text],
            ipaddress.ip_address,
            "an IP address",
            problems,
            indexed=ips_texts is not None,
        )
        if split is None:
            ok = False
        else:
            cluster_ip, cluster_ip6 = split
    selector = _labels(raw, "spec.selector", problems)
    raw_ports = _get(raw.body, "spec.ports")
    ports: list[ServicePort] = []
    if not isinstance(raw_ports, list) or not raw_ports:
        problems.add(raw.ref, "spec.ports", "required (a non-empty list)")
        return None
    for i, p in enumerate(raw_ports):
        where = f"spec.ports[{i}]"
        if not isinstance(p, dict):
            problems.add(raw.ref, where, "must be a mapping")
            ok = False
            continue
        port = p.get("port")
        if not isinstance(port, int) or not _is_port(port):
            problems.add(raw.ref, f"{where}.port", f"{port!r} is not a port number (1-65535)")
            ok = False
            continue
        target = p.get("targetPort", port)
        if not (isinstance(target, int | str) and (_is_port(target) or (isinstance(target, str) and target))):
            problems.add(raw.ref, f"{where}.targetPort", f"{target!r} is neither a port number nor a port name")
            ok = False
            continue
        protocol = p.get("protocol", "TCP")
        if protocol not in ("TCP", "UDP", "SCTP"):
            problems.add(raw.ref, f"{where}.protocol", f"{protocol!r} is not TCP, UDP or SCTP")
            ok = False
            continue
        ports.append(ServicePort(str(p.get("name", "")), port, target, protocol))
    if not ok:
        return None
    return ServiceSpec(raw.ref.name, raw.ref.namespace, cluster_ip, selector, ports, raw.ref, cluster_ip6)


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def _check_addresses(topo: Topology, problems: _Problems) -> None:
    """Cross-object address rules: the lab routes by pod CIDR, so overlaps would silently misroute."""
    nodes = list(topo.nodes.values())
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            if a.pod_cidr is not None and b.pod_cidr is not None and a.pod_cidr.overlaps(b.pod_cidr):
                problems.add(b.ref, "spec.podCIDR", f"{b.pod_cidr} overlaps {a.ref} podCIDR {a.pod_cidr}")
            if a.pod_cidr6 is not None and b.pod_cidr6 is not None and a.pod_cidr6.overlaps(b.pod_cidr6):
                problems.add(b.ref, "spec.podCIDRs", f"{b.pod_cidr6} overlaps {a.ref} podCIDRs {a.pod_cidr6}")
    for version, has in ((4, lambda n: n.pod_cidr is not None), (6, lambda n: n.pod_cidr6 is not None)):
        if any(has(n) for n in nodes):
            for n in nodes:
                if not has(n):
                    problems.add(
                        n.ref, "spec.podCIDRs", f"IPv{version} range required: other nodes have one (all or none)"
                    )
    with_ip = [n for n in nodes if n.internal_ip is not None]
    if with_ip and len(with_ip) != len(nodes):
        for n in nodes:
            if n.internal_ip is None:
                problems.add(n.ref, "status.addresses", "InternalIP required: other nodes set one (all or none)")
    if with_ip:
        subnet = ipaddress.ip_network(f"{with_ip[0].internal_ip}/24", strict=False)
        seen_node_ip: dict[IPv4Address, NodeSpec] = {}
        for n in with_ip:
            assert n.internal_ip is not None
            if n.internal_ip not in subnet:
                problems.add(
                    n.ref, "status.addresses", f"InternalIP {n.internal_ip} is outside {subnet} of {with_ip[0].ref}"
                )
            if n.internal_ip in seen_node_ip:
                problems.add(
                    n.ref,
                    "status.addresses",
                    f"InternalIP {n.internal_ip} is already used by {seen_node_ip[n.internal_ip].ref}",
                )
            seen_node_ip[n.internal_ip] = n
            for other in nodes:
                if other.pod_cidr is not None and n.internal_ip in other.pod_cidr:
                    problems.add(n.ref, "status.addresses", f"InternalIP {n.internal_ip} is inside {other.ref} podCIDR")
    seen_ip: dict[IPv4Address, PodSpec] = {}
    seen_ip6: dict[IPv6Address, PodSpec] = {}
    for pod in topo.pods:
        node = topo.nodes[pod.node]
        if pod.host_network:
            if pod.ip is not None and pod.ip != node.internal_ip:
                problems.add(
                    pod.ref, "status.podIP", "a hostNetwork pod's podIP must be omitted or equal its node's InternalIP"
                )
            continue
        for version, mine, node_cidr in ((4, pod.ip, node.pod_cidr), (6, pod.ip6, node.pod_cidr6)):
            if mine is None and node_cidr is not None:
                problems.add(pod.ref, "status.podIPs", f"no IPv{version} address: node {node.name!r} has {node_cidr}")
        if pod.ip is not None:
            _check_pod_ip(pod, node, seen_ip, problems)
        if pod.ip6 is not None:
            _check_pod_ip6(pod, node, seen_ip6, problems)
    for field_name, cidr_name, vip_of, cidr_of in (
        ("spec.clusterIP", "podCIDR", lambda s: s.cluster_ip, lambda n: n.pod_cidr),
        ("spec.clusterIPs", "podCIDRs", lambda s: s.cluster_ip6, lambda n: n.pod_cidr6),
    ):
        seen_vip: dict[IPv4Address | IPv6Address, ServiceSpec] = {}
        for svc in topo.services:
            vip = vip_of(svc)
            if vip is None:
                continue
            for node in nodes:
                cidr = cidr_of(node)
                if cidr is not None and vip in cidr:
                    problems.add(svc.ref, field_name, f"{vip} is inside {node.ref} {cidr_name} {cidr}")
            first_svc = seen_vip.setdefault(vip, svc)
            if first_svc is not svc:
                problems.add(svc.ref, field_name, f"{vip} is already used by {first_svc.ref}")


def _check_pod_ip(pod: PodSpec, node: NodeSpec, seen: dict[IPv4Address, PodSpec], problems: _Problems) -> None:
    assert pod.ip is not None
    if node.pod_cidr is None:
        problems.add(pod.ref, "status.podIP", f"{pod.ip}: node {node.name!r} has no IPv4 podCIDR")
    elif pod.ip not in node.pod_cidr:
        problems.add(pod.ref, "status.podIP", f"{pod.ip} is outside node {node.name!r} podCIDR {node.pod_cidr}")
    elif pod.ip in (node.pod_cidr.network_address, node.pod_cidr.broadcast_address):
        problems.add(pod.ref, "status.podIP", f"{pod.ip} is the network or broadcast address of {node.pod_cidr}")
    first = seen.setdefault(pod.ip, pod)
    if first is not pod:
        problems.add(pod.ref, "status.podIP", f"{pod.ip} is already used by {first.ref}")


def _check_pod_ip6(pod: PodSpec, node: NodeSpec, seen: dict[IPv6Address, PodSpec], problems: _Problems) -> None:
    assert pod.ip6 is not None
    if node.pod_cidr6 is None:
        problems.add(pod.ref, "status.podIPs", f"{pod.ip6}: node {node.name!r} has no IPv6 podCIDR")
    elif pod.ip6 not in node.pod_cidr6:
        problems.add(pod.ref, "status.podIPs", f"{pod.ip6} is outside node {node.name!r} podCIDRs {node.pod_cidr6}")
    elif pod.ip6 == node.pod_cidr6.network_address:
        problems.add(pod.ref, "status.podIPs", f"{pod.ip6} is the subnet-router anycast address of {node.pod_cidr6}")
    first = seen.setdefault(pod.ip6, pod)
    if first is not pod:
        problems.add(pod.ref, "status.podIPs", f"{pod.ip6} is already used by {first.ref}")
