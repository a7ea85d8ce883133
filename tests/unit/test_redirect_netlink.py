"""Reading rtnetlink without trusting it: which notifications make the agent reconcile capture (notifies_change:
pod interfaces, tc objects and host routes do, a routing daemon's prefixes do not, a datagram cut short counts as a
change) and which interfaces a route leaves through (route_oifs: RTA_OIF and multipath hops, a malformed hop list
read up to where it breaks)."""

from __future__ import annotations

import socket
import struct

from agent.redirect_netlink import (
    RTA_MULTIPATH,
    RTA_OIF,
    RTM_DELLINK,
    RTM_DELTFILTER,
    RTM_NEWLINK,
    RTM_NEWQDISC,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    attributes,
    nla,
    nla_u32,
    notifies_change,
    route_oifs,
)


def _msg(mtype: int, body: bytes) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, mtype, 0, 0, 0) + body + b"\0" * (-length % 4)


def _route(family: int, dst_len: int) -> bytes:
    return _msg(RTM_NEWROUTE, struct.pack("=BBBBBBBBI", family, dst_len, 0, 0, 254, 3, 0, 1, 0))


def test_interfaces_tc_objects_and_host_routes_are_changes() -> None:
    for mtype in (RTM_NEWLINK, RTM_DELLINK, RTM_NEWQDISC, RTM_DELTFILTER):
        assert notifies_change(_msg(mtype, b"\0" * 16))
    assert notifies_change(_route(socket.AF_INET, 32))
    assert notifies_change(_route(socket.AF_INET6, 128))


def test_prefix_routes_and_rules_are_not() -> None:
    assert not notifies_change(_route(socket.AF_INET, 24) + _route(socket.AF_INET6, 64) + _route(socket.AF_INET, 0))
    assert not notifies_change(_msg(RTM_NEWRULE, b"\0" * 12))
    assert not notifies_change(b"")


def test_a_change_behind_other_messages_is_found() -> None:
    assert notifies_change(_route(socket.AF_INET, 16) + _msg(RTM_NEWLINK, b"\0" * 16))


def test_a_truncated_datagram_counts_as_a_change() -> None:
    whole = _route(socket.AF_INET, 24)
    assert notifies_change(whole[:-4])
    assert notifies_change(struct.pack("=IHHII", 8, RTM_NEWROUTE, 0, 0, 0))  # length below the header's own size


def _hop(ifindex: int, extra: bytes = b"") -> bytes:
    return struct.pack("=HBBi", 8 + len(extra), 0, 0, ifindex) + extra


def test_route_oifs_reads_the_oif_and_every_multipath_hop() -> None:
    gateway = nla(5, bytes([10, 0, 0, 1]))  # RTA_GATEWAY inside a hop: hops are not all 8 bytes
    attrs = attributes(nla(RTA_MULTIPATH, _hop(3, gateway) + _hop(7) + _hop(9, gateway)))
    assert route_oifs(attrs) == {3, 7, 9}
    assert route_oifs(attributes(nla_u32(RTA_OIF, 4))) == {4}
    assert route_oifs({}) == set()


def test_route_oifs_stops_at_a_malformed_hop() -> None:
    overlong = struct.pack("=HBBi", 64, 0, 0, 8)  # claims more bytes than the attribute holds
    assert route_oifs(attributes(nla(RTA_MULTIPATH, _hop(3) + overlong + _hop(5)))) == {3}
    tiny = struct.pack("=HBBi", 2, 0, 0, 8)  # shorter than a hop header: would never advance
    assert route_oifs(attributes(nla(RTA_MULTIPATH, _hop(3) + tiny))) == {3}
    assert route_oifs(attributes(nla(RTA_MULTIPATH, _hop(6)[:5]))) == set()
