"""Which interface carries which pod, and which routes are refused, decided without the kernel."""

from __future__ import annotations

import pytest

from agent.redirect_netlink import RTN_LOCAL, RTN_UNICAST, RouteInfo
from agent.redirect_plan import PodInterface, RouteProblem, classify_route, plan_capture

NAMES = {1: "lo", 2: "eth0", 3: "vethA", 4: "vethB", 5: "cni0"}
UPLINKS = {2: "eth0"}


def _classify(route: RouteInfo | None, ip: str = "10.0.1.5") -> PodInterface:
    return classify_route(ip, route, NAMES.get, UPLINKS)


def test_direct_route_to_a_pod_interface() -> None:
    assert _classify(RouteInfo(RTN_UNICAST, 3, None)) == PodInterface(3, "vethA")


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        (None, "no route to 10.0.1.5"),
        (RouteInfo(RTN_LOCAL, 1, None), "local address of the node"),
        (RouteInfo(6, 3, None), "type blackhole"),
        (RouteInfo(RTN_UNICAST, None, None), "no output interface"),
        (RouteInfo(RTN_UNICAST, 9, None), "index 9, which no longer exists"),
        (RouteInfo(RTN_UNICAST, 2, "10.0.0.2"), "via gateway 10.0.0.2 on eth0"),
        (RouteInfo(RTN_UNICAST, 2, None), "leaves through the uplink eth0"),
        (RouteInfo(RTN_UNICAST, 1, None), "points at lo"),
    ],
)
def test_odd_routes_are_refused_with_the_reason(route: RouteInfo | None, reason: str) -> None:
    with pytest.raises(RouteProblem, match=reason):
        _classify(route)


def _resolver(table: dict[str, PodInterface | str]):  # type: ignore[no-untyped-def]
    def resolve(ip: str) -> PodInterface:
        found = table[ip]
        if isinstance(found, str):
            raise RouteProblem(found)
        return found

    return resolve


A, B, C = PodInterface(3, "vethA"), PodInterface(4, "vethB"), PodInterface(5, "cni0")


def test_enrolled_and_peer_pods_are_grouped_per_interface() -> None:
    resolve = _resolver({"10.0.1.5": A, "10.0.2.5": B, "10.0.3.5": C, "10.0.3.6": C})
    plan = plan_capture({"10.0.1.5", "10.0.3.5"}, {"10.0.2.5", "10.0.3.6"}, resolve)
    assert plan.failures == {}
    assert plan.interfaces[3].enrolled == {"10.0.1.5"} and plan.interfaces[3].peers == set()
    assert plan.interfaces[4].enrolled == set() and plan.interfaces[4].peers == {"10.0.2.5"}
    # A bridge carrying an enrolled and a non-enrolled pod: one attachment, both roles.
    assert plan.interfaces[5].enrolled == {"10.0.3.5"} and plan.interfaces[5].peers == {"10.0.3.6"}
    assert plan.homes_on([3, 4]) == {"10.0.1.5": 3}
    assert plan.homes_on([3, 5]) == {"10.0.1.5": 3, "10.0.3.5": 5}  # peers have no home: they are not enrolled


def test_peers_get_no_program_while_nothing_local_is_enrolled() -> None:
    resolve = _resolver({"10.0.1.5": "no route to 10.0.1.5", "10.0.2.5": B})
    plan = plan_capture({"10.0.1.5"}, {"10.0.2.5"}, resolve)
    assert plan.interfaces == {}
    assert plan.failures == {"10.0.1.5": "no route to 10.0.1.5"}


def test_pod_interfaces_nobody_named_get_the_program_while_something_is_enrolled() -> None:
    """A pod the controller has not listed yet still calls enrolled pods; the call is only captured at its own
    interface, which is known from the pod route alone."""
    resolve = _resolver({"10.0.1.5": A, "10.0.2.5": B})
    links = {4: "vethB", 9: "vethNew"}
    plan = plan_capture({"10.0.1.5"}, {"10.0.2.5"}, resolve, links)
    assert set(plan.interfaces) == {3, 4, 9}
    assert plan.interfaces[9].name == "vethNew" and not plan.interfaces[9].enrolled | plan.interfaces[9].peers
    assert plan.interfaces[4].peers == {"10.0.2.5"}  # a named pod's interface keeps what it knows
    assert plan.homes_on(plan.interfaces) == {"10.0.1.5": 3}  # nobody's home
    assert plan_capture(set(), {"10.0.2.5"}, resolve, links).interfaces == {}  # nothing enrolled: nothing needed


def test_unparseable_addresses_fail_alone_and_ipv6_is_planned_like_ipv4() -> None:
    resolve = _resolver({"10.0.1.5": A, "fd00::1": A})
    plan = plan_capture({"10.0.1.5", "fd00::1", "pod-a"}, set(), resolve)
    assert set(plan.interfaces) == {3}
    assert plan.interfaces[3].enrolled == {"10.0.1.5", "fd00::1"}
    assert "not an IP address" in plan.failures["pod-a"]


def test_unresolvable_non_enrolled_pods_are_skipped_not_failed() -> None:
    resolve = _resolver({"10.0.1.5": A, "10.0.0.1": "10.0.0.1 is a local address of the node"})
    plan = plan_capture({"10.0.1.5"}, {"10.0.0.1", "pod-z"}, resolve)
    assert plan.failures == {}
    assert set(plan.skipped) == {"10.0.0.1", "pod-z"}
    assert "local address" in plan.skipped["10.0.0.1"]
