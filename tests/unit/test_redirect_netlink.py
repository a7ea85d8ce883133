"""Which rtnetlink notifications make the agent reconcile capture (agent/redirect_netlink.notifies_change): pod
interfaces, tc objects and host routes do, a routing daemon's prefixes do not, and a datagram cut short counts as
a change rather than being read past its end."""

from __future__ import annotations

import socket
import struct

from agent.redirect_netlink import (
    RTM_DELLINK,
    RTM_DELTFILTER,
    RTM_NEWLINK,
    RTM_NEWQDISC,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    notifies_change,
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
