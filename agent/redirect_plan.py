"""Sans-IO core of reconciliation: which interface carries which pod, and which pods can be captured at all.

Kept free of netlink and BPF so the decisions (odd routes, bad addresses, which non-enrolled pods need the program for
same-node calls to enrolled ones) are unit-tested with plain values.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field

from agent.redirect_netlink import RTN_LOCAL, RTN_UNICAST, RouteInfo

_RTN_NAMES = {
    0: "unspec",
    1: "unicast",
    2: "local",
    3: "broadcast",
    4: "anycast",
    5: "multicast",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
    9: "throw",
    10: "nat",
}


class RouteProblem(Exception):
    """The route to a pod IP does not lead to a pod interface of this node; the message says why."""


@dataclass(frozen=True)
class PodInterface:
    index: int
    name: str


@dataclass
class InterfacePlan:
    name: str
    enrolled: set[str] = field(default_factory=set)
    peers: set[str] = field(default_factory=set)  # non-enrolled local pods: only same-node capture to enrolled ones


@dataclass
class Plan:
    interfaces: dict[int, InterfacePlan] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # enrolled workloads that cannot be captured
    skipped: dict[str, str] = field(default_factory=dict)  # non-enrolled pods left without the program (why)

    def homes_on(self, indexes: Iterable[int]) -> dict[str, int]:
        """Enrolled workload -> its interface, for the interfaces in ``indexes`` (those that carry the program): the
        enrollment to write, and the one interface each enrolled address may be sent from."""
        return {ip: idx for idx in indexes for ip in self.interfaces[idx].enrolled}


def classify_route(
    ip: str, route: RouteInfo | None, link_name: Callable[[int], str | None], uplinks: Mapping[int, str]
) -> PodInterface:
    """The pod interface for ``ip`` or RouteProblem: only a direct unicast route out of a non-uplink interface is a
    local pod (a veth, or a bridge for bridge-style CNIs)."""
    if route is None:
        raise RouteProblem(f"no route to {ip} in the node network namespace (is the pod on this node?)")
    if route.rtype == RTN_LOCAL:
        raise RouteProblem(
            f"{ip} is a local address of the node (hostNetwork pod or node IP): there is no pod interface to capture"
        )
    if route.rtype != RTN_UNICAST:
        raise RouteProblem(f"route to {ip} is of type {_RTN_NAMES.get(route.rtype, route.rtype)}, not a pod route")
    if route.oif is None:
        raise RouteProblem(f"route to {ip} has no output interface")
    name = link_name(route.oif)
    if name is None:
        raise RouteProblem(f"route to {ip} points at interface index {route.oif}, which no longer exists")
    if route.gateway:
        raise RouteProblem(
            f"route to {ip} goes via gateway {route.gateway} on {name}: the pod is not attached to this node"
        )
    if route.oif in uplinks:
        raise RouteProblem(f"route to {ip} leaves through the uplink {name}: not a pod of this node")
    if name == "lo":
        raise RouteProblem(f"route to {ip} points at lo: not a pod interface")
    return PodInterface(route.oif, name)


def _check_ip(ip: str) -> str | None:
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return f"{ip!r} is not an IP address"
    return None


def plan_capture(
    enrolled: Iterable[str],
    local: Iterable[str],
    resolve: Callable[[str], PodInterface],
    pod_links: Mapping[int, str] | None = None,
) -> Plan:
    """Group pods by interface. Non-enrolled local pods get the program only while some local pod is enrolled:
    that is the only case where their traffic can need capture (a same-node call to an enrolled pod goes to the
    inbound listener) or a return path (the agent's source-preserving upstream connections).

    ``pod_links`` (index -> name) are interfaces that hold a pod route whether or not the controller named the pod
    behind them: a pod it has not listed yet (just created) or never lists calls enrolled pods all the same, and
    such a call is only captured at the caller's interface. They get the program on the same terms as peers."""
    plan = Plan()
    enrolled_set = set(enrolled)
    resolved: dict[str, PodInterface] = {}
    for ip in sorted(enrolled_set | set(local)):
        # A non-enrolled pod we cannot find (a hostNetwork pod, an address without a route) is not an error: it is only
        # reported, since nothing of the mesh depends on it.
        problems = plan.failures if ip in enrolled_set else plan.skipped
        problem = _check_ip(ip)
        if problem:
            problems[ip] = problem
            continue
        try:
            resolved[ip] = resolve(ip)
        except RouteProblem as exc:
            problems[ip] = str(exc)
    any_enrolled = any(ip in resolved for ip in enrolled_set)
    for ip, iface in resolved.items():
        if ip in enrolled_set:
            plan.interfaces.setdefault(iface.index, InterfacePlan(iface.name)).enrolled.add(ip)
        elif any_enrolled:
            plan.interfaces.setdefault(iface.index, InterfacePlan(iface.name)).peers.add(ip)
    if any_enrolled:
        for index, name in (pod_links or {}).items():
            plan.interfaces.setdefault(index, InterfacePlan(name))
    return plan


@dataclass(frozen=True)
class Sighting:
    """Where an enrolled address was last captured, and under which workload (the caller's owner token)."""

    index: int
    owner: str


def hold_reused_addresses(
    enrolled: Iterable[str],
    homes: Mapping[str, int],
    owners: Mapping[str, str],
    seen: Mapping[str, Sighting],
    held: Mapping[str, str],
    expired: Set[str] = frozenset(),
) -> tuple[dict[str, str], dict[str, Sighting]]:
    """Which enrolled addresses must not be taken for the workload the controller names for them.

    Identity is keyed by IP: when a pod goes and a new sandbox gets its IP before the controller has caught up, the
    new pod would be captured as the old workload (its certificate, its policy, its inbound traffic). What the node
    shows is the address coming back behind another interface (``homes``, this reconcile) than where it was captured
    (``seen``) while the owner token the caller gives for it (workload uid and resource version) is unchanged. Such an
    address is held, under that token, until the token changes (the controller confirms the new pod, or a new
    version of the same workload) or it leaves ``enrolled``. Returns (held: address -> token, sightings to keep).
    An address enrolled but without a home this time (its interface gone, the new one not there yet) keeps its
    sighting, so the usual order, old interface deleted then a new one created, is caught too.

    ``expired`` are held addresses the caller has held long enough: released as the workload named for them, and
    seen where they are now, so they are not held again for the same move. Without that, a pod sandbox re-created
    with its IP while nothing the controller sends changes (a static config, a pod whose status does not move)
    would stay cut off for good.
    """
    still = set(enrolled)
    out_held = {
        ip: token for ip, token in held.items() if ip in still and ip not in expired and owners.get(ip, "") == token
    }
    out_seen = {ip: s for ip, s in seen.items() if ip in still and ip not in homes}
    for ip, index in homes.items():
        token = owners.get(ip, "")
        last = seen.get(ip)
        moved = last is not None and last.index != index and last.owner == token
        if moved and ip not in out_held and ip not in expired:
            out_held[ip] = token
        out_seen[ip] = Sighting(index, token)
    return out_held, out_seen
