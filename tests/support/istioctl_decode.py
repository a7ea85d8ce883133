"""What `istioctl ztunnel-config` makes of a node proxy's /config_dump, without Go: its structs as a schema, decoded
with encoding/json's rules, and the rows its table writers print.

Source: istio/istio at 86c9f01fd735fb01d8192f5bcaf0d424afb7f14c,
istioctl/pkg/writer/ztunnel/configdump/api.go (the structs, lines 23-216), configdump.go (rawDump lines 45-51,
Prime and unmarshalListOrMap lines 54-94), workload.go (PrintWorkloadSummary lines 72-108, waypointName 132-149),
services.go (PrintServiceSummary lines 45-89), policies.go (PrintPolicySummary lines 45-63), certificates.go
(PrintSecretSummary lines 50-89), connections.go (PrintConnectionsSummary lines 85-154).

encoding/json's rules emulated (https://pkg.go.dev/encoding/json#Unmarshal): an object key names the struct field of
that JSON name, exactly or else without regard to case, and unknown keys are ignored; `null` leaves the zero value;
a value of another JSON type than the field's, a non-integer or out-of-range number for an integer field, or a map
key that does not parse as the map's integer key type is an UnmarshalTypeError, which fails Prime and so the command.
Stricter than Go on one point, deliberately: two keys of one object naming the same field (Go keeps the last) are an
error here, since that is a dump whose reading depends on key order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class GoDecodeError(Exception):
    """Where and why Go's json.Unmarshal would fail (or, for a key collision, read the dump ambiguously)."""


@dataclass(frozen=True)
class Int:
    bits: int
    signed: bool = False


@dataclass(frozen=True)
class Slice:
    elem: Any


@dataclass(frozen=True)
class Map:
    key: Any  # "string" or an Int
    elem: Any


@dataclass(frozen=True)
class Ptr:
    elem: Any


@dataclass(frozen=True)
class Struct:
    name: str
    fields: tuple[tuple[str, Any], ...]  # (json name, type), in the Go struct's order


STRING, BOOL, ANY, CIDRVIP = "string", "bool", "any", "CIDRVIP"
UINT16, UINT32, INT = Int(16), Int(32), Int(64, signed=True)


def struct(go_name: str, /, **fields: Any) -> Struct:
    return Struct(go_name, tuple(fields.items()))


# api.go, field by field (json tags as the keys)
LOCALITY = struct("Locality", region=STRING, zone=STRING, subzone=STRING)
GATEWAY_ADDRESS = struct("GatewayAddress", destination=STRING)
APPLICATION_TUNNEL = struct("ApplicationTunnel", protocol=STRING, port=Ptr(UINT16))
ZTUNNEL_WORKLOAD = struct(
    "ZtunnelWorkload",
    uid=STRING,
    workloadIps=Slice(STRING),
    waypoint=Ptr(GATEWAY_ADDRESS),
    networkGateway=Ptr(GATEWAY_ADDRESS),
    protocol=STRING,
    name=STRING,
    namespace=STRING,
    serviceAccount=STRING,
    workloadName=STRING,
    workloadType=STRING,
    canonicalName=STRING,
    canonicalRevision=STRING,
    clusterId=STRING,
    trustDomain=STRING,
    locality=LOCALITY,
    node=STRING,
    network=STRING,
    status=STRING,
    hostname=STRING,
    capacity=UINT32,
    applicationTunnel=APPLICATION_TUNNEL,
    authorizationPolicies=Slice(STRING),
)
LOAD_BALANCER = struct("LoadBalancer", mode=STRING, routingPreferences=Slice(STRING), healthPolicy=STRING)
ZTUNNEL_ENDPOINT = struct(
    "ZtunnelEndpoint", workloadUid=STRING, service=STRING, address=STRING, port=Map(UINT16, UINT16)
)
ZTUNNEL_SERVICE = struct(
    "ZtunnelService",
    name=STRING,
    namespace=STRING,
    hostname=STRING,
    vips=Slice(STRING),
    cidrVips=Slice(CIDRVIP),
    ports=Map(STRING, INT),
    loadBalancer=Ptr(LOAD_BALANCER),
    waypoint=Ptr(GATEWAY_ADDRESS),
    endpoints=Map(STRING, Ptr(ZTUNNEL_ENDPOINT)),
    subjectAltNames=Slice(STRING),
    ipFamilies=STRING,
    canonical=BOOL,
    visibility=STRING,
)
STRING_MATCH = struct("StringMatch", Exact=STRING, Suffix=STRING, Prefix=STRING, Presence=ANY)
SERVICE_ACCOUNT_MATCH = struct("ServiceAccountMatch", namespace=STRING, serviceAccount=STRING)
POLICY_MATCH = struct(
    "PolicyMatch",
    namespaces=Slice(STRING_MATCH),
    notNamespaces=Slice(STRING_MATCH),
    principals=Slice(STRING_MATCH),
    notPrincipals=Slice(STRING_MATCH),
    sourceIps=Slice(STRING),
    notSourceIps=Slice(STRING),
    destinationIps=Slice(STRING),
    notDestinationIps=Slice(STRING),
    destinationPorts=Slice(UINT16),
    notDestinationPorts=Slice(UINT16),
    serviceAccounts=Slice(SERVICE_ACCOUNT_MATCH),
    notServiceAccounts=Slice(SERVICE_ACCOUNT_MATCH),
)
ZTUNNEL_POLICY = struct(
    "ZtunnelPolicy",
    name=STRING,
    namespace=STRING,
    scope=STRING,
    action=STRING,
    rules=Slice(Slice(Slice(Ptr(POLICY_MATCH)))),
)
CERT = struct("Cert", pem=STRING, serialNumber=STRING, validFrom=STRING, expirationTime=STRING)
CERTS_DUMP = struct("CertsDump", identity=STRING, state=STRING, certChain=Slice(Ptr(CERT)), rootCerts=Slice(Ptr(CERT)))
CONNECTION = struct("Connection", src=STRING, originalDst=STRING, actualDst=STRING, protocol=STRING)
WORKLOAD_STATE = struct(
    "WorkloadState",
    state=STRING,
    connections=struct("WorkloadConnections", inbound=Slice(CONNECTION), outbound=Slice(CONNECTION)),
    info=struct("WorkloadInfo", name=STRING, namespace=STRING, trustDomain=STRING, serviceAccount=STRING),
)
# configdump.go rawDump: four sections read as a list or a map (unmarshalListOrMap), and workloadstate
LIST_OR_MAP_SECTIONS = {
    "services": ZTUNNEL_SERVICE,
    "workloads": ZTUNNEL_WORKLOAD,
    "policies": ZTUNNEL_POLICY,
    "certificates": CERTS_DUMP,
}
RAW_DUMP = struct(
    "rawDump",
    services=ANY,
    workloads=ANY,
    policies=ANY,
    certificates=ANY,
    workloadstate=Map(STRING, WORKLOAD_STATE),
)


def zero(t: Any) -> Any:
    if t == STRING:
        return ""
    if t == BOOL:
        return False
    if isinstance(t, Int):
        return 0
    if isinstance(t, Struct):
        return {name: zero(ft) for name, ft in t.fields}
    return None  # slices, maps, pointers, any


def _field_of(t: Struct, key: str) -> str | None:
    names = [name for name, _ in t.fields]
    if key in names:
        return key
    folded = [name for name in names if name.lower() == key.lower()]
    return folded[0] if folded else None


def decode(t: Any, value: Any, path: str = "$") -> Any:
    """``value`` (parsed JSON) decoded into Go type ``t`` as encoding/json does; GoDecodeError where it fails."""
    if value is None:
        return zero(t)
    if t == ANY:
        return value
    if t == STRING:
        if not isinstance(value, str):
            raise GoDecodeError(f"{path}: {type(value).__name__} into a Go string")
        return value
    if t == BOOL:
        if not isinstance(value, bool):
            raise GoDecodeError(f"{path}: {type(value).__name__} into a Go bool")
        return value
    if isinstance(t, Int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise GoDecodeError(f"{path}: {value!r} into a Go integer")
        low, high = (-(1 << (t.bits - 1)), (1 << (t.bits - 1)) - 1) if t.signed else (0, (1 << t.bits) - 1)
        if not low <= value <= high:
            raise GoDecodeError(f"{path}: {value} overflows a {'' if t.signed else 'u'}int{t.bits}")
        return value
    if t == CIDRVIP:  # api.go CIDRVIP.UnmarshalJSON: an object {cidr, network}, or "network/cidr"
        if isinstance(value, str):
            network, sep, cidr = value.partition("/")
            if not sep:
                raise GoDecodeError(f"{path}: invalid cidrVip {value!r}")
            return {"cidr": cidr, "network": network}
        return decode(struct("CIDRVIP", cidr=STRING, network=STRING), value, path)
    if isinstance(t, Ptr):
        return decode(t.elem, value, path)
    if isinstance(t, Slice):
        if not isinstance(value, list):
            raise GoDecodeError(f"{path}: {type(value).__name__} into a Go slice")
        return [decode(t.elem, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(t, Map):
        if not isinstance(value, dict):
            raise GoDecodeError(f"{path}: {type(value).__name__} into a Go map")
        out = {}
        for k, v in value.items():
            key: Any = k
            if isinstance(t.key, Int):
                if not k.isdigit() or int(k) >= 1 << t.key.bits:
                    raise GoDecodeError(f"{path}: map key {k!r} is no uint{t.key.bits}")
                key = int(k)
            out[key] = decode(t.elem, v, f"{path}[{k!r}]")
        return out
    if isinstance(t, Struct):
        if not isinstance(value, dict):
            raise GoDecodeError(f"{path}: {type(value).__name__} into Go struct {t.name}")
        out = zero(t)
        seen: dict[str, str] = {}
        types = dict(t.fields)
        for k, v in value.items():
            name = _field_of(t, k)
            if name is None:
                continue  # unknown keys are ignored
            if name in seen:
                raise GoDecodeError(f"{path}: keys {seen[name]!r} and {k!r} both name {t.name}.{name}")
            seen[name] = k
            out[name] = decode(types[name], v, f"{path}.{k}")
        return out
    raise AssertionError(f"unknown schema type {t!r}")


def prime(dump: Mapping[str, Any]) -> dict[str, Any]:
    """configdump.go ConfigWriter.Prime: the ZtunnelDump istioctl's writers read (lists, from a list or a map)."""
    raw = decode(RAW_DUMP, dict(dump))
    out: dict[str, Any] = {}
    for section, t in LIST_OR_MAP_SECTIONS.items():
        value = raw[section]
        if isinstance(value, dict):  # unmarshalListOrMap: a map's values
            out[section] = list(decode(Map(STRING, Ptr(t)), value, f"$.{section}").values())
        else:
            out[section] = decode(Slice(Ptr(t)), value, f"$.{section}") or []
    out["workloadState"] = raw["workloadstate"] or {}
    return out


def waypoint_name(gateway: dict[str, Any] | None, services: list[dict[str, Any]]) -> str:
    """workload.go waypointName / serviceWaypointName."""
    if gateway is None:
        return "None"
    for svc in services:
        if f"{svc['namespace']}/{svc['hostname']}" == gateway["destination"]:
            return str(svc["name"])
        if gateway["destination"] in (svc["vips"] or []):
            return str(svc["name"])
    return "NA"


def workload_rows(z: dict[str, Any]) -> list[list[str]]:
    """workload.go PrintWorkloadSummary: NAMESPACE, POD NAME, ADDRESS, NODE, WAYPOINT, PROTOCOL."""
    wls = sorted(z["workloads"], key=lambda w: (w["namespace"] + "." + w["name"], w["node"]))
    return [
        [
            w["namespace"],
            w["name"],
            ",".join(w["workloadIps"] or []) or w["hostname"],
            w["node"],
            waypoint_name(w["waypoint"], z["services"]),
            w["protocol"],
        ]
        for w in wls
    ]


def service_rows(z: dict[str, Any]) -> list[list[str]]:
    """services.go PrintServiceSummary: NAMESPACE, SERVICE NAME, SERVICE VIP, WAYPOINT, ENDPOINTS (healthy/all,
    healthy being the endpoint's workload's `status` == "Healthy")."""
    by_uid = {w["uid"]: w for w in z["workloads"]}
    rows = []
    for svc in sorted(z["services"], key=lambda s: (s["namespace"], s["name"], s["hostname"])):
        ips = [vip.partition("/")[2] for vip in svc["vips"] or []]
        endpoints = svc["endpoints"] or {}
        healthy = sum(
            1
            for ep in endpoints.values()
            if ep["workloadUid"] in by_uid and by_uid[ep["workloadUid"]]["status"] == "Healthy"
        )
        rows.append(
            [
                svc["namespace"],
                svc["name"],
                ",".join(ips),
                waypoint_name(svc["waypoint"], z["services"]),
                f"{healthy}/{len(endpoints)}",
            ]
        )
    return rows


def policy_rows(z: dict[str, Any]) -> list[list[str]]:
    """policies.go PrintPolicySummary: NAMESPACE, POLICY NAME, ACTION, SCOPE."""
    pols = sorted(z["policies"], key=lambda p: (p["namespace"], p["name"]))
    return [[p["namespace"], p["name"], p["action"], p["scope"]] for p in pols]


def secret_rows(z: dict[str, Any]) -> list[list[str]]:
    """certificates.go PrintSecretSummary (without the validity column, which depends on the clock): CERTIFICATE
    NAME, TYPE, STATUS, SERIAL NUMBER (hex of the decimal), NOT AFTER, NOT BEFORE."""
    rows = []
    for secret in z["certificates"]:
        state = "Unavailable" if "Unavailable" in secret["state"] else secret["state"]
        chain, roots = secret["certChain"] or [], secret["rootCerts"] or []
        if not chain:
            rows.append([secret["identity"], "NA", state, "NA", "NA", "NA"])
            continue
        for i, cert in enumerate(chain):
            kind = "Leaf" if i == 0 else ("Root" if i == len(chain) - 1 and not roots else "Intermediate")
            rows.append(_cert_row(secret["identity"], kind, state, cert))
        rows += [_cert_row(secret["identity"], "Root", state, cert) for cert in roots]
    return rows


def _cert_row(identity: str, kind: str, state: str, cert: dict[str, Any]) -> list[str]:
    serial = f"{int(cert['serialNumber'], 10):x}" if cert["serialNumber"].isdigit() else "<nil>"
    return [identity, kind, state, serial, cert["expirationTime"] or "NA", cert["validFrom"] or "NA"]


def connection_rows(z: dict[str, Any]) -> list[list[str]]:
    """connections.go PrintConnectionsSummary: WORKLOAD, DIRECTION, LOCAL, REMOTE, REMOTE TARGET, PROTOCOL, with
    addresses named after the service (first VIP) or workload (first IP) that owns them."""
    names: dict[str, str] = {}
    for s in z["services"]:
        names[(s["vips"] or ["/None"])[0].partition("/")[2] or "None"] = s["hostname"]
    workloads = {((w["workloadIps"] or ["None"])[0] or "None"): f"{w['name']}.{w['namespace']}" for w in z["workloads"]}

    def lookup(addr: str) -> str:
        host, _, port = addr.rpartition(":")
        ip = host.strip("[]")
        for table in (names, workloads):
            if ip in table:
                name = table[ip]
                return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"
        return addr

    rows = []
    states = sorted(z["workloadState"].values(), key=lambda s: (s["info"]["namespace"], s["info"]["name"]))
    for st in states:
        name = f"{st['info']['name']}.{st['info']['namespace']}"
        for c in st["connections"]["inbound"] or []:
            rows.append([name, "Inbound", lookup(c["actualDst"]), lookup(c["src"]), c["originalDst"], c["protocol"]])
        for c in st["connections"]["outbound"] or []:
            rows.append(
                [name, "Outbound", lookup(c["src"]), lookup(c["actualDst"]), lookup(c["originalDst"]), c["protocol"]]
            )
    return rows
