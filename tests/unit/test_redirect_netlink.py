"""Reading rtnetlink without trusting it: which notifications make the agent reconcile capture (notifies_change:
pod interfaces, tc objects and host routes do, a routing daemon's prefixes do not, a datagram cut short counts as a
change), which interfaces a route leaves through (route_oifs: RTA_OIF and multipath hops, a malformed hop list
read up to where it breaks), and dumps that are inconsistent or end in an error (asked again, or raised)."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from agent.redirect_errors import RedirectKernelError
from agent.redirect_netlink import (
    DUMP_ATTEMPTS,
    F_DUMP_INTR,
    F_MULTI,
    NLMSG_DONE,
    RTA_GATEWAY,
    RTA_MULTIPATH,
    RTA_OIF,
    RTM_DELLINK,
    RTM_DELTFILTER,
    RTM_NEWLINK,
    RTM_NEWQDISC,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    Netlink,
    NetlinkError,
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


def test_notifications_of_our_own_requests_are_not_changes() -> None:
    """The kernel notifies even a qdisc get; what the agent's own socket (port 77) caused must not wake its watch."""
    ours = struct.pack("=IHHII", 36, RTM_NEWQDISC, 0, 5, 77) + b"\0" * 20
    assert not notifies_change(ours, own_port=77)
    assert notifies_change(ours, own_port=78)  # another process's change
    assert notifies_change(ours)  # no port to ignore
    assert notifies_change(ours + _msg(RTM_NEWLINK, b"\0" * 16), own_port=77)  # the kernel's own (port 0)


def test_a_route_through_a_router_off_the_uplinks_is_a_change_when_uplinks_are_found() -> None:
    """Uplinks found from routes: a prefix routed through a router by an interface that is no uplink yet (another
    node's pod CIDR over a second network) must make the agent reconcile; one by an uplink, or on-link, need not."""
    head = struct.pack("=BBBBBBBBI", socket.AF_INET, 24, 0, 0, 254, 3, 0, 1, 0)
    via = nla(RTA_GATEWAY, socket.inet_aton("10.66.0.2"))
    by_eth1 = _msg(RTM_NEWROUTE, head + nla_u32(RTA_OIF, 7) + via)
    assert notifies_change(by_eth1, uplinks={3})
    assert not notifies_change(by_eth1, uplinks={3, 7})
    assert not notifies_change(by_eth1)  # uplinks given by the operator: prefixes stay no news
    assert not notifies_change(_msg(RTM_NEWROUTE, head + nla_u32(RTA_OIF, 7)), uplinks={3})  # on-link


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


class _Kernel:
    """Stands in for the rtnetlink socket: answers each request with the next scripted dump (a list of (type,
    flags, payload) messages), stamped with the request's sequence number."""

    def __init__(self, *dumps: list[tuple[int, int, bytes]]) -> None:
        self.dumps = list(dumps)
        self.pending: list[bytes] = []
        self.requests = 0

    def send(self, data: bytes) -> int:
        seq = struct.unpack_from("=IHHII", data)[3]
        self.requests += 1
        self.pending = [b"".join(_stamped(mtype, flags, seq, body) for mtype, flags, body in self.dumps.pop(0))]
        return len(data)

    def recvmsg(self, _size: int) -> tuple[bytes, list[object], int, None]:
        return self.pending.pop(0), [], 0, None

    def close(self) -> None:
        pass


def _stamped(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, mtype, flags, seq, 0) + body + b"\0" * (-length % 4)


def _netlink(kernel: _Kernel) -> Netlink:
    nl = Netlink()
    nl.sock.close()
    nl.sock = kernel  # type: ignore[assignment]
    return nl


def _link(index: int, flags: int = F_MULTI) -> tuple[int, int, bytes]:
    return (RTM_NEWLINK, flags, struct.pack("=BxHiII", 0, 0, index, 0, 0))


DONE = (NLMSG_DONE, F_MULTI, struct.pack("=i", 0))


def test_an_interrupted_dump_is_read_again() -> None:
    """A dump the kernel flags NLM_F_DUMP_INTR (the table changed meanwhile) may miss entries: cleanup would miss a
    link whose filter it must remove, start an uplink. It is asked again; only a consistent answer is used."""
    kernel = _Kernel([_link(1), _link(2, F_MULTI | F_DUMP_INTR), DONE], [_link(1), _link(2), _link(3), DONE])
    assert _netlink(kernel).all_link_indexes() == [1, 2, 3]
    assert kernel.requests == 2


def test_a_dump_that_never_settles_is_an_error() -> None:
    interrupted = [_link(1, F_MULTI | F_DUMP_INTR), DONE]
    kernel = _Kernel(*[interrupted] * DUMP_ATTEMPTS)
    with pytest.raises(RedirectKernelError, match="changed while it was read"):
        _netlink(kernel).all_link_indexes()


def test_a_dump_ending_in_an_error_is_not_taken_for_complete() -> None:
    kernel = _Kernel([_link(1), (NLMSG_DONE, F_MULTI, struct.pack("=i", -errno.EMSGSIZE))])
    with pytest.raises(NetlinkError) as info:
        _netlink(kernel).all_link_indexes()
    assert info.value.code == errno.EMSGSIZE


def test_a_truncated_end_of_dump_is_an_error_not_a_crash() -> None:
    kernel = _Kernel([_link(1), (NLMSG_DONE, F_MULTI, b"\x01")])
    with pytest.raises(RedirectKernelError, match="truncated reply"):
        _netlink(kernel).all_link_indexes()


def test_a_message_running_past_its_datagram_is_an_error_not_a_short_answer() -> None:
    """The kernel never splits a message across datagrams: one that claims more bytes than arrived was cut by the
    receive buffer, and its attributes would silently be missing (a link without its name, a filter without its
    kind)."""
    cut = struct.pack("=IHHII", 16 + 64, RTM_NEWLINK, F_MULTI, 0, 0) + b"\0" * 16  # 64 bytes claimed, 16 present

    class _Cut(_Kernel):
        def send(self, data: bytes) -> int:
            seq = struct.unpack_from("=IHHII", data)[3]
            mtype, flags, body = _link(1)
            self.pending = [_stamped(mtype, flags, seq, body) + cut[:12] + struct.pack("=I", seq) + cut[16:]]
            return len(data)

    with pytest.raises(RedirectKernelError, match="truncated reply"):
        _netlink(_Cut()).all_link_indexes()


def test_a_datagram_the_buffer_cut_at_a_message_boundary_is_an_error() -> None:
    class _Overflow(_Kernel):
        def recvmsg(self, size: int) -> tuple[bytes, list[object], int, None]:
            data, ancillary, _, address = super().recvmsg(size)
            return data, ancillary, socket.MSG_TRUNC, address

    with pytest.raises(RedirectKernelError, match="larger than"):
        _netlink(_Overflow([_link(1), DONE])).all_link_indexes()
