"""The agent's view of the mesh: workloads, services and authorization policies received over xDS.

Everything the data path asks per connection (who owns this IP, which service has this VIP, which policies guard
this workload) is a dict lookup; the indexes are maintained as resources arrive, never rebuilt. Lookups take IP
text and compare packed bytes, the form the workload API carries. Service VIPs are keyed by (network, address) as
ztunnel's: several services may share one (a Kubernetes Service and a ServiceEntry, or the same VIP in two
namespaces), and which one a client reaches depends on its namespace (:meth:`WorkloadStore.service_by_vip`).
Workload addresses are not keyed by network: the lab and the clusters this agent targets are single-network.

Not thread-safe: the xDS client and the proxies share one event loop.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent.addressing import is_pod
from api.istio.security import authorization_pb2 as authz_pb
from api.istio.workload import workload_pb2 as wl_pb
from common.log import kv
from common.protojson import message_to_json

log = logging.getLogger(__name__)

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"
MEMO_LIMIT = 4096  # entries of WorkloadStore.memo between changes
_MISSING = object()
_T = TypeVar("_T")

Workload = wl_pb.Workload
Service = wl_pb.Service
Authorization = authz_pb.Authorization


@dataclass
class StoreChange:
    """Names changed or removed by one update: workload uids, service keys ("ns/hostname"), policies ("ns/name").

    ``policy_scopes`` says whose policies changed, before or after the update: "" (a GLOBAL policy: everybody's) or a
    namespace (a NAMESPACE policy: its workloads'); a selector policy is named in the workloads it applies to (see
    :meth:`policies_changed_for`). Connections to other workloads keep their decision: re-checking all 10,000 an
    agent tracks on every policy update took 0.4-1.7 s of one loop turn."""

    workloads: set[str] = field(default_factory=set)
    services: set[str] = field(default_factory=set)
    policies: set[str] = field(default_factory=set)
    policy_scopes: set[str] = field(default_factory=set)

    def policies_changed_for(self, workload: Workload) -> bool:
        """Whether this update may have changed ``workload``'s policies (:meth:`WorkloadStore.policies_for`)."""
        if not self.policies:
            return False
        scopes = self.policy_scopes
        if "" in scopes or workload.namespace in scopes:
            return True
        return any(name in self.policies for name in workload.authorization_policies)

    def __bool__(self) -> bool:
        return bool(self.workloads or self.services or self.policies)


def service_key(svc: Service) -> str:
    return f"{svc.namespace}/{svc.hostname}"


def policy_key(policy: Authorization) -> str:
    return f"{policy.namespace}/{policy.name}"


def address_name(addr: wl_pb.Address) -> str:
    """The xDS resource name of an Address: a workload's uid, or a service's ``namespace/hostname``."""
    return addr.workload.uid if addr.HasField("workload") else service_key(addr.service)


def pack_ip(ip: str) -> bytes | None:
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError:
        return None


def _add(index: dict[Any, dict[str, None]], key: Any, name: str) -> None:
    index.setdefault(key, {})[name] = None


def _discard(index: dict[Any, dict[str, None]], key: Any, name: str) -> None:
    names = index.get(key)
    if names is not None:
        names.pop(name, None)
        if not names:
            del index[key]


def _memo_get(memo: dict[Any, Any], key: Any, compute: Callable[[], _T]) -> _T:
    """``memo[key]``, computed on a miss; a full memo starts over rather than grow with every key a busy node sees
    between changes (services x ports x kinds of client)."""
    found = memo.get(key, _MISSING)
    if found is _MISSING:
        if len(memo) >= MEMO_LIMIT:
            memo.clear()
        found = memo[key] = compute()
    return found


class WorkloadStore:
    """Workloads by uid/IP/node, services by key/VIP with their endpoints, policies by scope; plus xDS versions."""

    def __init__(self) -> None:
        self._workloads: dict[str, Workload] = {}
        self._services: dict[str, Service] = {}
        self._policies: dict[str, Authorization] = {}
        # Resource name -> which kind of Address it is ("w" workload uid or "s" service key).
        self._address_kind: dict[str, str] = {}
        # Insertion-ordered name sets: with a shared IP the latest arrival wins among equals, as in ztunnel.
        self._workloads_by_ip: dict[bytes, dict[str, None]] = {}
        self._workloads_by_node: dict[str, dict[str, None]] = {}
        self._services_by_vip: dict[tuple[str, bytes], dict[str, None]] = {}  # (network, VIP) -> service keys
        # Addresses with a prefix length short of a host's (ServiceEntry CIDRs), in arrival order: ztunnel's
        # by_cidr_vip, searched when no exact VIP answers.
        self._cidr_vips: list[_CidrVip] = []
        self._endpoints: dict[str, dict[str, None]] = {}  # service key -> workload uids
        self._policies_by_scope: dict[str, dict[str, None]] = {}  # namespace, or "" for GLOBAL
        self._versions: dict[str, dict[str, str]] = {ADDRESS_TYPE: {}, AUTHORIZATION_TYPE: {}}
        self._subscribers: list[Callable[[StoreChange], None]] = []
        # Per service key: its endpoint lists by port, and what the data path derives from the service and its
        # endpoints (memoized_for_service); dropped when the service or one of its endpoints changes, not at every
        # change of the store: a 1,000-endpoint service cost ~10 ms to walk again after each unrelated update.
        self._endpoint_lists: dict[str, dict[int, list[tuple[Workload, int]]]] = {}
        self._service_memo: dict[str, dict[Any, Any]] = {}
        self.memo: dict[Any, Any] = {}
        """What the data path derives from the store and reuses per connection (a service's endpoint candidates,
        its accepted SANs, a workload's baggage): emptied by every update that changes something, so nothing in it
        is ever stale, and keys may hold ``id()`` of the store's objects. Filled through :meth:`memoized`."""

    def memoized(self, key: Any, compute: Callable[[], _T]) -> _T:
        """``compute()``, once per store version for ``key``. A full memo starts over rather than grow with every
        key a busy node sees between changes (services x ports x kinds of client)."""
        return _memo_get(self.memo, key, compute)

    def memoized_for_service(self, service: str, key: Any, compute: Callable[[], _T]) -> _T:
        """``compute()``, once for ``key`` until the service ``service`` ("ns/hostname") or one of its endpoints
        changes (an update naming it in :attr:`StoreChange.services`): for what depends on nothing else of the store
        (a service's endpoint candidates, its accepted SANs). Keys may hold ``id()`` of the service."""
        memo = self._service_memo.get(service)
        if memo is None:
            if service not in self._services:
                return compute()  # kept for services held only: their changes are what drops them
            memo = self._service_memo[service] = {}
        return _memo_get(memo, key, compute)

    # ---- queries (the data path) ---------------------------------------------------------------------------------

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self._workloads.get(uid)

    def workload_by_ip(self, ip: str) -> Workload | None:
        """The workload owning `ip`, as ztunnel's by-address index: host-network workloads own none (they share
        their node's address); when several others name it, the one ztunnel's WorkloadByAddr::get picks (see
        :func:`_address_rank`)."""
        packed = pack_ip(ip)
        names = self._workloads_by_ip.get(packed) if packed is not None else None
        if not names:
            return None
        if len(names) == 1:  # the common case
            return self._workloads[next(iter(names))]
        # max() keeps the first of equals, so walk from the latest arrival back: it wins a tie.
        return max((self._workloads[n] for n in reversed(names)), key=_address_rank)

    def service_by_vip(self, ip: str, namespace: str | None = None, network: str = "") -> Service | None:
        """The service a client in `namespace` on `network` reaches at VIP `ip`, as ztunnel's get_best_by_vip.

        Services of other namespaces with visibility NAMESPACE are skipped; then a service in the client's own
        namespace wins, else the last one marked `canonical`, else the first to arrive. Within one namespace the
        latest arrival holds that namespace's place (ztunnel keeps one service per namespace per VIP). Without a
        `namespace` (no client: tooling, tests) nothing is filtered and no namespace is preferred.
        """
        packed = pack_ip(ip)
        if packed is None:
            return None
        names = self._services_by_vip.get((network, packed))
        found = self._best_of(names, namespace) if names else None
        if found is None and self._cidr_vips:
            return self._best_cidr(packed, namespace, network)
        return found

    def _best_of(self, names: dict[str, None], namespace: str | None) -> Service | None:
        if len(names) == 1:  # the common case: one service per VIP
            svc = self._services[next(iter(names))]
            return svc if namespace is None or _visible(svc, namespace) else None
        by_namespace: dict[str, Service] = {}  # first arrival's position, latest arrival's service
        for name in names:
            svc = self._services[name]
            by_namespace[svc.namespace] = svc
        first: Service | None = None
        canonical: Service | None = None
        for svc in by_namespace.values():
            if namespace is not None and not _visible(svc, namespace):
                continue
            if svc.namespace == namespace:
                return svc
            if svc.canonical:
                canonical = svc
            elif first is None:
                first = svc
        return canonical if canonical is not None else first

    def _best_cidr(self, packed: bytes, namespace: str | None, network: str) -> Service | None:
        """ztunnel's get_best_by_cidr_vip: of the visible services whose CIDR holds the address, the best by (in
        the client's namespace, longest prefix, canonical), the first to arrive on a tie."""
        bits = len(packed) * 8
        value = int.from_bytes(packed, "big")
        best: Service | None = None
        best_rank: tuple[bool, int, bool] | None = None
        for cidr in self._cidr_vips:
            if cidr.network != network or cidr.bits != bits or value >> (bits - cidr.prefix) != cidr.base:
                continue
            svc = self._services[cidr.key]
            if namespace is not None and not _visible(svc, namespace):
                continue
            rank = (svc.namespace == namespace, cidr.prefix, svc.canonical)
            if best_rank is None or rank > best_rank:
                best, best_rank = svc, rank
        return best

    def service_by_key(self, key: str) -> Service | None:
        return self._services.get(key)

    def endpoints(self, service: Service | str, port: int = 0) -> list[tuple[Workload, int]]:
        """Workloads backing ``service``, each with its target port for service port ``port``.

        The target port comes from the workload's ``services`` entry; 0 means the workload names no mapping for
        that port (callers then fall back to the service's own ``target_port``, then to the service port). The list
        is kept until the service or one of its endpoints changes: callers must not modify it.
        """
        key = service if isinstance(service, str) else service_key(service)
        by_port = self._endpoint_lists.get(key)
        if by_port is None:
            by_port = {}
            if key in self._services:  # kept for services held only: their changes are what drops them
                self._endpoint_lists[key] = by_port
        found = by_port.get(port)
        if found is not None:
            return found
        if len(by_port) >= MEMO_LIMIT:  # ports nobody declared, asked by tooling
            by_port.clear()
        out: list[tuple[Workload, int]] = []
        for uid in self._endpoints.get(key, ()):
            wl = self._workloads[uid]
            target = 0
            plist = wl.services.get(key)
            if plist is not None and port:
                target = next((p.target_port for p in plist.ports if p.service_port == port), 0)
            out.append((wl, target))
        by_port[port] = out
        return out

    def policies_for(self, workload: Workload) -> list[Authorization]:
        """Namespace-scoped, global, and the selector policies the workload names (unknown names skipped)."""
        seen: dict[str, None] = {}
        for scope in (workload.namespace, ""):
            seen.update(self._policies_by_scope.get(scope, {}))
        for name in workload.authorization_policies:
            if name in self._policies:
                seen[name] = None
        return [self._policies[n] for n in seen]

    def local_workloads(self, node: str) -> list[Workload]:
        return [self._workloads[uid] for uid in self._workloads_by_node.get(node, ())]

    def all_workloads(self) -> list[Workload]:
        return list(self._workloads.values())

    def all_services(self) -> list[Service]:
        return list(self._services.values())

    def all_policies(self) -> list[Authorization]:
        return list(self._policies.values())

    def subscribe(self, callback: Callable[[StoreChange], None]) -> None:
        """``callback`` runs synchronously after every update that changed something."""
        self._subscribers.append(callback)

    def snapshot_dict(self) -> dict[str, Any]:
        """ztunnel-shaped config dump: workloads by uid, services by hostname, policies."""
        return {
            "workloads": [message_to_json(w) for _, w in sorted(self._workloads.items())],
            "services": [
                message_to_json(s) for s in sorted(self._services.values(), key=lambda s: (s.hostname, s.namespace))
            ],
            "policies": [message_to_json(p) for _, p in sorted(self._policies.items())],
        }

    # ---- xDS bookkeeping -----------------------------------------------------------------------------------------

    def versions(self, type_url: str) -> dict[str, str]:
        """name -> version of every resource held, sent as ``initial_resource_versions`` when resuming."""
        return dict(self._versions[type_url])

    def apply(
        self,
        type_url: str,
        upserts: Mapping[str, tuple[Any, str]],
        removed: Iterable[str] = (),
    ) -> StoreChange:
        """Apply one xDS delta: ``upserts`` maps names to (Address or Authorization, version)."""
        change = StoreChange()
        versions = self._versions[type_url]
        if type_url == ADDRESS_TYPE:
            for name in removed:
                self._remove_address(name, change)
                versions.pop(name, None)
            for name, (addr, version) in upserts.items():
                self._remove_address(name, change)
                if addr.HasField("workload"):
                    self._insert_workload(name, addr.workload, change)
                else:
                    self._insert_service(name, addr.service, change)
                versions[name] = version
        elif type_url == AUTHORIZATION_TYPE:
            for name in removed:
                self._remove_policy(name, change)
                versions.pop(name, None)
            for name, (policy, version) in upserts.items():
                self._remove_policy(name, change)
                self._insert_policy(name, policy, change)
                versions[name] = version
        else:
            raise ValueError(f"unknown type URL {type_url!r}")
        if change:
            self.memo.clear()
            for key in change.services:
                self._endpoint_lists.pop(key, None)
                self._service_memo.pop(key, None)
            for callback in list(self._subscribers):
                # Each subscriber runs whatever another one does: the store already holds the change, and an
                # exception escaping here made the xDS client drop the stream before recording the response, which
                # a reconnect never sends again (the versions say it was had).
                try:
                    callback(change)
                except Exception:
                    log.exception("workload store subscriber failed", extra=kv(subscriber=repr(callback)))
        return change

    def put(self, addresses: Iterable[Any] = (), policies: Iterable[Authorization] = ()) -> StoreChange:
        """Insert messages directly (Workload, Service or Address; Authorization): for tests and static config."""
        wrapped: dict[str, tuple[Any, str]] = {}
        for msg in addresses:
            if isinstance(msg, Workload):
                msg = wl_pb.Address(workload=msg)
            elif isinstance(msg, Service):
                msg = wl_pb.Address(service=msg)
            wrapped[address_name(msg)] = (msg, "")
        change = self.apply(ADDRESS_TYPE, wrapped)
        pchange = self.apply(AUTHORIZATION_TYPE, {policy_key(p): (p, "") for p in policies})
        change.policies |= pchange.policies
        change.policy_scopes |= pchange.policy_scopes
        return change

    # ---- index maintenance ---------------------------------------------------------------------------------------

    def _insert_workload(self, uid: str, wl: Workload, change: StoreChange) -> None:
        self._workloads[uid] = wl
        self._address_kind[uid] = "w"
        if wl.network_mode != wl_pb.HOST_NETWORK:  # the node's address, shared by all of them: owned by none
            for ip in wl.addresses:
                _add(self._workloads_by_ip, bytes(ip), uid)
        if wl.node:
            _add(self._workloads_by_node, wl.node, uid)
        for key in wl.services:
            _add(self._endpoints, key, uid)
            change.services.add(key)
        change.workloads.add(uid)

    def _insert_service(self, key: str, svc: Service, change: StoreChange) -> None:
        self._services[key] = svc
        self._address_kind[key] = "s"
        for addr in svc.addresses:
            raw = bytes(addr.address)
            if addr.HasField("length") and addr.length != len(raw) * 8:  # a CIDR; a host's length is its address
                if addr.length < len(raw) * 8:  # a longer one is refused at the xDS boundary
                    shift = len(raw) * 8 - addr.length
                    base = int.from_bytes(raw, "big") >> shift
                    self._cidr_vips.append(_CidrVip(addr.network, len(raw) * 8, base, addr.length, key))
                continue
            _add(self._services_by_vip, (addr.network, raw), key)
        change.services.add(key)

    def _remove_address(self, name: str, change: StoreChange) -> None:
        kind = self._address_kind.pop(name, None)
        if kind == "w":
            wl = self._workloads.pop(name)
            if wl.network_mode != wl_pb.HOST_NETWORK:
                for ip in wl.addresses:
                    _discard(self._workloads_by_ip, bytes(ip), name)
            if wl.node:
                _discard(self._workloads_by_node, wl.node, name)
            for key in wl.services:
                _discard(self._endpoints, key, name)
                change.services.add(key)
            change.workloads.add(name)
        elif kind == "s":
            svc = self._services.pop(name)
            for addr in svc.addresses:
                _discard(self._services_by_vip, (addr.network, bytes(addr.address)), name)
            if self._cidr_vips:
                self._cidr_vips = [c for c in self._cidr_vips if c.key != name]
            change.services.add(name)

    def _insert_policy(self, name: str, policy: Authorization, change: StoreChange) -> None:
        self._policies[name] = policy
        scope = _scope_key(policy)
        if scope is not None:
            _add(self._policies_by_scope, scope, name)
            change.policy_scopes.add(scope)
        change.policies.add(name)

    def _remove_policy(self, name: str, change: StoreChange) -> None:
        policy = self._policies.pop(name, None)
        if policy is None:
            return
        scope = _scope_key(policy)
        if scope is not None:
            _discard(self._policies_by_scope, scope, name)
            change.policy_scopes.add(scope)
        change.policies.add(name)


@dataclass(frozen=True, slots=True)
class _CidrVip:
    network: str
    bits: int  # 32 or 128
    base: int  # the address's first `prefix` bits, as an integer
    prefix: int
    key: str  # the service's


def _address_rank(wl: Workload) -> tuple[bool, bool]:
    """Which of the workloads sharing an address owns it: a Pod before a WorkloadEntry or ServiceEntry endpoint
    (those may name any address, so one naming a pod's IP must not take over that pod's identity and certificate),
    then an HBONE workload before one outside the mesh (ztunnel's ranking)."""
    return is_pod(wl), wl.tunnel_protocol == wl_pb.HBONE


def _visible(svc: Service, namespace: str) -> bool:
    """Visibility NAMESPACE: only clients of the service's own namespace see it (ztunnel's visible_to)."""
    return svc.visibility != wl_pb.Service.NAMESPACE or svc.namespace == namespace


def _scope_key(policy: Authorization) -> str | None:
    """Where ztunnel indexes a policy: "" for GLOBAL, its namespace for NAMESPACE, nowhere for selector policies."""
    if policy.scope == authz_pb.GLOBAL:
        return ""
    if policy.scope == authz_pb.NAMESPACE:
        return policy.namespace
    return None
