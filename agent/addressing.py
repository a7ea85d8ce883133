"""What the proxy paths derive from `istio.workload` protobufs: a workload's IPs, SPIFFE identity and `baggage`, a
service's target port and SANs, and the `ip:port` text of HBONE's `:authority`.

Istio elides `trust_domain` when it is the mesh default and `service_account` when it is "default"
(reference §2.1), so both are filled in here rather than at every call site.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from common.spiffe import Identity, InvalidIdentity

HBONE = 1  # istio.workload.TunnelProtocol.HBONE
HEALTHY = 0  # istio.workload.WorkloadStatus.HEALTHY
LB_STRICT, LB_FAILOVER, LB_PASSTHROUGH = 1, 2, 3  # istio.workload.LoadBalancing.Mode
LB_ALLOW_ALL = 1  # istio.workload.LoadBalancing.HealthPolicy.ALLOW_ALL
IPV4_ONLY, IPV6_ONLY = 1, 2  # istio.workload.IPFamilies
HOST_NETWORK = 1  # istio.workload.NetworkMode.HOST_NETWORK

Address = tuple[str, int]

_WORKLOAD_TYPES = {0: "deployment", 1: "cronjob", 2: "pod", 3: "job"}  # istio.workload.WorkloadType

# The agent's own listeners (outbound, inbound plaintext, HBONE): never a destination, or traffic would loop.
AGENT_PORTS = frozenset({15001, 15006, 15008})


class BadAuthority(ValueError):
    """A CONNECT `:authority` that is not `ip:port` (IPv6 as `[ip]:port`) with a port in 1..65535."""


def is_pod(wl: Any) -> bool:
    """A Kubernetes Pod, not a WorkloadEntry or ServiceEntry endpoint (which may name any address, behind any NAT):
    ztunnel tells them apart by uid (`<cluster>//Pod/<namespace>/<name>`)."""
    return "//Pod/" in wl.uid


def workload_identity(wl: Any, default_trust_domain: str) -> Identity:
    return Identity(wl.trust_domain or default_trust_domain, wl.namespace, wl.service_account or "default")


def service_sans(svc: Any) -> tuple[frozenset[Identity], list[str]]:
    """The identities `svc`'s `subject_alt_names` name, which its endpoints may prove instead of their own (ztunnel's
    workload_and_services_san), and the SANs that are no SPIFFE ID (ignored there with a warning)."""
    ids: set[Identity] = set()
    invalid: list[str] = []
    for san in svc.subject_alt_names:
        try:
            ids.add(Identity.parse(san))
        except InvalidIdentity:
            invalid.append(san)
    return frozenset(ids), invalid


def baggage(wl: Any) -> str:
    """ztunnel's `baggage` value describing `wl` (the source on a CONNECT, the destination on its 200); empty
    parts are left out."""
    parts = [
        ("k8s.cluster.name", wl.cluster_id),
        ("k8s.namespace.name", wl.namespace),
        (f"k8s.{_WORKLOAD_TYPES.get(wl.workload_type, 'deployment')}.name", wl.workload_name),
        ("service.name", wl.canonical_name),
        ("service.version", wl.canonical_revision),
        ("cloud.region", wl.locality.region),
        ("cloud.availability_zone", wl.locality.zone),
    ]
    return ",".join(f"{k}={v}" for k, v in parts if v)


def workload_baggage(store: Any, wl: Any) -> str:
    """`baggage(wl)` once per store version: it goes on every CONNECT (the source's) and every 200 (the
    destination's), and building it from the proto took ~4 us warm, more on a connection's cold path."""
    return str(store.memoized(("baggage", id(wl)), lambda: baggage(wl)))


def workload_ips(wl: Any) -> list[str]:
    out = []
    for raw in wl.addresses:
        if len(raw) in (4, 16):
            out.append(str(ipaddress.ip_address(bytes(raw))))
    return out


def endpoint_address(wl: Any, want_v6: bool, families: int) -> bytes | None:
    """The packed address to reach service endpoint `wl` at, as ztunnel's pick_workload_destination: one the
    service's `ip_families` allow, of the family the client used (`want_v6`) when the endpoint has one, else its
    first allowed one; None when it has no allowed address. Family by length: no text per endpoint."""
    other = None
    for raw in wl.addresses:
        size = len(raw)
        if size != 4 and size != 16:
            continue
        v6 = size == 16
        if (families == IPV4_ONLY and v6) or (families == IPV6_ONLY and not v6):
            continue
        if v6 == want_v6:
            return bytes(raw)
        if other is None:
            other = bytes(raw)
    return other


def ip_text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(packed) == 16 else socket.AF_INET, packed)


def service_target_port(svc: Any, port: int) -> int | None:
    """`svc`'s target port for its port `port`: None when the service does not declare `port` (no upstream, as in
    ztunnel), 0 for a named port (only endpoints that map it in their own `services` entry can serve it)."""
    for p in svc.ports:
        if p.service_port == port:
            return int(p.target_port)
    return None


def format_address(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def socket_address(addr: Address) -> tuple[str, int] | tuple[str, int, int, int]:
    """What connect() and bind() take for `addr`. An IPv6 address with a zone (`fe80::1%3`, as on-demand DNS
    writes a link-local answer, or `%eth0`) becomes the 4-tuple carrying it as sin6_scope_id: Python reads no zone
    from the text, so the 2-tuple would connect with scope 0 and fail (EINVAL) or leave by the wrong interface.
    An unknown interface name raises OSError, as a failed connect does."""
    host, port = addr
    if "%" not in host:
        return addr
    ip, _, zone = host.partition("%")
    return (ip, port, 0, int(zone) if zone.isascii() and zone.isdigit() else socket.if_nametoindex(zone))


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, in the text the socket calls give (IPv4 as IPv4: sockets.canonical_ip). By its text: asked
    of every accepted connection, where ipaddress costs microseconds."""
    return ip.startswith("127.") or ip == "::1" or ip.startswith("::1%")


def without_zone(ip: str) -> str:
    """`ip` without its zone: what a peer knows the address by (an HBONE `:authority`, policy), and what the
    loopback check compares."""
    return ip.partition("%")[0]


def parse_authority(text: str) -> Address:
    """Parse HBONE's `:authority`; hostnames are refused (only double HBONE uses them, which Ambit does not)."""
    host, sep, port_text = text.rpartition(":")
    # isascii: headers decode as latin-1, whose "¹²³" are isdigit() yet not int()-able (nor digits to HTTP)
    if not sep or not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise BadAuthority(f"authority {text!r}: expected ip:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise BadAuthority(f"authority {text!r}: port out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise BadAuthority(f"authority {text!r}: brackets around a non-IPv6 address")
    elif ":" in host:
        raise BadAuthority(f"authority {text!r}: IPv6 address must be in brackets")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:  # inet_pton/ntop: the canonical text of the address, at a fraction of ipaddress's cost per stream
        ip = socket.inet_ntop(family, socket.inet_pton(family, host))
    except (OSError, ValueError):
        raise BadAuthority(f"authority {text!r}: {host!r} is not an IP address") from None
    return (ip, port)


def destination_service(store: Any, wl: Any, port: int, host: str | None = None) -> Any | None:
    """The service a connection to `wl` at `port` was meant for (the destination_service labels), as ztunnel's
    guess_inbound_service (src/proxy.rs): the service of `wl` the client's agent named (`forwarded` host=), else the
    first of its services, in key order, that serves `port` either as the service's own target port or as the port
    `wl` maps one of the service's ports to in its own port list (a named target port). The service's target ports
    count when `wl` lists no ports for it, or not that one: the list maps only what the workload overrides.

    Asked on every inbound connection, so the index is built once per store version (sorting the services per
    connection cost ~8 us warm for a workload of three, the memoized lookup ~0.7 us); a peer's `host` is looked up
    in it, never a memo key of its own, so arbitrary values cannot crowd the memo."""
    by_host, by_port = store.memoized(("destination_services", id(wl)), lambda: _services_by_port(store, wl))
    if host:
        svc = by_host.get(host)
        if svc is not None:
            return svc
    return by_port.get(port)


def _services_by_port(store: Any, wl: Any) -> tuple[dict[str, Any], dict[int, Any]]:
    """`wl`'s services by hostname and by each port they reach it on; the first in key order wins each, and a key
    (`namespace/hostname`) whose service the store does not hold yet is passed over."""
    by_host: dict[str, Any] = {}
    by_port: dict[int, Any] = {}
    for key, plist in sorted(wl.services.items()):
        svc = store.service_by_key(key)
        if svc is None:
            continue
        _, slash, hostname = key.rpartition("/")
        if slash:
            by_host.setdefault(hostname, svc)
        mapped = {p.service_port: p.target_port for p in plist.ports}
        for p in svc.ports:
            if p.target_port:
                by_port.setdefault(p.target_port, svc)
            if target := mapped.get(p.service_port):
                by_port.setdefault(target, svc)
    return by_host, by_port
