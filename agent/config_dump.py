"""The store as ztunnel's `/config_dump` shows it, so that `istioctl ztunnel-config workloads|services|policies|all`
reads an Ambit agent as it reads a ztunnel.

istioctl port-forwards to the node proxy's 15000, GETs `/config_dump` and decodes it with Go's encoding/json into
its own structs (istio/istio istioctl/pkg/writer/ztunnel/configdump/api.go: ZtunnelDump, ZtunnelWorkload,
ZtunnelService, ZtunnelEndpoint, ZtunnelPolicy, PolicyMatch). A value of the wrong JSON type for a field (a string
where it wants a number, a port above 65535 where it wants a uint16) fails the whole decode and the command, and
an unknown key is ignored; Go matches keys without regard to case, so no key added here may differ from one of
those fields only by case. The shape followed is ztunnel's own serde output (istio/ztunnel src/state.rs
ProxyStateSerialization: `workloads`, `services`, `policies`, `stagedServices`; src/state/workload.rs Workload,
GatewayAddress, ApplicationTunnel, Locality; src/state/service.rs Service, Endpoint, LoadBalancer; src/rbac.rs
Authorization, RbacMatch, StringMatch), which is also what scripts written against ztunnel's dump expect:

- enums as ztunnel's Rust variant names: protocol `HBONE`/`TCP`, status `Healthy`/`Unhealthy`, networkMode
  `Standard`/`HostNetwork`, scope `Global`/`Namespace`/`WorkloadSelector`, action `Allow`/`Deny`, load balancer
  mode `Standard`/`Strict`/`Failover`/`Passthrough`, health policy `OnlyHealthy`/`AllowAll`, ipFamilies
  `IPv4`/`IPv6`/`Dual`, visibility `Public`/`Namespace`, workloadType the proto name in lower case;
- addresses as ztunnel's NetworkAddress and NamespacedHostname text: `network/ip` (a VIP, a waypoint's address;
  the network empty in a one-network mesh: `/10.96.0.10`) and `namespace/hostname`;
- a workload's defaults filled as ztunnel fills them on arrival: trust domain (ztunnel's `cluster.local`, here the
  agent's `--trust-domain`), service account `default`, cluster id `Kubernetes`, capacity 1;
- a service's `ports` and an endpoint's `port` as maps of service port to target port (JSON object keys are
  text: `{"80": 8080}`), its `endpoints` keyed by workload uid; unhealthy endpoints are left out unless the
  service's health policy is ALLOW_ALL (ztunnel's should_include_endpoint: its store never holds them), and
  endpoints of a service the agent does not hold yet are under `stagedServices`, keyed `namespace/hostname`;
- a policy's `rules` as ztunnel's three nested lists (groups, their rules, their matches) of RbacMatch: only the
  non-empty fields, StringMatch as `{"Exact": v}`, `{"Prefix": v}`, `{"Suffix": v}` or `{"Presence": []}`, IPs as
  `ip/length`, ports as numbers. Entries ztunnel would drop or wrap (agent.rbac's malformed entries: a 3-byte
  address, a port above 65535) are left out of `rules` and listed in `malformedEntries` with how Ambit reads them,
  since Ambit's reading (the restrictive one) is not ztunnel's.

Pure functions over the store's protos: the admin server runs them in a worker thread, so they only read (the
store's tables are copied to lists in one call each, and its protos are replaced, never edited).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from agent import rbac
from agent.addressing import format_address, workload_ips
from agent.state import WorkloadStore, service_key
from api.istio.security import authorization_pb2 as authz_pb
from api.istio.workload import workload_pb2 as wl_pb

if TYPE_CHECKING:
    from agent.outbound import OutboundConnection

MAX_PORT = 65535  # istioctl decodes ports as uint16

# ztunnel's serde spellings of the workload API's enums (the Rust variant names; istio/ztunnel src/state/*.rs)
_PROTOCOL = {wl_pb.HBONE: "HBONE"}  # InboundProtocol; NONE is TCP (LEGACY_ISTIO_MTLS: ztunnel refuses it)
_NETWORK_MODE = {wl_pb.STANDARD: "Standard", wl_pb.HOST_NETWORK: "HostNetwork"}
_STATUS = {wl_pb.HEALTHY: "Healthy", wl_pb.UNHEALTHY: "Unhealthy"}
_APP_TUNNEL = {wl_pb.ApplicationTunnel.NONE: "NONE", wl_pb.ApplicationTunnel.PROXY: "PROXY"}
_LB_MODE = {
    wl_pb.LoadBalancing.UNSPECIFIED_MODE: "Standard",
    wl_pb.LoadBalancing.STRICT: "Strict",
    wl_pb.LoadBalancing.FAILOVER: "Failover",
    wl_pb.LoadBalancing.PASSTHROUGH: "Passthrough",
}
_LB_HEALTH = {wl_pb.LoadBalancing.ONLY_HEALTHY: "OnlyHealthy", wl_pb.LoadBalancing.ALLOW_ALL: "AllowAll"}
_LB_SCOPE = {
    wl_pb.LoadBalancing.REGION: "Region",
    wl_pb.LoadBalancing.ZONE: "Zone",
    wl_pb.LoadBalancing.SUBZONE: "Subzone",
    wl_pb.LoadBalancing.NODE: "Node",
    wl_pb.LoadBalancing.CLUSTER: "Cluster",
    wl_pb.LoadBalancing.NETWORK: "Network",
}
_IP_FAMILIES = {wl_pb.IPV4_ONLY: "IPv4", wl_pb.IPV6_ONLY: "IPv6", wl_pb.DUAL: "Dual"}  # AUTOMATIC: left out
_VISIBILITY = {wl_pb.Service.PUBLIC: "Public", wl_pb.Service.NAMESPACE: "Namespace"}
_WORKLOAD_TYPE = {wl_pb.DEPLOYMENT: "deployment", wl_pb.CRONJOB: "cronjob", wl_pb.POD: "pod", wl_pb.JOB: "job"}
_SCOPE = {authz_pb.GLOBAL: "Global", authz_pb.NAMESPACE: "Namespace", authz_pb.WORKLOAD_SELECTOR: "WorkloadSelector"}
_ACTION = {authz_pb.ALLOW: "Allow", authz_pb.DENY: "Deny"}
_STRING_MATCH = {"exact": "Exact", "prefix": "Prefix", "suffix": "Suffix"}
# RbacMatch's fields in ztunnel's order: (the proto's field, the dump's key)
_MATCH_FIELDS = (
    ("namespaces", "namespaces"),
    ("not_namespaces", "notNamespaces"),
    ("service_accounts", "serviceAccounts"),
    ("not_service_accounts", "notServiceAccounts"),
    ("principals", "principals"),
    ("not_principals", "notPrincipals"),
    ("source_ips", "sourceIps"),
    ("not_source_ips", "notSourceIps"),
    ("destination_ips", "destinationIps"),
    ("not_destination_ips", "notDestinationIps"),
    ("destination_ports", "destinationPorts"),
    ("not_destination_ports", "notDestinationPorts"),
)


def ztunnel_dump(store: WorkloadStore, trust_domain: str = "cluster.local") -> dict[str, Any]:
    """`workloads`, `services`, `policies` and `stagedServices` as ztunnel's ProxyState serializes them: workloads
    sorted by uid, services by hostname (then namespace), policies by `namespace/name`."""
    workloads = sorted(store.all_workloads(), key=lambda w: w.uid)
    services = sorted(store.all_services(), key=lambda s: (s.hostname, s.namespace))
    policies = sorted(store.all_policies(), key=lambda p: (p.namespace, p.name))
    held = {service_key(s): s for s in services}
    endpoints: dict[str, dict[str, Any]] = {}
    staged: dict[str, dict[str, Any]] = {}
    for wl in workloads:
        for key, ports in wl.services.items():
            svc = held.get(key)
            if svc is not None and not _includes(svc, wl):
                continue
            (endpoints if svc is not None else staged).setdefault(key, {})[wl.uid] = endpoint_json(wl, ports)
    return {
        "workloads": [workload_json(w, trust_domain) for w in workloads],
        "services": [service_json(s, endpoints.get(service_key(s), {})) for s in services],
        "policies": [policy_json(p) for p in policies],
        "stagedServices": staged,
    }


def _includes(svc: wl_pb.Service, wl: wl_pb.Workload) -> bool:
    """ztunnel's Service::should_include_endpoint: healthy, or any health under ALLOW_ALL."""
    return wl.status == wl_pb.HEALTHY or svc.load_balancing.health_policy == wl_pb.LoadBalancing.ALLOW_ALL


def _ip(raw: bytes) -> str | None:
    return str(ipaddress.ip_address(raw)) if len(raw) in (4, 16) else None


def _port_map(ports: Iterable[wl_pb.Port]) -> dict[str, int]:
    """ztunnel's HashMap<u16, u16> of service port to target port, keys as JSON text; a later duplicate wins."""
    return {
        str(p.service_port): p.target_port for p in ports if p.service_port <= MAX_PORT and p.target_port <= MAX_PORT
    }


def gateway_json(gw: wl_pb.GatewayAddress) -> dict[str, Any]:
    """ztunnel's GatewayAddress: `destination` as `network/ip` or `namespace/hostname` (an untagged enum of two
    string-serialized types), and `hboneMtlsPort`. istioctl reads `destination` (workload.go waypointName)."""
    if gw.WhichOneof("destination") == "hostname":
        destination = f"{gw.hostname.namespace}/{gw.hostname.hostname}"
    else:
        destination = f"{gw.address.network}/{_ip(gw.address.address) or ''}"
    return {"destination": destination, "hboneMtlsPort": gw.hbone_mtls_port}


def workload_json(wl: wl_pb.Workload, trust_domain: str = "cluster.local") -> dict[str, Any]:
    """ztunnel's Workload (src/state/workload.rs), fields in its order, those it skips when default skipped."""
    out: dict[str, Any] = {"workloadIps": workload_ips(wl)}
    if wl.HasField("waypoint"):
        out["waypoint"] = gateway_json(wl.waypoint)
    if wl.HasField("network_gateway"):
        out["networkGateway"] = gateway_json(wl.network_gateway)
    out["protocol"] = _PROTOCOL.get(wl.tunnel_protocol, "TCP")
    out["networkMode"] = _NETWORK_MODE.get(wl.network_mode, "Standard")
    if wl.uid:
        out["uid"] = wl.uid
    out["name"] = wl.name
    out["namespace"] = wl.namespace
    out["trustDomain"] = wl.trust_domain or trust_domain
    out["serviceAccount"] = wl.service_account or "default"
    optional = (
        ("network", wl.network),
        ("workloadName", wl.workload_name),
        ("workloadType", _WORKLOAD_TYPE.get(wl.workload_type, "")),
        ("canonicalName", wl.canonical_name),
        ("canonicalRevision", wl.canonical_revision),
        ("hostname", wl.hostname),
        ("node", wl.node),
    )
    out.update((key, value) for key, value in optional if value)
    if wl.native_tunnel:
        out["nativeTunnel"] = True
    if wl.HasField("application_tunnel"):
        tunnel = wl.application_tunnel
        out["applicationTunnel"] = {
            "protocol": _APP_TUNNEL.get(tunnel.protocol, "NONE"),
            "port": tunnel.port if 0 < tunnel.port <= MAX_PORT else None,
        }
    if wl.authorization_policies:
        out["authorizationPolicies"] = list(wl.authorization_policies)
    out["status"] = _STATUS.get(wl.status, "Healthy")
    out["clusterId"] = wl.cluster_id or "Kubernetes"
    locality = wl.locality
    if locality.region or locality.zone or locality.subzone:
        out["locality"] = {"region": locality.region, "zone": locality.zone, "subzone": locality.subzone}
    if wl.services:
        out["services"] = sorted(wl.services)
    out["capacity"] = wl.capacity.value if wl.HasField("capacity") else 1
    return out


def endpoint_json(wl: wl_pb.Workload, ports: wl_pb.PortList) -> dict[str, Any]:
    """ztunnel's Endpoint (src/state/service.rs): the workload's uid, its port map for the service, its health."""
    return {"workloadUid": wl.uid, "port": _port_map(ports.ports), "status": _STATUS.get(wl.status, "Healthy")}


def service_json(svc: wl_pb.Service, endpoints: Mapping[str, Any]) -> dict[str, Any]:
    """ztunnel's Service (src/state/service.rs): a host-length address is a VIP (`network/ip`), a shorter prefix a
    `cidrVips` entry (its NetworkCidr: `{network, cidr}`)."""
    vips: list[str] = []
    cidrs: list[dict[str, str]] = []
    for addr in svc.addresses:
        ip = _ip(addr.address)
        if ip is None:
            continue
        host_length = len(addr.address) * 8
        if addr.HasField("length") and addr.length != host_length:
            cidrs.append({"network": addr.network, "cidr": f"{ip}/{addr.length}"})
        else:
            vips.append(f"{addr.network}/{ip}")
    out: dict[str, Any] = {"name": svc.name, "namespace": svc.namespace, "hostname": svc.hostname, "vips": vips}
    if cidrs:
        out["cidrVips"] = cidrs
    out["ports"] = _port_map(svc.ports)
    out["endpoints"] = dict(endpoints)
    out["subjectAltNames"] = list(svc.subject_alt_names)
    if svc.HasField("waypoint"):
        out["waypoint"] = gateway_json(svc.waypoint)
    if svc.weighted_waypoints:
        out["weightedWaypoints"] = [
            {"destination": gateway_json(w.destination), "weight": w.weight} for w in svc.weighted_waypoints
        ]
    if svc.HasField("load_balancing"):
        lb = svc.load_balancing
        out["loadBalancer"] = {
            "routingPreferences": [_LB_SCOPE[s] for s in lb.routing_preference if s in _LB_SCOPE],
            "mode": _LB_MODE.get(lb.mode, "Standard"),
            "healthPolicy": _LB_HEALTH.get(lb.health_policy, "OnlyHealthy"),
        }
    if svc.ip_families in _IP_FAMILIES:
        out["ipFamilies"] = _IP_FAMILIES[svc.ip_families]
    out["canonical"] = svc.canonical
    out["visibility"] = _VISIBILITY.get(svc.visibility, "Public")
    return out


def _string_match(m: authz_pb.StringMatch) -> dict[str, Any] | None:
    """ztunnel's StringMatch, an externally tagged enum: `{"Exact": v}`, ..., `{"Presence": []}` (a unit tuple
    variant); None for one with no kind (ztunnel drops it)."""
    kind = m.WhichOneof("match_type")
    if kind is None:
        return None
    if kind == "presence":
        return {"Presence": []}
    return {_STRING_MATCH[kind]: getattr(m, kind)}


def _net(a: authz_pb.Address) -> str | None:
    """ztunnel's IpNet text, `ip/length` with the address as given (IpNet::new keeps host bits); None when
    malformed."""
    ip = _ip(a.address)
    if ip is None or a.length > len(a.address) * 8:
        return None
    return f"{ip}/{a.length}"


def match_json(m: authz_pb.Match) -> dict[str, Any]:
    """ztunnel's RbacMatch: camelCase, empty fields left out, malformed entries dropped (see the module)."""
    out: dict[str, Any] = {}
    present = {fd.name: values for fd, values in m.ListFields()}
    for name, key in _MATCH_FIELDS:
        values = present.get(name)
        if not values:
            continue
        rendered: list[Any]
        if name.endswith("namespaces") or name.endswith("principals"):
            rendered = [s for s in map(_string_match, values) if s is not None]
        elif name.endswith("service_accounts"):
            rendered = [{"namespace": sa.namespace, "serviceAccount": sa.serviceAccount} for sa in values]
        elif name.endswith("_ips"):
            rendered = [n for n in map(_net, values) if n is not None]
        else:
            rendered = [p for p in values if p <= MAX_PORT]
        if rendered:
            out[key] = rendered
    return out


def policy_json(policy: authz_pb.Authorization) -> dict[str, Any]:
    """ztunnel's Authorization (src/rbac.rs): `rules` the groups, each a list of clauses (a group's `rules`), each
    a list of RbacMatch (a clause's `matches`); plus `malformedEntries` when Ambit holds entries ztunnel would not."""
    out: dict[str, Any] = {
        "name": policy.name,
        "namespace": policy.namespace,
        "scope": _SCOPE.get(policy.scope, "Global"),
        "action": _ACTION.get(policy.action, "Allow"),
        "rules": [[[match_json(m) for m in clause.matches] for clause in group.rules] for group in policy.groups],
        "dryRun": policy.dry_run,
    }
    malformed = rbac.malformed_entries(policy)
    if malformed:
        out["malformedEntries"] = [str(e) for e in malformed]
    return out


def workload_state(
    store: WorkloadStore,
    node: str,
    enrolled: Collection[str],
    tracked: Iterable[Any],
    outbound: Iterable[OutboundConnection] = (),
) -> dict[str, dict[str, Any]]:
    """ztunnel's `workloadState` (src/inpod/admin.rs WorkloadManagerAdminHandler: per proxied pod `state`, `info`
    and its ConnectionManager's `connections`), which `istioctl ztunnel-config connections` and `all` read
    (istioctl/pkg/writer/ztunnel/configdump/connections.go): the workloads of ``node`` the agent captures (an
    address in ``enrolled``), keyed by workload uid (ztunnel keys by pod UID, which the workload API does not carry;
    istioctl reads only the values), each `Up`. ``tracked`` are the connections the agent tracks for policy
    (agent.connections.TrackedConnection: `conn`, `workload_uid`), all of which it authorizes as their
    destination: they are `inbound` entries (ztunnel's InboundConnectionDump: `src`, `originalDst` (the service
    named by the request, which Ambit does not keep: null), `actualDst`, `protocol` HBONE with a peer identity,
    else TCP). ``outbound`` are the connections the agent carries for its pods as their source (ztunnel's
    OutboundConnection, src/proxy/connection_manager.rs track_outbound: `src`, `originalDst` what the pod dialled,
    `actualDst` where the agent connects, `protocol`)."""
    inbound: dict[str, list[dict[str, Any]]] = {}
    for t in tracked:
        c = t.conn
        inbound.setdefault(t.workload_uid, []).append(
            {
                "src": format_address((c.src_ip, c.src_port)),
                "originalDst": None,
                "actualDst": format_address((c.dst_ip, c.dst_port)),
                "protocol": "HBONE" if c.src_identity is not None else "TCP",
            }
        )
    carried: dict[str, list[dict[str, Any]]] = {}
    for o in outbound:
        carried.setdefault(o.workload_uid, []).append(
            {
                "src": format_address(o.src),
                "originalDst": format_address(o.original_dst),
                "actualDst": format_address(o.actual_dst),
                "protocol": o.protocol,
            }
        )
    out: dict[str, dict[str, Any]] = {}
    for wl in sorted(store.local_workloads(node), key=lambda w: w.uid):
        if not any(ip in enrolled for ip in workload_ips(wl)):
            continue
        conns = sorted(inbound.get(wl.uid, []), key=lambda e: (e["actualDst"], e["src"]))
        out[wl.uid] = {
            "state": "Up",
            "connections": {
                "inbound": conns,
                "outbound": sorted(carried.get(wl.uid, []), key=lambda e: (e["originalDst"], e["src"])),
            },
            "info": {"name": wl.name, "namespace": wl.namespace, "serviceAccount": wl.service_account or "default"},
        }
    return out
