"""Typed, validated configuration objects: what the controller understands of the Kubernetes/Istio YAML users write.

Objects are immutable (frozen dataclasses holding tuples and read-only mappings), so the translator can keep the
previous version of every object and compare old with new to work out what a change affects. They are produced
only by controller/validation.py; everything here is already checked.

Naming convention for cluster-scoped kinds (Namespace, Node): their `ObjectKey.namespace` is the empty string.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, NamedTuple

EMPTY: Mapping[str, str] = MappingProxyType({})
NO_PORTS: Mapping[str, int] = MappingProxyType({})


def _no_labels() -> Mapping[str, str]:
    return EMPTY


def _no_ports() -> Mapping[str, int]:
    return NO_PORTS


CLUSTER_SCOPED_KINDS = frozenset({"Namespace", "Node"})


class ObjectKey(NamedTuple):
    """Identity of one config object; `namespace` is "" for cluster-scoped kinds.

    A NamedTuple rather than a dataclass: keys are hashed and compared in every index, and tuples do that in C.
    """

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Meta:
    name: str
    namespace: str = ""
    labels: Mapping[str, str] = field(default_factory=_no_labels)
    annotations: Mapping[str, str] = field(default_factory=_no_labels)
    uid: str = ""
    # RFC 3339 text as the API server writes it; "" when absent (sorts as oldest, like Go's zero time).
    creation_timestamp: str = ""
    deleting: bool = False
    owner_kind: str = ""
    owner_name: str = ""


@dataclass(frozen=True, slots=True)
class Namespace:
    meta: Meta
    kind: Literal["Namespace"] = "Namespace"

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, "", self.meta.name)


@dataclass(frozen=True, slots=True)
class Node:
    meta: Meta
    pod_cidrs: tuple[str, ...] = ()
    internal_ips: tuple[str, ...] = ()
    kind: Literal["Node"] = "Node"

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, "", self.meta.name)


@dataclass(frozen=True, slots=True)
class ContainerPort:
    port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class Pod:
    meta: Meta
    node_name: str = ""
    service_account: str = "default"
    host_network: bool = False
    ips: tuple[str, ...] = ()
    # Pending, Running, Succeeded, Failed, Unknown; "" when the source does not say (lab files): treated as Running.
    phase: str = ""
    # Value of the Ready condition ("True"/"False"/"Unknown"); "" when absent.
    ready: str = ""
    container_ports: tuple[ContainerPort, ...] = ()
    kind: Literal["Pod"] = "Pod"

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.meta.namespace, self.meta.name)

    @property
    def terminal(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    name: str = ""
    protocol: str = "TCP"
    # int: a port number; str: a container port name; None: same as `port`.
    target_port: int | str | None = None
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class Service:
    meta: Meta
    # None: no selector (endpoints managed elsewhere). Never empty when present.
    selector: Mapping[str, str] | None = None
    ports: tuple[ServicePort, ...] = ()
    cluster_ips: tuple[str, ...] = ()
    headless: bool = False
    type: str = "ClusterIP"
    # How ztunnel picks endpoints (istiod's constructService): Local = this node's only; PreferClose = closest first.
    internal_traffic_policy: str = "Cluster"
    traffic_distribution: str = ""
    publish_not_ready_addresses: bool = False
    ip_families: tuple[str, ...] = ()
    kind: Literal["Service"] = "Service"

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.meta.namespace, self.meta.name)


SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of an EndpointSlice. Conditions are None when the slice does not say (Kubernetes: unknown,
    which consumers read as ready)."""

    addresses: tuple[str, ...]
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None
    # targetRef, "" when absent; its namespace defaults to the slice's.
    target_kind: str = ""
    target_namespace: str = ""
    target_name: str = ""
    target_uid: str = ""
    node_name: str = ""
    zone: str = ""
    hostname: str = ""


@dataclass(frozen=True, slots=True)
class EndpointPort:
    # The Service port's name ("" for its unnamed port) and the port the endpoints serve it on; None: all ports.
    name: str = ""
    port: int | None = None
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """discovery.k8s.io/v1: the endpoints of the Service named by label kubernetes.io/service-name."""

    meta: Meta
    address_type: str = "IPv4"  # IPv4, IPv6 or FQDN
    endpoints: tuple[Endpoint, ...] = ()
    ports: tuple[EndpointPort, ...] = ()
    kind: Literal["EndpointSlice"] = "EndpointSlice"

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.meta.namespace, self.meta.name)

    @property
    def service_name(self) -> str:
        """The Service these endpoints belong to; "" when the slice belongs to none."""
        return self.meta.labels.get(SERVICE_NAME_LABEL, "")


@dataclass(frozen=True, slots=True)
class WorkloadEntrySpec:
    """The spec of a WorkloadEntry, also used inline as a ServiceEntry endpoint."""

    address: str = ""
    ports: Mapping[str, int] = field(default_factory=_no_ports)
    labels: Mapping[str, str] = field(default_factory=_no_labels)
    network: str = ""
    locality: str = ""
    weight: int = 0
    service_account: str = ""


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    meta: Meta
    spec: WorkloadEntrySpec
    kind: Literal["WorkloadEntry"] = "WorkloadEntry"

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.meta.namespace, self.meta.name)


@dataclass(frozen=True, slots=True)
class ServiceEntryPort:
    number: int
    protocol: str = ""
    name: str = ""
    target_port: int = 0


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    meta: Meta
    hosts: tuple[str, ...]
    addresses: tuple[str, ...] = ()
    ports: tuple[ServiceEntryPort, ...] = ()
    location: str = "MESH_EXTERNAL"
    resolution: str = "NONE"
    endpoints: tuple[WorkloadEntrySpec, ...] = ()
    workload_selector: Mapping[str, str] | None = None
    subject_alt_names: tuple[str, ...] = ()
    kind: Literal["ServiceEntry"] = "ServiceEntry"

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.meta.namespace, self.meta.name)


@dataclass(frozen=True, slots=True)
class Source:
    """AuthorizationPolicy `from.source`; field names follow the CRD (snake_case)."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    """AuthorizationPolicy `to.operation`; ports are kept as validated numbers."""

    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    from_: tuple[Source, ...] = ()
    to: tuple[Operation, ...] = ()
    when: tuple[Condition, ...] = ()
    # Fields (and `when` keys) of a newer Istio that this code cannot evaluate, accepted from the API server only:
    # the rule is then treated as needing attributes the agent lacks (an ALLOW rule is dropped), never as if the
    # restriction were absent.
    unsupported: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    meta: Meta
    # None: no selector (namespace or mesh wide); a mapping (possibly empty) selects workloads by labels.
    selector: Mapping[str, str] | None = None
    # Policies bound with targetRef(s) belong to waypoints and are not sent to node agents.
    has_target_refs: bool = False
    action: str = "ALLOW"  # ALLOW, DENY, AUDIT or CUSTOM
    provider: str = ""
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    kind: Literal["AuthorizationPolicy"] = "AuthorizationPolicy"

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.meta.namespace, self.meta.name)


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    meta: Meta
    # None or an empty mapping: namespace wide. In the root namespace None is mesh wide; an empty mapping only
    # covers the root namespace itself (istiod fetches only selector-less root policies for other namespaces).
    selector: Mapping[str, str] | None = None
    mode: str = "UNSET"  # UNSET, DISABLE, PERMISSIVE, STRICT
    port_level: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))  # port -> mode
    kind: Literal["PeerAuthentication"] = "PeerAuthentication"

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.meta.namespace, self.meta.name)


@dataclass(frozen=True, slots=True)
class OpaqueObject:
    """Accepted and stored but not translated yet: Gateway, HTTPRoute, RequestAuthentication."""

    kind: str
    api_version: str
    meta: Meta
    spec: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.meta.namespace, self.meta.name)


KObject = (
    Namespace
    | Node
    | Pod
    | Service
    | EndpointSlice
    | ServiceEntry
    | WorkloadEntry
    | AuthorizationPolicy
    | PeerAuthentication
    | OpaqueObject
)
