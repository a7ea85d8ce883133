"""Incremental translation of validated config objects into the workload API (Address and Authorization resources).

Why incremental: at 10,000 workloads a change to one pod must not rebuild everything. The translator keeps the
current objects plus indexes (labels -> workloads, selector label -> services and selector policies, namespace ->
workloads, node -> pods) and, for each apply(), works out which resources a change can affect, rebuilds only those
and reports the ones whose protobuf actually changed.

Resource names follow istiod: a workload by its uid (`<cluster>//Pod/<ns>/<name>`,
`<cluster>/networking.istio.io/WorkloadEntry/<ns>/<name>`,
`<cluster>/networking.istio.io/ServiceEntry/<ns>/<name>/<address>`,
`<cluster>/discovery.k8s.io/EndpointSlice/<ns>/<name>/<address>`), a service by `<ns>/<hostname>`, a policy by
`<ns>/<name>`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from api.istio.security import authorization_pb2 as authz_pb
from api.istio.workload import workload_pb2 as wl
from controller import translate_policy
from controller.model import (
    AuthorizationPolicy,
    Endpoint,
    EndpointSlice,
    KObject,
    Namespace,
    Node,
    ObjectKey,
    OpaqueObject,
    PeerAuthentication,
    Pod,
    Service,
    ServiceEntry,
    WorkloadEntry,
    WorkloadEntrySpec,
)

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
# An entry that terminates HBONE itself (a VM running its own tunnel endpoint), as istiod's SupportsTunnel. Not
# applied to pods: the node agent captures every HBONE pod on its node, and a pod terminating HBONE must not be.
TUNNEL_LABEL = "networking.istio.io/tunnel"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
# Written by Istio's sidecar injector; istio-cni never enrolls such a pod (enablement_selector.go podHasSidecar).
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
# Names the workload whatever owns the pod or entry (istio/api label.ServiceWorkloadName).
WORKLOAD_NAME_LABEL = "service.istio.io/workload-name"
AUTO_REGISTRATION_GROUP_ANNOTATION = "istio.io/autoRegistrationGroup"
_CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")
# A Deployment's, then an Argo Rollout's, pod-template hash: the suffix of the ReplicaSet's name.
_TEMPLATE_HASH_LABELS = ("pod-template-hash", "rollouts-pod-template-hash")
_DEPLOYMENT_CONFIG_LABEL = "deploymentconfig"
# A CronJob's Job: `<cronjob>-<scheduled time in minutes>` (istiod's cronJobNameRegexp; ASCII digits as Go's \d).
_CRONJOB_RUN = re.compile(r"(.+)-[0-9]{8,10}\Z")
_REGION_LABEL = "topology.kubernetes.io/region"
_ZONE_LABEL = "topology.kubernetes.io/zone"
_SUBZONE_LABEL = "topology.istio.io/subzone"
_APP_PROTOCOLS = {
    "http": wl.HTTP11,
    "http2": wl.HTTP2,
    "kubernetes.io/h2c": wl.HTTP2,
    "grpc": wl.GRPC,
    "tcp": wl.TCP,
    "tls": wl.TLS,
}
# A selector anchor matching every workload of a namespace (empty selector).
_ALL = ("", "")
TRAFFIC_DISTRIBUTION_ANNOTATION = "networking.istio.io/traffic-distribution"
_IP_FAMILIES = {(): wl.AUTOMATIC, ("IPv4",): wl.IPV4_ONLY, ("IPv6",): wl.IPV6_ONLY}
_LB = wl.LoadBalancing
# spec.trafficDistribution -> failover order (the annotation takes the same names in any case). PreferSameZone is
# Kubernetes 1.33's name for PreferClose; PreferSameNode ranks the client's own node first (istiod's
# GetTrafficDistribution).
_CLOSE = [_LB.NETWORK, _LB.REGION, _LB.ZONE, _LB.SUBZONE]
_TRAFFIC_DISTRIBUTIONS: Mapping[str, list[wl.LoadBalancing.Scope]] = {
    "PreferClose": _CLOSE,
    "PreferSameZone": _CLOSE,
    "PreferSameNode": [*_CLOSE, _LB.NODE],
}
_TRAFFIC_DISTRIBUTION_ANNOTATIONS = {name.lower(): order for name, order in _TRAFFIC_DISTRIBUTIONS.items()}

Labels = Mapping[str, str]
_B = TypeVar("_B", str, tuple[str, str], tuple[str, str, str])
# A pod an EndpointSlice endpoint names by targetRef: (namespace, name, uid).
_PodRef = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class TranslatorConfig:
    cluster_id: str = "Kubernetes"
    root_namespace: str = "istio-system"
    trust_domain: str = "cluster.local"
    domain_suffix: str = "cluster.local"
    network: str = ""


@dataclass
class Delta:
    """Changed resources; a value of None means the resource was removed."""

    addresses: dict[str, wl.Address | None] = field(default_factory=dict)
    authorizations: dict[str, authz_pb.Authorization | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.addresses or self.authorizations)


def _matches(selector: Labels, labels: Labels) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _anchor(selector: Labels) -> tuple[str, str]:
    """One label pair every match must carry, used as the index key for a selector."""
    return min(selector.items()) if selector else _ALL


def _load_balancing(obj: Service | ServiceEntry, has_slices: bool = False) -> wl.LoadBalancing | None:
    """How ztunnel is to pick this service's endpoints, as istiod's constructService sets it: PreferClose or
    PreferSameZone (the field, or the annotation also ServiceEntries may carry) ranks by network, region, zone,
    subzone with failover, PreferSameNode then by node;
    internalTrafficPolicy Local keeps to the client's node strictly; publishNotReadyAddresses sends to endpoints
    that are not ready; a ServiceEntry with resolution NONE, or a Service without a selector that no EndpointSlice
    serves (`has_slices`), passes connections through. None: any healthy endpoint."""
    if isinstance(obj, ServiceEntry) and obj.resolution == "NONE":
        # Connections go to the address the client dialled; ztunnel picks no endpoint for a PASSTHROUGH service
        # (without it, a service with no endpoints refuses every connection: NoHealthyUpstream).
        return _LB(mode=_LB.PASSTHROUGH, health_policy=_LB.ALLOW_ALL)
    if isinstance(obj, Service) and obj.selector is None and not has_slices:
        # Endpoints managed outside Kubernetes' selector, with no EndpointSlice read for them (yet): the VIP is
        # passed through, for kube-proxy to route as it would without the mesh, instead of being refused for want
        # of endpoints. Once a slice serves it, its endpoints are workloads (istiod's EndpointSlice workloads) and
        # the agents balance over them like over pods.
        return _LB(mode=_LB.PASSTHROUGH)
    annotation = obj.meta.annotations.get(TRAFFIC_DISTRIBUTION_ANNOTATION, "")
    preference = _TRAFFIC_DISTRIBUTION_ANNOTATIONS.get(annotation.lower())
    lb: wl.LoadBalancing | None = None
    if isinstance(obj, Service):
        if obj.traffic_distribution:
            preference = _TRAFFIC_DISTRIBUTIONS.get(obj.traffic_distribution)
        if obj.internal_traffic_policy == "Local":
            lb = _LB(routing_preference=[_LB.NODE], mode=_LB.STRICT)
    if lb is None and preference:
        lb = _LB(routing_preference=preference, mode=_LB.FAILOVER)
    if isinstance(obj, Service) and obj.publish_not_ready_addresses:
        lb = lb or _LB()
        lb.health_policy = _LB.ALLOW_ALL
    return lb


def _packed(ip: str) -> bytes:
    """Raw address bytes; inet_pton because ipaddress is ten times slower and this runs per workload."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError as exc:
        raise ValueError(f"{ip!r} is not an IP address") from exc


def _workload_labels(obj: Pod | WorkloadEntry | ServiceEntry) -> Labels:
    """Labels policies and services select on, and that name the workload. A WorkloadEntry's metadata labels win
    over its spec labels, as istiod merges them (ConvertClientWorkloadEntry)."""
    if isinstance(obj, WorkloadEntry) and obj.spec.labels:
        return {**obj.spec.labels, **obj.meta.labels}
    return obj.meta.labels


class Translator:
    """Holds the config and the resources built from it; apply() moves both forward and returns what changed.

    Not thread-safe; call from one task.
    """

    def __init__(self, config: TranslatorConfig | None = None) -> None:
        self.config = config or TranslatorConfig()
        self._objects: dict[ObjectKey, KObject] = {}
        self._namespaces: dict[str, Namespace] = {}
        self._nodes: dict[str, Node] = {}
        # Workload sources (Pod, WorkloadEntry, ServiceEntry) by namespace and by (namespace, label, value).
        self._subjects_by_ns: dict[str, set[ObjectKey]] = {}
        self._label_index: dict[tuple[str, str, str], set[ObjectKey]] = {}
        self._pods_by_node: dict[str, set[ObjectKey]] = {}
        # Services and ServiceEntries with a selector, by (namespace, anchor label, value).
        self._service_selectors: dict[tuple[str, str, str], set[ObjectKey]] = {}
        # Selector-scoped authorization policies that are sent to agents, by (namespace, anchor label, value).
        self._policy_selectors: dict[tuple[str, str, str], set[ObjectKey]] = {}
        self._peer_auths_by_ns: dict[str, set[ObjectKey]] = {}
        # EndpointSlices by the (namespace, Service name) they serve, and by the (namespace, name) of each pod their
        # endpoints name by targetRef.
        self._slices_by_service: dict[tuple[str, str], set[ObjectKey]] = {}
        self._slices_by_pod: dict[tuple[str, str], set[ObjectKey]] = {}
        # Identities of non-terminal pods per node, for the CA's node authorization.
        self._identities_by_node: dict[str, Counter[tuple[str, str]]] = {}
        # Output state.
        self._addresses: dict[str, wl.Address] = {}
        self._authorizations: dict[str, authz_pb.Authorization] = {}
        self._owned_workloads: dict[ObjectKey, set[str]] = {}
        self._owned_services: dict[ObjectKey, dict[str, wl.Service]] = {}
        self._service_claims: dict[str, set[ObjectKey]] = {}
        self._names_by_hostname: dict[str, set[str]] = {}  # hostname -> its "<ns>/<hostname>" services
        self._converted_pas: set[str] = set()
        self._warnings: dict[ObjectKey, str] = {}
        # Per-rebuild memos keyed by (namespace, labels): workloads with equal labels select the same things.
        self._memo_services: dict[tuple[str, frozenset[tuple[str, str]]], list[Service | ServiceEntry]] = {}
        self._memo_policies: dict[tuple[str, frozenset[tuple[str, str]]], list[str]] = {}
        # Per-apply work lists.
        self._dirty_workloads: set[ObjectKey] = set()
        self._dirty_services: set[ObjectKey] = set()
        self._dirty_policies: set[ObjectKey] = set()
        self._peer_auth_dirty = False

    # --- public API -------------------------------------------------------------------------------------------

    def apply(self, upserts: Iterable[KObject], deletes: Iterable[ObjectKey] = ()) -> Delta:
        """Apply upserted objects, then deletions; rebuild only what they affect."""
        for obj in upserts:
            old = self._objects.get(obj.key)
            if old == obj:
                continue
            if old is not None:
                self._forget(old)
            self._objects[obj.key] = obj
            self._remember(obj)
            self._mark(old, obj)
        for key in deletes:
            gone = self._objects.pop(key, None)
            if gone is not None:
                self._forget(gone)
                self._mark(gone, None)
        return self._rebuild()

    def addresses(self) -> dict[str, wl.Address]:
        return dict(self._addresses)

    def authorizations(self) -> dict[str, authz_pb.Authorization]:
        return dict(self._authorizations)

    def objects(self) -> dict[ObjectKey, KObject]:
        return dict(self._objects)

    @property
    def warnings(self) -> dict[ObjectKey, str]:
        """Objects accepted with a caveat (e.g. an unsupported action), with the reason; current state."""
        return dict(self._warnings)

    def pod_identities_on_node(self, node: str) -> set[tuple[str, str]]:
        """(namespace, service account) of every non-terminal pod scheduled on `node`."""
        return set(self._identities_by_node.get(node, ()))

    def has_pod(self, node: str, namespace: str, service_account: str) -> bool:
        return self._identities_by_node.get(node, Counter())[(namespace, service_account)] > 0

    # --- indexes ----------------------------------------------------------------------------------------------

    def _remember(self, obj: KObject) -> None:
        self._index(obj, add=True)

    def _forget(self, obj: KObject) -> None:
        self._index(obj, add=False)

    def _index(self, obj: KObject, add: bool) -> None:
        key = obj.key
        ns = key.namespace
        caveat = _waypoint_caveat(obj)
        if caveat and add:
            self._warnings[key] = caveat
        elif caveat:
            self._warnings.pop(key, None)
        if isinstance(obj, Namespace):
            if add:
                self._namespaces[obj.meta.name] = obj
            else:
                self._namespaces.pop(obj.meta.name, None)
        elif isinstance(obj, Node):
            if add:
                self._nodes[obj.meta.name] = obj
            else:
                self._nodes.pop(obj.meta.name, None)
        elif isinstance(obj, PeerAuthentication):
            _toggle(self._peer_auths_by_ns, ns, key, add)
        elif isinstance(obj, AuthorizationPolicy) and obj.selector is not None and translate_policy.sent_to_agents(obj):
            _toggle(self._policy_selectors, (ns, *_anchor(obj.selector)), key, add)
        if isinstance(obj, EndpointSlice) and obj.service_name:
            _toggle(self._slices_by_service, (ns, obj.service_name), key, add)
            for pod_ns, pod_name, _ in _slice_pod_refs(obj):
                _toggle(self._slices_by_pod, (pod_ns, pod_name), key, add)
        if isinstance(obj, Service) and obj.selector:
            _toggle(self._service_selectors, (ns, *_anchor(obj.selector)), key, add)
        if isinstance(obj, ServiceEntry) and obj.workload_selector is not None:
            _toggle(self._service_selectors, (ns, *_anchor(obj.workload_selector)), key, add)
        if isinstance(obj, Pod | WorkloadEntry | ServiceEntry):
            _toggle(self._subjects_by_ns, ns, key, add)
            for label in _workload_labels(obj).items():
                _toggle(self._label_index, (ns, *label), key, add)
        if isinstance(obj, Pod):
            _toggle(self._pods_by_node, obj.node_name, key, add)
            if obj.node_name and not obj.terminal:
                counter = self._identities_by_node.setdefault(obj.node_name, Counter())
                counter[(ns, obj.service_account)] += 1 if add else -1
                if counter[(ns, obj.service_account)] <= 0:
                    del counter[(ns, obj.service_account)]
                if not counter:
                    del self._identities_by_node[obj.node_name]

    def _selected(
        self, namespace: str, selector: Labels, kinds: tuple[str, ...], all_namespaces: bool = False
    ) -> set[ObjectKey]:
        """Workload sources of `kinds` in `namespace` (or every namespace) whose labels match `selector`."""
        namespaces = list(self._subjects_by_ns) if all_namespaces else [namespace]
        out: set[ObjectKey] = set()
        for ns in namespaces:
            if not selector:
                candidates = self._subjects_by_ns.get(ns, set())
            else:
                buckets = [self._label_index.get((ns, k, v), set()) for k, v in selector.items()]
                candidates = set.intersection(*buckets) if all(buckets) else set()
            out.update(key for key in candidates if key.kind in kinds)
        return out

    # --- dependency marking -----------------------------------------------------------------------------------

    def _mark(self, old: KObject | None, new: KObject | None) -> None:
        """Record which resources `old` -> `new` can change (either may be None)."""
        obj = new if new is not None else old
        assert obj is not None
        ns = obj.key.namespace
        if isinstance(obj, Pod | WorkloadEntry):
            self._dirty_workloads.add(obj.key)
        elif isinstance(obj, Namespace):
            old_labels = old.meta.labels if old is not None else {}
            new_labels = new.meta.labels if new is not None else {}
            if old_labels.get(DATAPLANE_MODE_LABEL) != new_labels.get(DATAPLANE_MODE_LABEL):
                self._dirty_workloads.update(k for k in self._subjects_by_ns.get(obj.meta.name, ()) if k.kind == "Pod")
        elif isinstance(obj, Node):
            if _locality_of(old) != _locality_of(new):
                self._dirty_workloads.update(self._pods_by_node.get(obj.meta.name, ()))
        elif isinstance(obj, Service):
            self._dirty_services.add(obj.key)
            if _same_membership(old, new):
                return
            for svc in (old, new):
                if isinstance(svc, Service) and svc.selector:
                    self._dirty_workloads.update(self._selected(ns, svc.selector, ("Pod", "WorkloadEntry")))
            # Its EndpointSlices' workloads map its ports, and pods its slices name carry it.
            for slice_key in self._slices_by_service.get((ns, obj.meta.name), ()):
                self._dirty_workloads.add(slice_key)
                slc = self._objects.get(slice_key)
                if isinstance(slc, EndpointSlice):
                    self._dirty_workloads.update(
                        ObjectKey("Pod", p_ns, p_name) for p_ns, p_name, _ in _slice_pod_refs(slc)
                    )
        elif isinstance(obj, EndpointSlice):
            self._dirty_workloads.add(obj.key)
            for slc in (old, new):
                if not isinstance(slc, EndpointSlice):
                    continue
                svc = self._objects.get(ObjectKey("Service", ns, slc.service_name))
                if isinstance(svc, Service) and svc.selector is None:
                    self._dirty_services.add(svc.key)  # whether it is passed through depends on its slices
            # Pods that joined or left the slice gain or lose its Service (a change of readiness touches none).
            old_refs = _slice_pod_refs(old) if isinstance(old, EndpointSlice) else set()
            new_refs = _slice_pod_refs(new) if isinstance(new, EndpointSlice) else set()
            if (
                isinstance(old, EndpointSlice)
                and isinstance(new, EndpointSlice)
                and old.service_name != new.service_name
            ):
                changed = old_refs | new_refs
            else:
                changed = old_refs ^ new_refs
            self._dirty_workloads.update(ObjectKey("Pod", p_ns, p_name) for p_ns, p_name, _ in changed)
        elif isinstance(obj, ServiceEntry):
            self._dirty_services.add(obj.key)
            self._dirty_workloads.add(obj.key)
            for se in (old, new):
                if isinstance(se, ServiceEntry) and se.workload_selector is not None:
                    self._dirty_workloads.update(self._selected(ns, se.workload_selector, ("Pod", "WorkloadEntry")))
        elif isinstance(obj, AuthorizationPolicy):
            self._dirty_policies.add(obj.key)
            if _same_attachment(old, new):
                return
            every_ns = ns == self.config.root_namespace
            for pol in (old, new):
                if isinstance(pol, AuthorizationPolicy) and pol.selector is not None:
                    self._dirty_workloads.update(self._selected(ns, pol.selector, _SUBJECT_KINDS, every_ns))
        elif isinstance(obj, PeerAuthentication):
            self._peer_auth_dirty = True
            for pa in (old, new):
                if not isinstance(pa, PeerAuthentication):
                    continue
                if pa.selector:
                    self._dirty_workloads.update(self._selected(ns, pa.selector, _SUBJECT_KINDS))
                elif ns == self.config.root_namespace:
                    for keys in self._subjects_by_ns.values():
                        self._dirty_workloads.update(keys)
                else:
                    self._dirty_workloads.update(self._subjects_by_ns.get(ns, ()))

    # --- rebuilding -------------------------------------------------------------------------------------------

    def _rebuild(self) -> Delta:
        delta = Delta()
        try:
            self._rebuild_policies(delta)
            self._rebuild_services(delta)
            for key in self._dirty_workloads:
                self._rebuild_workloads(key, delta)
        finally:
            # An object that fails to build (a bug, or something validation let through) costs its own change; kept
            # dirty, it would fail every later apply() too and no config change would reach the agents again.
            self._dirty_policies.clear()
            self._peer_auth_dirty = False
            self._dirty_services.clear()
            self._dirty_workloads.clear()
            self._memo_services.clear()
            self._memo_policies.clear()
        return delta

    def _set_address(self, name: str, value: wl.Address | None, delta: Delta) -> None:
        old = self._addresses.get(name)
        if value is None:
            if old is not None:
                del self._addresses[name]
                delta.addresses[name] = None
        elif old is None or old != value:
            self._addresses[name] = value
            delta.addresses[name] = value

    def _set_authorization(self, name: str, value: authz_pb.Authorization | None, delta: Delta) -> None:
        old = self._authorizations.get(name)
        if value is None:
            if old is not None:
                del self._authorizations[name]
                delta.authorizations[name] = None
        elif old is None or old != value:
            self._authorizations[name] = value
            delta.authorizations[name] = value

    def _rebuild_policies(self, delta: Delta) -> None:
        root = self.config.root_namespace
        for key in self._dirty_policies:
            name = f"{key.namespace}/{key.name}"
            policy = self._objects.get(key)
            self._warnings.pop(key, None)
            if not isinstance(policy, AuthorizationPolicy):
                self._set_authorization(name, None, delta)
                continue
            converted = translate_policy.convert_authorization_policy(policy, root)
            if converted.warning:
                self._warnings[key] = converted.warning
            self._set_authorization(name, converted.authorization, delta)
        self._dirty_policies.clear()
        if not self._peer_auth_dirty:
            return
        self._peer_auth_dirty = False
        peer_auths = [
            pa
            for keys in self._peer_auths_by_ns.values()
            for key in keys
            if isinstance(pa := self._objects[key], PeerAuthentication)
        ]
        static_name = f"{root}/{translate_policy.STATIC_STRICT_NAME}"
        self._set_authorization(static_name, translate_policy.static_strict_policy(root) if peer_auths else None, delta)
        converted_names: set[str] = set()
        for pa in peer_auths:
            self._warnings.pop(pa.key, None)
            if warning := translate_policy.peer_authentication_warning(pa):
                self._warnings[pa.key] = warning
            candidates = self._peer_auth_candidates(pa.meta.namespace)
            mesh, ns_cfg = translate_policy.mesh_and_namespace_policies(candidates, pa.meta.namespace, root)
            pa_policy = translate_policy.convert_peer_authentication(pa, ns_cfg, mesh, root)
            if pa_policy is not None:
                name = f"{pa_policy.namespace}/{pa_policy.name}"
                converted_names.add(name)
                self._set_authorization(name, pa_policy, delta)
        for name in self._converted_pas - converted_names:
            self._set_authorization(name, None, delta)
        self._converted_pas = converted_names
        for key in [k for k in self._warnings if k.kind == "PeerAuthentication" and k not in self._objects]:
            del self._warnings[key]

    def _peer_auth_candidates(self, namespace: str) -> list[PeerAuthentication]:
        keys = self._peer_auths_by_ns.get(namespace, set()) | self._peer_auths_by_ns.get(
            self.config.root_namespace, set()
        )
        return [pa for key in keys if isinstance(pa := self._objects.get(key), PeerAuthentication)]

    def _rebuild_services(self, delta: Delta) -> None:
        touched: set[str] = set()
        for key in self._dirty_services:
            obj = self._objects.get(key)
            built = self._build_services(obj) if isinstance(obj, Service | ServiceEntry) else {}
            previous = self._owned_services.pop(key, {})
            for name in previous.keys() - built.keys():
                claims = self._service_claims.get(name, set())
                claims.discard(key)
                if not claims:
                    self._service_claims.pop(name, None)
                    _toggle_name(self._names_by_hostname, name, add=False)
            for name in built:
                self._service_claims.setdefault(name, set()).add(key)
                _toggle_name(self._names_by_hostname, name, add=True)
            if built:
                self._owned_services[key] = built
            touched |= previous.keys() | built.keys()
        self._dirty_services.clear()
        for name in touched:
            if name not in self._service_claims:
                self._set_address(name, None, delta)
        # Which namespace's service is canonical for a hostname depends on every namespace's: redo whole hostnames.
        for hostname in {name.partition("/")[2] for name in touched}:
            names = self._names_by_hostname.get(hostname, set())
            winners = {name: min(self._service_claims[name], key=self._service_precedence) for name in names}
            canonical = min(winners, key=lambda n: (*self._service_precedence(winners[n]), n), default=None)
            for name, winner in winners.items():
                service = self._owned_services[winner][name]
                if name == canonical and not service.canonical:
                    service = wl.Service(canonical=True)
                    service.MergeFrom(self._owned_services[winner][name])
                self._set_address(name, wl.Address(service=service), delta)

    def _service_precedence(self, key: ObjectKey) -> tuple[int, str, str]:
        """Kubernetes Services win over ServiceEntries for the same hostname; then the oldest ServiceEntry.

        The same order picks, among the namespaces serving one hostname, the service marked `canonical` (istiod's
        selectWorkloadServices): the one clients of other namespaces reach at a VIP or name several share."""
        obj = self._objects[key]
        return (0 if key.kind == "Service" else 1, obj.meta.creation_timestamp, key.name)

    def _build_services(self, obj: Service | ServiceEntry) -> dict[str, wl.Service]:
        ns = obj.meta.namespace
        network = self.config.network
        if isinstance(obj, Service):
            if obj.type == "ExternalName":
                return {}
            hostname = self.service_hostname(obj.meta.name, ns)
            ports = [
                wl.Port(
                    service_port=p.port,
                    target_port=p.target_port if isinstance(p.target_port, int) else (0 if p.target_port else p.port),
                    app_protocol=_APP_PROTOCOLS.get(p.app_protocol.lower(), wl.UNKNOWN),
                )
                for p in obj.ports
                if p.protocol == "TCP"
            ]
            addresses = [wl.NetworkAddress(network=network, address=_packed(ip)) for ip in obj.cluster_ips]
            service = wl.Service(
                name=obj.meta.name,
                namespace=ns,
                hostname=hostname,
                addresses=addresses,
                ports=ports,
                load_balancing=_load_balancing(obj, self._has_slices(obj)),
                ip_families=_IP_FAMILIES.get(obj.ip_families, wl.DUAL),
                canonical=True,  # istiod: a Kubernetes Service is always canonical for its hostname
            )
            return {f"{ns}/{hostname}": service}
        se_ports = [wl.Port(service_port=p.number, target_port=p.target_port) for p in obj.ports]
        se_addresses = []
        for text in obj.addresses:
            if "/" in text:
                net = ipaddress.ip_network(text, strict=False)
                if net.prefixlen != net.max_prefixlen:
                    addr = wl.NetworkAddress(network=network, address=net.network_address.packed, length=net.prefixlen)
                    se_addresses.append(addr)
                    continue
                text = str(net.network_address)
            se_addresses.append(wl.NetworkAddress(network=network, address=_packed(text)))
        return {
            f"{ns}/{host}": wl.Service(
                name=obj.meta.name,
                namespace=ns,
                hostname=host,
                addresses=se_addresses,
                ports=se_ports,
                subject_alt_names=obj.subject_alt_names,
                load_balancing=_load_balancing(obj),
            )
            for host in obj.hosts
        }

    def _has_slices(self, svc: Service) -> bool:
        """Whether an EndpointSlice that can list addresses serves `svc` (even an empty one: none are ready)."""
        return any(
            isinstance(slc := self._objects.get(key), EndpointSlice) and slc.address_type != "FQDN"
            for key in self._slices_by_service.get((svc.meta.namespace, svc.meta.name), ())
        )

    def service_hostname(self, name: str, namespace: str) -> str:
        return f"{name}.{namespace}.svc.{self.config.domain_suffix}"

    def _rebuild_workloads(self, key: ObjectKey, delta: Delta) -> None:
        obj = self._objects.get(key)
        built: dict[str, wl.Address] = {}
        if isinstance(obj, Pod):
            address = self._build_pod(obj)
            if address is not None:
                built[address.workload.uid] = address
        elif isinstance(obj, WorkloadEntry):
            address = self._build_entry(obj, obj.spec, self.workload_entry_uid(obj), set(), obj.meta.name)
            built[address.workload.uid] = address
        elif isinstance(obj, ServiceEntry):
            for spec, hosts in self._service_entry_endpoints(obj):
                uid = self.service_entry_uid(obj, spec.address)
                if uid not in built:
                    built[uid] = self._build_entry(obj, spec, uid, hosts, obj.meta.name)
        elif isinstance(obj, EndpointSlice):
            built = self._build_slice_workloads(obj)
        previous = self._owned_workloads.pop(key, set())
        for uid in previous - built.keys():
            self._set_address(uid, None, delta)
        for uid, address in built.items():
            self._set_address(uid, address, delta)
        if built:
            self._owned_workloads[key] = set(built)

    # --- workloads --------------------------------------------------------------------------------------------

    def pod_uid(self, namespace: str, name: str) -> str:
        return f"{self.config.cluster_id}//Pod/{namespace}/{name}"

    def workload_entry_uid(self, entry: WorkloadEntry) -> str:
        return f"{self.config.cluster_id}/networking.istio.io/WorkloadEntry/{entry.meta.namespace}/{entry.meta.name}"

    def service_entry_uid(self, entry: ServiceEntry, address: str) -> str:
        ns, name = entry.meta.namespace, entry.meta.name
        return f"{self.config.cluster_id}/networking.istio.io/ServiceEntry/{ns}/{name}/{address}"

    def endpoint_slice_uid(self, slc: EndpointSlice, address: str) -> str:
        ns, name = slc.meta.namespace, slc.meta.name
        return f"{self.config.cluster_id}/discovery.k8s.io/EndpointSlice/{ns}/{name}/{address}"

    def _slice_service(self, slc: EndpointSlice) -> Service | None:
        """The Service a slice serves, when it exists and is one ztunnel balances (not ExternalName)."""
        if not slc.service_name or slc.address_type == "FQDN":
            return None
        svc = self._objects.get(ObjectKey("Service", slc.meta.namespace, slc.service_name))
        return svc if isinstance(svc, Service) and svc.type != "ExternalName" else None

    def _build_slice_workloads(self, slc: EndpointSlice) -> dict[str, wl.Address]:
        """istiod's EndpointSlice workloads: one per endpoint that is not a pod (a pod is its own, richer workload),
        known only by its addresses. Nothing says who it is, so it is out of the mesh (no tunnel, no identity, no
        policy); its address may be shared (a node, a load balancer), hence HOST_NETWORK, which no agent treats as
        owning the address. Ports: each slice port serves the Service port of its name on its own number."""
        svc = self._slice_service(slc)
        if svc is None:
            return {}
        ns = slc.meta.namespace
        service_ports = {p.name: p.port for p in svc.ports if p.protocol == "TCP"}
        ports = [
            wl.Port(service_port=service_ports[p.name], target_port=p.port)
            for p in slc.ports
            if p.port is not None and p.protocol == "TCP" and p.name in service_ports
        ]
        service_name = f"{ns}/{self.service_hostname(svc.meta.name, ns)}"
        built: dict[str, wl.Address] = {}
        for endpoint in slc.endpoints:
            if endpoint.target_kind == "Pod":
                continue
            uid = self.endpoint_slice_uid(slc, endpoint.addresses[0])
            if uid in built:
                continue  # the same address twice in one slice: one workload, as istiod
            address = wl.Address(
                workload=dict(
                    uid=uid,
                    name=slc.meta.name,
                    namespace=ns,
                    addresses=[_packed(ip) for ip in endpoint.addresses],
                    network=self.config.network,
                    trust_domain=self._trust_domain(),
                    # Kubernetes: an unset condition is unknown, read as ready.
                    status=wl.UNHEALTHY if endpoint.ready is False else wl.HEALTHY,
                    cluster_id=self.config.cluster_id,
                    network_mode=wl.HOST_NETWORK,
                )
            )
            address.workload.services[service_name].ports.extend(ports)
            built[uid] = address
        return built

    def _slice_services_of(self, pod: Pod) -> list[Service]:
        """Services whose EndpointSlices name `pod` by targetRef (istiod's matchingServicesWithoutSelectors): how a
        pod joins a Service without a selector whose endpoints another controller keeps."""
        meta = pod.meta
        found: dict[str, Service] = {}
        for key in self._slices_by_pod.get((meta.namespace, meta.name), ()):
            slc = self._objects.get(key)
            if not isinstance(slc, EndpointSlice):
                continue
            svc = self._slice_service(slc)
            if svc is None or svc.meta.name in found:
                continue
            if any(_names_pod(slc, endpoint, pod) for endpoint in slc.endpoints):
                found[svc.meta.name] = svc
        return [found[name] for name in sorted(found)]

    def _enrolled(self, pod: Pod) -> bool:
        """istio-cni's default enablement: the pod's label says `ambient`, or its namespace's does and the pod's is
        not `none` (any other pod value defers to the namespace). A pod with an injected sidecar is never captured:
        it already has a proxy, and both would wrap its traffic."""
        if pod.host_network or SIDECAR_STATUS_ANNOTATION in pod.meta.annotations:
            return False
        mode = pod.meta.labels.get(DATAPLANE_MODE_LABEL)
        if mode in ("ambient", "none"):
            return mode == "ambient"
        namespace = self._namespaces.get(pod.meta.namespace)
        return namespace is not None and namespace.meta.labels.get(DATAPLANE_MODE_LABEL) == "ambient"

    def _build_pod(self, pod: Pod) -> wl.Address | None:
        # Fields go in through a dict so the Workload is built inside its Address, not copied into it.
        if pod.terminal or not pod.ips:
            return None
        meta = pod.meta
        workload_name = _pod_workload_name(pod)
        canonical_name, canonical_revision = _canonical(meta.labels, workload_name)
        healthy = not meta.deleting and pod.phase in ("", "Running") and pod.ready in ("", "True")
        fields = dict(
            uid=self.pod_uid(meta.namespace, meta.name),
            name=meta.name,
            namespace=meta.namespace,
            addresses=[_packed(ip) for ip in pod.ips],
            network=self.config.network,
            tunnel_protocol=wl.HBONE if self._enrolled(pod) else wl.NONE,
            trust_domain=self._trust_domain(),
            service_account="" if pod.service_account == "default" else pod.service_account,
            node=pod.node_name,
            canonical_name=canonical_name,
            canonical_revision=canonical_revision,
            workload_type=wl.POD,
            workload_name=workload_name,
            authorization_policies=self._policies_for(meta.namespace, meta.labels),
            status=wl.HEALTHY if healthy else wl.UNHEALTHY,
            cluster_id=self.config.cluster_id,
            network_mode=wl.HOST_NETWORK if pod.host_network else wl.STANDARD,
        )
        address = wl.Address(workload=fields)
        workload = address.workload
        locality = _locality_of(self._nodes.get(pod.node_name))
        if locality is not None:
            workload.locality.CopyFrom(locality)
        self._fill_services(workload, pod, meta.namespace, meta.labels)
        for svc in self._slice_services_of(pod):
            hostname = self.service_hostname(svc.meta.name, meta.namespace)
            if f"{meta.namespace}/{hostname}" not in workload.services:  # selected already: the same ports
                self._add_service_ports(workload, svc, pod)
        return address

    def _build_entry(
        self, owner: WorkloadEntry | ServiceEntry, spec: WorkloadEntrySpec, uid: str, hosts: set[str], name: str
    ) -> wl.Address:
        """A workload for a WorkloadEntry, or for one endpoint of a ServiceEntry (`hosts` = the hosts it serves)."""
        meta = owner.meta
        labels = _workload_labels(owner)
        workload_name = _entry_workload_name(owner, labels) if isinstance(owner, WorkloadEntry) else name
        canonical_name, canonical_revision = _canonical(labels, workload_name)
        address = wl.Address()
        workload = address.workload
        workload.MergeFrom(
            wl.Workload(
                uid=uid,
                name=name,
                namespace=meta.namespace,
                network=spec.network or self.config.network,
                tunnel_protocol=(
                    wl.HBONE
                    if meta.annotations.get(REDIRECTION_ANNOTATION) == "enabled" or _native_tunnel(labels)
                    else wl.NONE
                ),
                native_tunnel=_native_tunnel(labels),
                trust_domain=self._trust_domain(),
                service_account="" if spec.service_account == "default" else spec.service_account,
                canonical_name=canonical_name,
                canonical_revision=canonical_revision,
                workload_type=wl.POD,
                workload_name=workload_name,
                authorization_policies=self._policies_for(meta.namespace, labels),
                status=wl.HEALTHY,
                cluster_id=self.config.cluster_id,
            )
        )
        try:
            workload.addresses.append(_packed(spec.address))
        except ValueError:
            workload.hostname = spec.address
        if spec.weight > 0:
            workload.capacity.value = spec.weight
        if spec.locality:
            region, zone, subzone = [*spec.locality.split("/"), "", "", ""][:3]
            workload.locality.CopyFrom(wl.Locality(region=region, zone=zone, subzone=subzone))
        if isinstance(owner, ServiceEntry):
            for host in sorted(hosts):
                ports = workload.services[f"{meta.namespace}/{host}"].ports
                for port in owner.ports:
                    target = spec.ports.get(port.name) if port.name else None
                    ports.add(service_port=port.number, target_port=target or port.target_port or port.number)
        else:
            self._fill_services(workload, owner, meta.namespace, labels)
        return address

    def _service_entry_endpoints(self, entry: ServiceEntry) -> list[tuple[WorkloadEntrySpec, set[str]]]:
        if entry.endpoints:
            return [(spec, set(entry.hosts)) for spec in entry.endpoints]
        if entry.workload_selector is None and entry.resolution in ("DNS", "DNS_ROUND_ROBIN"):
            # istiod's implicit endpoints: each host resolves itself.
            return [(WorkloadEntrySpec(address=host), {host}) for host in entry.hosts]
        return []

    def _trust_domain(self) -> str:
        return "" if self.config.trust_domain == "cluster.local" else self.config.trust_domain

    def _selecting_services(self, ns: str, labels: Labels) -> list[Service | ServiceEntry]:
        """Services and ServiceEntries whose selector matches `labels`; memoised for one rebuild (pods share labels)."""
        memo_key = (ns, frozenset(labels.items()))
        found = self._memo_services.get(memo_key)
        if found is not None:
            return found
        candidates: set[ObjectKey] = set(self._service_selectors.get((ns, *_ALL), ()))
        for label in labels.items():
            candidates.update(self._service_selectors.get((ns, *label), ()))
        found = []
        for key in sorted(candidates):
            svc = self._objects.get(key)
            if isinstance(svc, Service):
                selector = svc.selector if svc.type != "ExternalName" else None
            elif isinstance(svc, ServiceEntry):
                selector = svc.workload_selector  # an empty one selects the whole namespace
            else:
                continue
            if selector is not None and _matches(selector, labels):
                found.append(svc)
        self._memo_services[memo_key] = found
        return found

    def _fill_services(self, workload: wl.Workload, subject: Pod | WorkloadEntry, ns: str, labels: Labels) -> None:
        """Per-service port maps for the Services and ServiceEntries whose selector matches `subject`."""
        for svc in self._selecting_services(ns, labels):
            if isinstance(svc, Service):
                self._add_service_ports(workload, svc, subject)
            else:
                for host in svc.hosts:
                    ports = workload.services[f"{ns}/{host}"].ports
                    for se_port in svc.ports:
                        # A ServiceEntry has no named target ports: its port name is matched against the
                        # workload's own port names (istiod's constructServices / constructServicesFromWorkloadEntry).
                        named = _named_port(subject, se_port.name) if se_port.name else None
                        target = named or se_port.target_port or se_port.number
                        ports.add(service_port=se_port.number, target_port=target)

    def _add_service_ports(self, workload: wl.Workload, svc: Service, subject: Pod | WorkloadEntry) -> None:
        ns = svc.meta.namespace
        ports = workload.services[f"{ns}/{self.service_hostname(svc.meta.name, ns)}"].ports
        for port in svc.ports:
            if port.protocol != "TCP":
                continue
            target = _resolve_target(port.target_port, port.port, port.name, subject)
            if target is not None:
                ports.add(service_port=port.port, target_port=target)

    def _policies_for(self, ns: str, labels: Labels) -> list[str]:
        """Selector policies, then PeerAuthentication-derived ones, as istiod lists them; memoised for one rebuild."""
        memo_key = (ns, frozenset(labels.items()))
        found = self._memo_policies.get(memo_key)
        if found is None:
            found = self._memo_policies[memo_key] = self._compute_policies_for(ns, labels)
        return found

    def _compute_policies_for(self, ns: str, labels: Labels) -> list[str]:
        root = self.config.root_namespace
        candidates: set[ObjectKey] = set()
        for scope_ns in {ns, root}:
            candidates.update(self._policy_selectors.get((scope_ns, *_ALL), ()))
            for label in labels.items():
                candidates.update(self._policy_selectors.get((scope_ns, *label), ()))
        names = []
        for key in candidates:
            if _policy_selects(self._objects.get(key), labels):
                names.append(f"{key.namespace}/{key.name}")
        names.sort()
        if self._peer_auths_by_ns.get(ns) or self._peer_auths_by_ns.get(root):
            names += translate_policy.workload_peer_authentication_keys(
                self._peer_auth_candidates(ns), ns, labels, root
            )
        return names


_SUBJECT_KINDS = ("Pod", "WorkloadEntry", "ServiceEntry")


def _slice_pod_refs(slc: EndpointSlice) -> set[_PodRef]:
    """The pods a Service's slice names by targetRef (a slice of no Service, or of names, names none that matter)."""
    if not slc.service_name or slc.address_type == "FQDN":
        return set()
    ns = slc.meta.namespace
    return {
        (e.target_namespace or ns, e.target_name, e.target_uid)
        for e in slc.endpoints
        if e.target_kind == "Pod" and e.target_name
    }


def _names_pod(slc: EndpointSlice, endpoint: Endpoint, pod: Pod) -> bool:
    """Whether `endpoint` is `pod`: by namespace and name, and by uid when both have one (a pod recreated under
    the same name is another pod until the slice's controller catches up)."""
    meta = pod.meta
    return (
        endpoint.target_kind == "Pod"
        and (endpoint.target_namespace or slc.meta.namespace, endpoint.target_name) == (meta.namespace, meta.name)
        and (not endpoint.target_uid or not meta.uid or endpoint.target_uid == meta.uid)
    )


def _policy_selects(policy: KObject | None, labels: Labels) -> bool:
    return isinstance(policy, AuthorizationPolicy) and policy.selector is not None and _matches(policy.selector, labels)


def _same_membership(old: KObject | None, new: KObject | None) -> bool:
    """True when a Service change cannot alter any workload's `services` map."""
    if not isinstance(old, Service) or not isinstance(new, Service):
        return False
    return (old.selector, old.ports, old.type) == (new.selector, new.ports, new.type)


def _same_attachment(old: KObject | None, new: KObject | None) -> bool:
    """True when a policy change cannot alter any workload's `authorization_policies` list."""
    if not isinstance(old, AuthorizationPolicy) or not isinstance(new, AuthorizationPolicy):
        return False
    listed = translate_policy.sent_to_agents
    return (old.selector, listed(old)) == (new.selector, listed(new))


def _toggle(index: dict[_B, set[ObjectKey]], bucket: _B, key: ObjectKey, add: bool) -> None:
    if add:
        index.setdefault(bucket, set()).add(key)
    elif bucket in index:
        index[bucket].discard(key)
        if not index[bucket]:
            del index[bucket]


_NO_WAYPOINTS = "waypoints (L7 routing and policy) are not implemented in this release"


def _waypoint_caveat(obj: KObject) -> str:
    """What an object asks of a waypoint that nothing provides: said rather than silently dropped."""
    if isinstance(obj, OpaqueObject):
        return f"{obj.kind} is accepted but not acted on: {_NO_WAYPOINTS}"
    if isinstance(obj, Namespace | Pod | Service | ServiceEntry | WorkloadEntry):
        waypoint = obj.meta.labels.get(USE_WAYPOINT_LABEL)
        if waypoint and waypoint != "none":
            return f"label {USE_WAYPOINT_LABEL}={waypoint} is ignored: {_NO_WAYPOINTS}; traffic goes directly"
    return ""


def _native_tunnel(labels: Labels) -> bool:
    return labels.get(TUNNEL_LABEL) == "http"


def _toggle_name(index: dict[str, set[str]], name: str, add: bool) -> None:
    hostname = name.partition("/")[2]
    if add:
        index.setdefault(hostname, set()).add(name)
    elif hostname in index:
        index[hostname].discard(name)
        if not index[hostname]:
            del index[hostname]


def _resolve_target(target: int | str | None, port: int, port_name: str, subject: Pod | WorkloadEntry) -> int | None:
    """A Kubernetes service port's target on one workload; None when a named target port is not declared there.

    A WorkloadEntry's `ports` map service port names to its own ports, so a numeric target is overridden by the
    entry's port of the service port's name (istiod's constructServicesFromWorkloadEntry)."""
    if isinstance(target, str):
        return _named_port(subject, target)
    if isinstance(subject, WorkloadEntry) and port_name and port_name in subject.spec.ports:
        return subject.spec.ports[port_name]
    return port if target is None else target


def _named_port(subject: Pod | WorkloadEntry, name: str) -> int | None:
    """The workload's port called `name`: a pod's container port, or a WorkloadEntry's `ports` entry."""
    if isinstance(subject, Pod):
        for cport in subject.container_ports:
            if cport.name == name:
                return cport.port
        return None
    return subject.spec.ports.get(name)


def _locality_of(node: KObject | None) -> wl.Locality | None:
    if not isinstance(node, Node):
        return None
    labels = node.meta.labels
    region, zone, subzone = labels.get(_REGION_LABEL, ""), labels.get(_ZONE_LABEL, ""), labels.get(_SUBZONE_LABEL, "")
    if not (region or zone or subzone):
        return None
    return wl.Locality(region=region, zone=zone, subzone=subzone)


def _pod_workload_name(pod: Pod) -> str:
    """The workload a pod belongs to, named as istiod's GetWorkloadMetaFromPod names it (pkg/kube/util.go): the
    workload-name label, else the pod's controller (Deployment, CronJob, StatefulSet, ...), else the pod itself.

    The name is a label of every metric series the agent reports for the pod, so it has to be the same for all the
    pods of a controller and all the runs of a CronJob: a name per pod or per run is a new series each time, kept
    by Prometheus for its whole retention."""
    labels = pod.meta.labels
    if WORKLOAD_NAME_LABEL in labels:
        return labels[WORKLOAD_NAME_LABEL]
    return _controller_name(pod.meta.owner_kind, pod.meta.owner_name, labels) or pod.meta.name


def _controller_name(kind: str, name: str, labels: Labels) -> str:
    """GetDeployMetaFromPod's heuristics on the controlling owner reference: a ReplicaSet stands for the Deployment
    (or Argo Rollout) whose pod-template hash ends its name, an OpenShift ReplicationController for the
    DeploymentConfig its pods are labelled with, a Job named `<name>-<8 to 10 digits>` for the CronJob that ran it
    (the digits are the run's scheduled minute). Any other controller is named as it is."""
    if kind == "ReplicaSet":
        for hash_label in _TEMPLATE_HASH_LABELS:
            template_hash = labels.get(hash_label, "")
            if template_hash and name.endswith(template_hash):
                return name.removesuffix(f"-{template_hash}")
    elif kind == "ReplicationController":
        return labels.get(_DEPLOYMENT_CONFIG_LABEL) or name
    elif kind == "Job":
        run = _CRONJOB_RUN.search(name)
        if run is not None:
            return run.group(1)
    return name


def _entry_workload_name(entry: WorkloadEntry, labels: Labels) -> str:
    """istiod's WorkloadNameFromWorkloadEntry (pkg/kube/labels): an auto-registered VM is named after its
    WorkloadGroup, so all the group's entries are one workload."""
    annotations = entry.meta.annotations
    if AUTO_REGISTRATION_GROUP_ANNOTATION in annotations:
        return annotations[AUTO_REGISTRATION_GROUP_ANNOTATION]
    return labels.get(WORKLOAD_NAME_LABEL, entry.meta.name)


def _canonical(labels: Labels, workload_name: str) -> tuple[str, str]:
    """istiod's CanonicalService (pkg/kube/labels): the first of each list of labels that is present, even empty."""
    name = next((labels[k] for k in _CANONICAL_NAME_LABELS if k in labels), workload_name)
    revision = next((labels[k] for k in _CANONICAL_REVISION_LABELS if k in labels), "latest")
    return name, revision
