"""Which interface carries which pod, and which routes are refused, decided without the kernel."""

from __future__ import annotations

import pytest

from agent.redirect_netlink import RTN_LOCAL, RTN_UNICAST, RouteInfo
from agent.redirect_plan import (
    PodInterface,
    RouteProblem,
    Sighting,
    classify_route,
    hold_reused_addresses,
    plan_capture,
)

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


IP_A, IP_B = "10.0.1.5", "10.0.1.6"


def test_an_address_back_behind_another_interface_under_the_same_owner_is_held() -> None:
    seen = {IP_A: Sighting(3, "pod-a@1"), IP_B: Sighting(4, "pod-b@1")}
    held, seen = hold_reused_addresses({IP_A, IP_B}, {IP_A: 7, IP_B: 4}, {IP_A: "pod-a@1", IP_B: "pod-b@1"}, seen, {})
    assert held == {IP_A: "pod-a@1"}  # IP_B stayed where it was
    assert seen == {IP_A: Sighting(7, "pod-a@1"), IP_B: Sighting(4, "pod-b@1")}
    # Still held on the next reconcile, though it no longer moves; released once the owner token changes.
    held, seen = hold_reused_addresses({IP_A, IP_B}, {IP_A: 7, IP_B: 4}, {IP_A: "pod-a@1", IP_B: "pod-b@1"}, seen, held)
    assert held == {IP_A: "pod-a@1"}
    held, seen = hold_reused_addresses({IP_A, IP_B}, {IP_A: 7, IP_B: 4}, {IP_A: "pod-c@1", IP_B: "pod-b@1"}, seen, held)
    assert held == {}
    assert seen[IP_A] == Sighting(7, "pod-c@1")


def test_a_move_the_controller_already_names_is_not_held() -> None:
    held, _ = hold_reused_addresses({IP_A}, {IP_A: 7}, {IP_A: "pod-c@1"}, {IP_A: Sighting(3, "pod-a@1")}, {})
    assert held == {}
    # A first sighting has nothing to compare with.
    first, seen = hold_reused_addresses({IP_A}, {IP_A: 3}, {IP_A: "pod-a@1"}, {}, {})
    assert first == {} and seen == {IP_A: Sighting(3, "pod-a@1")}


def test_the_old_interface_gone_before_the_new_one_comes_is_still_caught() -> None:
    seen = {IP_A: Sighting(3, "pod-a@1")}
    held, seen = hold_reused_addresses({IP_A}, {}, {IP_A: "pod-a@1"}, seen, {})  # no route for a while
    assert held == {} and seen == {IP_A: Sighting(3, "pod-a@1")}
    held, seen = hold_reused_addresses({IP_A}, {IP_A: 8}, {IP_A: "pod-a@1"}, seen, held)
    assert held == {IP_A: "pod-a@1"}


def test_an_address_that_leaves_the_enrolled_set_is_forgotten() -> None:
    held, seen = hold_reused_addresses(set(), {}, {}, {IP_A: Sighting(3, "pod-a@1")}, {IP_A: "pod-a@1"})
    assert held == {} and seen == {}
    # Enrolled again later under the same owner, anywhere: a first sighting, not a hold.
    held, _ = hold_reused_addresses({IP_A}, {IP_A: 9}, {IP_A: "pod-a@1"}, seen, held)
    assert held == {}


def test_an_expired_hold_is_released_and_not_taken_up_again_for_the_same_move() -> None:
    seen = {IP_A: Sighting(3, "pod-a@1")}
    held, seen = hold_reused_addresses({IP_A}, {IP_A: 7}, {IP_A: "pod-a@1"}, seen, {})
    assert held == {IP_A: "pod-a@1"}
    held, seen = hold_reused_addresses({IP_A}, {IP_A: 7}, {IP_A: "pod-a@1"}, seen, held, expired={IP_A})
    assert held == {} and seen == {IP_A: Sighting(7, "pod-a@1")}
    held, seen = hold_reused_addresses({IP_A}, {IP_A: 7}, {IP_A: "pod-a@1"}, seen, held)
    assert held == {}, "the same interface under the same owner: nothing moved since the release"
    held, _ = hold_reused_addresses({IP_A}, {IP_A: 9}, {IP_A: "pod-a@1"}, seen, held)
    assert held == {IP_A: "pod-a@1"}, "a later move is held again"
