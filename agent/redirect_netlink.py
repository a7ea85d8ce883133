"""Netlink side of capture: tc clsact + cls_bpf filters, the policy-routing rule and local table, and route lookups
that find a pod's node-side interface, spoken directly over an rtnetlink socket.

Every call acts on the network namespace the socket was opened in (the node netns). Our tc filter is recognised by
(priority, handle, kind bpf, name), never by position, so other filters on the same hook and a clsact qdisc that
others use are left alone.

Why not pyroute2 here: capture needs a dozen request shapes, and pyroute2 cost the agent ~4 MB of modules for its
whole life plus a decoded object tree per message (every attribute of every link, ~300 messages per reconcile of
100 pods). Requests are encoded and replies scanned for the few attributes used, nothing else is decoded.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

from agent.redirect_errors import AttachError, RedirectKernelError

TC_H_CLSACT = 0xFFFFFFF1
TC_H_INGRESS = 0xFFFFFFF2  # ffff:fff2 = clsact ingress
TC_H_EGRESS = 0xFFFFFFF3
CLSACT_HANDLE = 0xFFFF0000
ETH_P_ALL = 0x0003
RTN_UNICAST = 1
RTN_LOCAL = 2
RT_SCOPE_HOST = 254
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
FR_ACT_TO_TBL = 1
FAMILIES = ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0"))
_FAMILY_NAMES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}

# Message types, flags and attribute numbers (linux/netlink.h, rtnetlink.h, if_link.h, fib_rules.h, pkt_cls.h).
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_GETLINK, RTM_GETADDR = 18, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34
RTM_NEWQDISC, RTM_DELQDISC, RTM_GETQDISC = 36, 37, 38
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46
F_REQUEST, F_MULTI, F_ACK, F_ECHO, F_DUMP = 0x1, 0x2, 0x4, 0x8, 0x300
F_REPLACE, F_EXCL, F_CREATE = 0x100, 0x200, 0x400
F_DUMP_INTR = 0x10  # the dumped table changed while it was read: what came may miss entries
DUMP_ATTEMPTS = 3
IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_INFO_KIND = 1, 3, 5, 10, 18, 1
IFLA_LINK_NETNSID = 37  # the netns (as this netns numbers it) of the link's peer: a veth's other end
IFA_TARGET_NETNSID = 10  # an address dump of another netns, by its number here (kernel >= 4.20, strict checks)
SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12
# Link kinds that decapsulate traffic from other hosts into the node's stack: overlay networks (VXLAN, Geneve,
# IPIP, GRE) and encrypted ones (WireGuard) deliver pod traffic from other nodes there, not on the default route's
# interface.
TUNNEL_KINDS = frozenset(
    {"vxlan", "geneve", "ipip", "ip6tnl", "sit", "gre", "gretap", "ip6gre", "ip6gretap", "erspan", "ip6erspan",
     "wireguard", "bareudp"}
)  # fmt: skip
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_MULTIPATH, RTA_TABLE, RTA_VIA, RTA_NH_ID = 1, 4, 5, 9, 15, 18, 30
RTM_GETNEXTHOP = 106
NHA_ID, NHA_GROUP, NHA_OIF = 1, 2, 5
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK = 6, 10, 15, 16
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_CLASSID, TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS = 3, 6, 7, 8
TCA_BPF_FLAG_ACT_DIRECT = 1

_NLMSGHDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")  # also fib_rule_hdr: same layout
_TCMSG = struct.Struct("=BxxxiIII")
_RTNEXTHOP = struct.Struct("=HBBi")  # struct rtnexthop: len, flags, hops, ifindex (then its own attributes)
_NHMSG = struct.Struct("=BBBBI")  # struct nhmsg: family, scope, protocol, resvd, flags
_NH_GRP = struct.Struct("=IBBH")  # struct nexthop_grp: id, weight, weight_high, resvd2
_U32 = struct.Struct("=I")
_RECV_SIZE = 1 << 16

# Multicast groups (RTMGRP_*) of what can move a pod's interface or take capture away from it.
RTMGRP_LINK, RTMGRP_TC, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x1, 0x8, 0x40, 0x400
RTM_NEWLINK, RTM_DELLINK = 16, 17


class NetlinkError(Exception):
    """The kernel refused a request; ``code`` is the errno."""

    def __init__(self, code: int, request: str) -> None:
        super().__init__(code, f"{request}: {os.strerror(code)}")
        self.code = code


def nla(kind: int, value: bytes) -> bytes:
    length = _NLA.size + len(value)
    return _NLA.pack(length, kind) + value + b"\0" * (-length % 4)


def nla_u32(kind: int, value: int) -> bytes:
    return nla(kind, _U32.pack(value))


def nla_str(kind: int, value: str) -> bytes:
    return nla(kind, value.encode() + b"\0")


def attributes(data: bytes | memoryview, offset: int = 0) -> dict[int, memoryview]:
    """Attribute type (flags stripped) -> payload; the last of repeated types wins (we read no repeated ones)."""
    mv = memoryview(data)
    out: dict[int, memoryview] = {}
    while offset + _NLA.size <= len(mv):
        length, kind = _NLA.unpack_from(mv, offset)
        if length < _NLA.size or offset + length > len(mv):
            break
        out[kind & 0x3FFF] = mv[offset + _NLA.size : offset + length]
        offset += (length + 3) & ~3
    return out


class CutMessage(Exception):
    """A netlink message header whose length is impossible: shorter than a header, or running past its datagram
    (the kernel never splits a message, so the receive buffer cut it)."""

    def __init__(self, length: int, available: int) -> None:
        super().__init__(f"message of {length} bytes, {available} read")
        self.length = length
        self.available = available


def messages(data: memoryview) -> Iterator[tuple[int, int, int, memoryview]]:
    """(type, flags, sequence number, payload) of each message of one netlink datagram; raises CutMessage at one
    that cannot be whole. Replies and notifications share it: :func:`attributes` is its counterpart one level down."""
    for mtype, flags, seq, _, payload in messages_with_port(data):
        yield mtype, flags, seq, payload


def messages_with_port(data: memoryview) -> Iterator[tuple[int, int, int, int, memoryview]]:
    """:func:`messages` with each message's port id: in a notification, the port of the socket whose request caused
    it (0 when the kernel changed something on its own)."""
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, mtype, flags, seq, port = _NLMSGHDR.unpack_from(data, pos)
        if length < _NLMSGHDR.size or pos + length > len(data):
            raise CutMessage(length, len(data) - pos)
        yield mtype, flags, seq, port, data[pos + _NLMSGHDR.size : pos + length]
        pos += (length + 3) & ~3


def get_u32(attrs: dict[int, memoryview], kind: int) -> int | None:
    raw = attrs.get(kind)
    return int(_U32.unpack_from(raw)[0]) if raw is not None and len(raw) >= 4 else None


def get_str(attrs: dict[int, memoryview], kind: int) -> str | None:
    raw = attrs.get(kind)
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace") if raw is not None else None


def get_ip(attrs: dict[int, memoryview], kind: int) -> str | None:
    raw = attrs.get(kind)
    if raw is None or len(raw) not in (4, 16):
        return None
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, bytes(raw))


def route_oifs(attrs: dict[int, memoryview]) -> set[int]:
    """Output interfaces named by a route's attributes: RTA_OIF and every hop of RTA_MULTIPATH. A hop whose length
    runs past the attribute ends the scan (a malformed reply yields what was read, never an exception)."""
    out: set[int] = set()
    oif = get_u32(attrs, RTA_OIF)
    if oif is not None:
        out.add(oif)
    hops = attrs.get(RTA_MULTIPATH)
    pos = 0
    while hops is not None and pos + _RTNEXTHOP.size <= len(hops):
        length, _, _, ifindex = _RTNEXTHOP.unpack_from(hops, pos)
        if length < _RTNEXTHOP.size or pos + length > len(hops):
            break
        if ifindex > 0:
            out.add(ifindex)
        pos += (length + 3) & ~3
    return out


def _ip_family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


@dataclass(frozen=True)
class RouteInfo:
    """The kernel's answer to `ip route get <ip>` in the node netns."""

    rtype: int
    oif: int | None
    gateway: str | None


@dataclass(frozen=True)
class LinkInfo:
    """What capture needs to know of an interface: its kind (IFLA_INFO_KIND, '' for none), the bridge or bond it is
    enslaved to (IFLA_MASTER), its hardware address, and where a veth's other end is."""

    index: int
    name: str
    kind: str
    master: int | None
    mac: bytes
    peer: int | None = None  # IFLA_LINK: a veth's other end, by its index in ``peer_netns``
    peer_netns: int | None = None  # IFLA_LINK_NETNSID: None when the peer (if any) is in this netns


@dataclass(frozen=True)
class FilterInfo:
    kind: str
    name: str


class Netlink:
    """An rtnetlink socket bound to the node netns plus the few operations capture needs (blocking calls)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self._seq = 0

    @property
    def port(self) -> int:
        """The netlink port id of this socket: what the notifications its requests cause carry."""
        return int(self.sock.getsockname()[0])

    def close(self) -> None:
        self.sock.close()

    def _request(self, mtype: int, flags: int, body: bytes, what: str) -> list[memoryview]:
        """Send one request and read every reply message until the dump ends or the ACK arrives. A dump the kernel
        marks interrupted (links, routes or addresses changed while it was read) may lack entries, say the uplink's
        default route or a link whose filter cleanup must remove: it is asked again, a few times at most. A dump
        that ends in an error raises it instead of passing for complete."""
        for _ in range(DUMP_ATTEMPTS):
            out, interrupted = self._exchange(mtype, flags, body, what)
            if not interrupted:
                return out
        raise RedirectKernelError(f"netlink: {what} changed while it was read, {DUMP_ATTEMPTS} times in a row")

    def _exchange(self, mtype: int, flags: int, body: bytes, what: str) -> tuple[list[memoryview], bool]:
        """One request and its replies, and whether the kernel flagged the dump inconsistent. Always read to the
        end: the kernel refuses a new dump on a socket whose previous one was left half-read (EBUSY)."""
        self._seq = self._seq % 0xFFFFFFFF + 1
        seq = self._seq
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype, F_REQUEST | flags, seq, 0) + body)
        out: list[memoryview] = []
        interrupted = False
        while True:
            raw, _, msg_flags, _ = self.sock.recvmsg(_RECV_SIZE)
            if msg_flags & socket.MSG_TRUNC:  # the rest of the datagram is gone: whatever it held would be missing
                raise RedirectKernelError(f"netlink: reply to {what} larger than {_RECV_SIZE} bytes")
            try:
                for rtype, rflags, rseq, payload in messages(memoryview(raw)):
                    if rseq != seq:
                        continue
                    interrupted = interrupted or bool(rflags & F_DUMP_INTR)
                    if rtype in (NLMSG_ERROR, NLMSG_DONE):
                        if len(payload) < 4:
                            raise RedirectKernelError(f"netlink: truncated reply to {what}")
                        code = -struct.unpack_from("=i", payload)[0]
                        if code:
                            raise NetlinkError(code, what)
                        return out, interrupted  # the ACK, or the end of a complete dump
                    out.append(payload)
                    if not rflags & F_MULTI and not flags & F_ACK:
                        return out, interrupted
            except CutMessage as e:
                if e.length < _NLMSGHDR.size:
                    raise RedirectKernelError(f"netlink: malformed reply to {what}") from None
                raise RedirectKernelError(
                    f"netlink: truncated reply to {what} ({e.length} bytes, {e.available} read)"
                ) from None

    # --- links and routes ------------------------------------------------------------------------------------

    def link_index(self, name: str) -> int | None:
        try:
            msgs = self._request(
                RTM_GETLINK, 0, _IFINFOMSG.pack(0, 0, 0, 0, 0) + nla_str(IFLA_IFNAME, name), f"link {name}"
            )
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return int(_IFINFOMSG.unpack_from(msgs[0])[2]) if msgs else None

    def link_name(self, index: int) -> str | None:
        try:
            msgs = self._request(RTM_GETLINK, 0, _IFINFOMSG.pack(0, 0, index, 0, 0), f"link {index}")
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return get_str(attributes(msgs[0], _IFINFOMSG.size), IFLA_IFNAME) if msgs else None

    def all_link_indexes(self) -> list[int]:
        dump = self._request(RTM_GETLINK, F_DUMP, _IFINFOMSG.pack(0, 0, 0, 0, 0), "link dump")
        return [int(_IFINFOMSG.unpack_from(m)[2]) for m in dump]

    def links(self) -> dict[int, LinkInfo]:
        """Every interface of the netns, by index (one dump)."""
        out: dict[int, LinkInfo] = {}
        for m in self._request(RTM_GETLINK, F_DUMP, _IFINFOMSG.pack(0, 0, 0, 0, 0), "link dump"):
            attrs = attributes(m, _IFINFOMSG.size)
            name = get_str(attrs, IFLA_IFNAME)
            if not name:
                continue
            info = attrs.get(IFLA_LINKINFO)
            kind = get_str(attributes(info), IFLA_INFO_KIND) if info is not None else None
            index = int(_IFINFOMSG.unpack_from(m)[2])
            address = attrs.get(IFLA_ADDRESS)
            nsid = attrs.get(IFLA_LINK_NETNSID)
            out[index] = LinkInfo(
                index,
                name,
                kind or "",
                get_u32(attrs, IFLA_MASTER),
                bytes(address or b""),
                get_u32(attrs, IFLA_LINK),
                None if nsid is None or len(nsid) < 4 else int(struct.unpack_from("=i", nsid)[0]),
            )
        return out

    def peer_addresses(self, netns: int, index: int) -> set[str]:
        """The addresses of interface ``index`` in the netns this one numbers ``netns`` (a veth's far end: what the
        pod behind a bridge port holds). Strict checking is on for these dumps only: without it the kernel ignores
        IFA_TARGET_NETNSID and answers for this netns."""
        out: set[str] = set()
        self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                body = _IFADDRMSG.pack(family, 0, 0, 0, index) + struct.pack("=HHi", 8, IFA_TARGET_NETNSID, netns)
                for m in self._request(RTM_GETADDR, F_DUMP, body, f"address dump of netns {netns}"):
                    if _IFADDRMSG.unpack_from(m)[4] != index:
                        continue
                    attrs = attributes(m, _IFADDRMSG.size)
                    ip = get_ip(attrs, IFA_LOCAL) or get_ip(attrs, IFA_ADDRESS)
                    if ip:
                        out.add(ip)
        finally:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 0)
        return out

    def local_addresses(self) -> set[str]:
        out: set[str] = set()
        for m in self._request(RTM_GETADDR, F_DUMP, _IFADDRMSG.pack(0, 0, 0, 0, 0), "address dump"):
            attrs = attributes(m, _IFADDRMSG.size)
            ip = get_ip(attrs, IFA_LOCAL) or get_ip(attrs, IFA_ADDRESS)
            if ip:
                out.add(ip)
        return out

    def _routes(self, family: int, table: int) -> Iterator[tuple[tuple[int, ...], dict[int, memoryview]]]:
        """(rtmsg fields, attributes) of every route of ``table``."""
        for m in self._request(RTM_GETROUTE, F_DUMP, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0), "route dump"):
            hdr = _RTMSG.unpack_from(m)
            attrs = attributes(m, _RTMSG.size)
            if (get_u32(attrs, RTA_TABLE) or hdr[4]) == table:
                yield hdr, attrs

    def default_route_oifs(self) -> list[int]:
        """Every interface a default route of the main table leaves through: single-path (RTA_OIF), multipath (each
        RTA_MULTIPATH hop: ECMP towards several routers, as BGP-routed nodes have) and nexthop objects (RTA_NH_ID,
        groups included). Reading only RTA_OIF found no uplink at all on a multipath node, or only some of them when
        one family's default was single-path, and traffic for pods arriving on the others was never captured."""
        out: set[int] = set()
        for family, _ in FAMILIES:
            for hdr, attrs in self._routes(family, RT_TABLE_MAIN):
                if hdr[1] != 0:
                    continue
                out.update(route_oifs(attrs))
                nh_id = get_u32(attrs, RTA_NH_ID)
                if nh_id is not None:
                    out.update(self._nexthop_oifs(nh_id, depth=2))
        return sorted(out)

    def gateway_route_oifs(self) -> list[int]:
        """Every interface a unicast route of the main table through a router leaves by (RTA_GATEWAY, RTA_VIA, a
        multipath route's hops, a nexthop object): where packets from other hosts' prefixes arrive, other nodes' pod
        CIDRs routed over a second network among them. Connected and host routes (a pod's veth, a bridge's subnet) name
        no router."""
        out: set[int] = set()
        for family, _ in FAMILIES:
            for hdr, attrs in self._routes(family, RT_TABLE_MAIN):
                if hdr[7] != RTN_UNICAST:
                    continue
                nh_id = get_u32(attrs, RTA_NH_ID)
                if RTA_GATEWAY in attrs or RTA_VIA in attrs or RTA_MULTIPATH in attrs:
                    out.update(route_oifs(attrs))
                elif nh_id is not None:
                    out.update(self._nexthop_oifs(nh_id, depth=2))
        return sorted(out)

    def _nexthop_oifs(self, nh_id: int, depth: int) -> set[int]:
        """Output interfaces of nexthop object ``nh_id`` (`ip nexthop`), members of a group resolved (groups do not
        nest in the kernel; ``depth`` only bounds a malformed answer)."""
        try:
            msgs = self._request(
                RTM_GETNEXTHOP, 0, _NHMSG.pack(0, 0, 0, 0, 0) + nla_u32(NHA_ID, nh_id), f"nexthop {nh_id}"
            )
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP):
                return set()
            raise
        out: set[int] = set()
        for m in msgs:
            attrs = attributes(m, _NHMSG.size)
            oif = get_u32(attrs, NHA_OIF)
            if oif is not None:
                out.add(oif)
            group = attrs.get(NHA_GROUP)
            if group is not None and depth > 0:
                for pos in range(0, len(group) - _NH_GRP.size + 1, _NH_GRP.size):
                    out |= self._nexthop_oifs(_NH_GRP.unpack_from(group, pos)[0], depth - 1)
        return out

    def pod_route_links(self, exclude: Iterable[int]) -> dict[int, str]:
        """index -> name of the interfaces that direct host routes (/32, /128, unicast, no gateway) of the main table
        leave through, apart from ``exclude`` (the uplinks) and lo: where CNIs that route pods (veth per pod) put
        them, whether or not the pod is known yet."""
        skip = set(exclude)
        found: set[int] = set()
        for family, _ in FAMILIES:
            for hdr, attrs in self._routes(family, RT_TABLE_MAIN):
                oif = get_u32(attrs, RTA_OIF)
                host = hdr[1] == (32 if family == socket.AF_INET else 128)
                if host and hdr[7] == RTN_UNICAST and oif is not None and RTA_GATEWAY not in attrs and oif not in skip:
                    found.add(oif)
        out: dict[int, str] = {}
        for idx in sorted(found):
            name = self.link_name(idx)
            if name and name != "lo":
                out[idx] = name
        return out

    def route_get(self, ip: str) -> RouteInfo | None:
        """None when the node has no route at all (ENETUNREACH / EHOSTUNREACH)."""
        family = _ip_family(ip)
        bits = 32 if family == socket.AF_INET else 128
        body = _RTMSG.pack(family, bits, 0, 0, 0, 0, 0, 0, 0) + nla(RTA_DST, socket.inet_pton(family, ip))
        try:
            msgs = self._request(RTM_GETROUTE, 0, body, f"route get {ip}")
        except NetlinkError as exc:
            if exc.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL):
                return None
            raise
        if not msgs:
            return None
        m = msgs[0]
        attrs = attributes(m, _RTMSG.size)
        return RouteInfo(_RTMSG.unpack_from(m)[7], get_u32(attrs, RTA_OIF), get_ip(attrs, RTA_GATEWAY))

    # --- policy routing --------------------------------------------------------------------------------------

    def _find_rule(self, mark: int, mask: int, table: int, pref: int, family: int) -> bool:
        for m in self._request(RTM_GETRULE, F_DUMP, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0), "rule dump"):
            attrs = attributes(m, _RTMSG.size)
            if (
                get_u32(attrs, FRA_FWMARK) == mark
                and get_u32(attrs, FRA_FWMASK) == mask
                and (get_u32(attrs, FRA_TABLE) or _RTMSG.unpack_from(m)[4]) == table
                and get_u32(attrs, FRA_PRIORITY) == pref
            ):
                return True
        return False

    def _local_default(self, mtype: int, flags: int, family: int, table: int, lo: int) -> None:
        """`ip route replace|del local 0/0 (::/0) dev lo table TABLE`."""
        body = _RTMSG.pack(family, 0, 0, 0, table if table < 256 else 0, RTPROT_BOOT, RT_SCOPE_HOST, RTN_LOCAL, 0)
        self._request(
            mtype, F_ACK | flags, body + nla_u32(RTA_TABLE, table) + nla_u32(RTA_OIF, lo), f"local route table {table}"
        )

    def _rule(self, mtype: int, flags: int, family: int, mark: int, mask: int, table: int, pref: int) -> None:
        body = _RTMSG.pack(family, 0, 0, 0, table if table < 256 else 0, 0, 0, FR_ACT_TO_TBL, 0)
        attrs = (
            nla_u32(FRA_TABLE, table)
            + nla_u32(FRA_PRIORITY, pref)
            + nla_u32(FRA_FWMARK, mark)
            + nla_u32(FRA_FWMASK, mask)
        )
        self._request(mtype, F_ACK | flags, body + attrs, f"rule fwmark {mark:#x}/{mask:#x} lookup {table}")

    def ensure_policy_routing(self, mark: int, mask: int, table: int, pref: int) -> None:
        """Per family: `ip rule add fwmark MARK/MASK lookup TABLE pref PREF` + `ip route replace local 0/0 (::/0)
        dev lo table TABLE`, so packets the program marks are delivered to the socket it assigned."""
        lo = self.link_index("lo")
        if lo is None:
            raise RedirectKernelError("the node netns has no `lo` interface for the local route table")
        for family, default in FAMILIES:
            try:
                self._local_default(RTM_NEWROUTE, F_CREATE | F_REPLACE, family, table, lo)
                if not self._find_rule(mark, mask, table, pref, family):
                    self._rule(RTM_NEWRULE, F_CREATE | F_EXCL, family, mark, mask, table, pref)
            except NetlinkError as exc:
                if family == socket.AF_INET6 and exc.code in (errno.EACCES, errno.EAFNOSUPPORT):
                    continue  # IPv6 is disabled in this netns: there is no IPv6 traffic to deliver
                raise RedirectKernelError(
                    f"policy routing (fwmark {mark:#x}/{mask:#x} -> table {table}, local {default} dev lo) failed: "
                    f"{_reason(exc)}"
                ) from exc

    def has_policy_routing(self, mark: int, mask: int, table: int, pref: int) -> bool:
        """Whether the IPv4 half exists (IPv6 may legitimately be absent when the netns has IPv6 disabled)."""
        routes = [hdr for hdr, _ in self._routes(socket.AF_INET, table) if hdr[7] == RTN_LOCAL and hdr[1] == 0]
        return bool(routes) and self._find_rule(mark, mask, table, pref, socket.AF_INET)

    def remove_policy_routing(self, mark: int, mask: int, table: int, pref: int) -> list[str]:
        removed: list[str] = []
        lo = self.link_index("lo")
        for family, default in FAMILIES:
            while self._find_rule(mark, mask, table, pref, family):
                self._rule(RTM_DELRULE, 0, family, mark, mask, table, pref)
                removed.append(f"rule fwmark {mark:#x}/{mask:#x} lookup {table} pref {pref} ({_FAMILY_NAMES[family]})")
            ours = [
                hdr
                for hdr, attrs in self._routes(family, table)
                if hdr[7] == RTN_LOCAL and hdr[1] == 0 and get_u32(attrs, RTA_OIF) == lo
            ]
            if ours and lo is not None:
                self._local_default(RTM_DELROUTE, 0, family, table, lo)
                removed.append(f"route local {default} dev lo table {table}")
        return removed

    # --- tc --------------------------------------------------------------------------------------------------

    def has_clsact(self, index: int) -> bool:
        """Asks for this interface's ingress-side qdisc alone: the kernel filters no qdisc dump by interface, so the
        dump this replaced listed every qdisc of the node on each attach. The kernel answers such a get as a
        notification, which only NLM_F_ECHO sends back to the asker; after a deletion it reports nothing (a builtin
        placeholder), before the first ingress-side qdisc ENOENT."""
        body = _TCMSG.pack(0, index, 0, TC_H_CLSACT, 0)
        try:
            msgs = self._request(RTM_GETQDISC, F_ACK | F_ECHO, body, f"ingress qdisc of interface {index}")
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                return False
            raise
        return any(get_str(attributes(m, _TCMSG.size), TCA_KIND) == "clsact" for m in msgs)

    def _clsact(self, mtype: int, flags: int, index: int) -> None:
        body = _TCMSG.pack(0, index, CLSACT_HANDLE, TC_H_CLSACT, 0) + nla_str(TCA_KIND, "clsact")
        self._request(mtype, F_ACK | flags, body, f"clsact qdisc on interface {index}")

    def ensure_clsact(self, index: int) -> bool:
        """True when this call created the qdisc (so the agent may remove it later when it is empty)."""
        if self.has_clsact(index):
            return False
        try:
            self._clsact(RTM_NEWQDISC, F_CREATE | F_EXCL, index)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise AttachError(f"cannot add clsact qdisc: {_reason(exc)} (kernel needs CONFIG_NET_SCH_INGRESS)") from exc
        return True

    def filters(self, index: int, parent: int = TC_H_INGRESS) -> list[tuple[int, int, FilterInfo]]:
        """(priority, handle, info) of every real filter (chain heads with handle 0 are skipped)."""
        out: list[tuple[int, int, FilterInfo]] = []
        try:
            dump = self._request(RTM_GETTFILTER, F_DUMP, _TCMSG.pack(0, index, 0, parent, 0), f"filters of {index}")
        except NetlinkError as exc:
            if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                return out
            raise
        for m in dump:
            _, _, handle, _, info = _TCMSG.unpack_from(m)
            if not handle:
                continue
            attrs = attributes(m, _TCMSG.size)
            options = attrs.get(TCA_OPTIONS)
            name = get_str(attributes(options), TCA_BPF_NAME) if options is not None else None
            out.append((info >> 16, handle, FilterInfo(get_str(attrs, TCA_KIND) or "", name or "")))
        return out

    def find_filter(self, index: int, prio: int, handle: int) -> FilterInfo | None:
        for p, h, info in self.filters(index):
            if p == prio and h == handle:
                return info
        return None

    def named_filters(self, index: int, name: str) -> list[tuple[int, int]]:
        """(priority, handle) of every ingress bpf filter called ``name``, wherever a past config put it."""
        return [(p, h) for p, h, info in self.filters(index) if info.kind == "bpf" and info.name == name]

    def _filter_head(self, index: int, prio: int, handle: int) -> bytes:
        info = prio << 16 | socket.htons(ETH_P_ALL)
        return _TCMSG.pack(0, index, handle, TC_H_INGRESS, info) + nla_str(TCA_KIND, "bpf")

    def put_filter(self, index: int, fd: int, name: str, prio: int, handle: int, replace: bool) -> None:
        """Add, or atomically replace (same prio/handle: the kernel swaps the program, no packet sees none)."""
        options = (
            nla_u32(TCA_BPF_FD, fd)
            + nla_str(TCA_BPF_NAME, name)
            + nla_u32(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT)
            + nla_u32(TCA_BPF_CLASSID, 1)
        )
        body = self._filter_head(index, prio, handle) + nla(TCA_OPTIONS, options)
        try:
            self._request(RTM_NEWTFILTER, F_ACK | F_CREATE | (F_REPLACE if replace else F_EXCL), body, f"filter {name}")
        except NetlinkError as exc:
            raise AttachError(f"cannot {'replace' if replace else 'add'} cls_bpf filter: {_reason(exc)}") from exc

    def delete_filter(self, index: int, prio: int, handle: int) -> None:
        try:
            self._request(RTM_DELTFILTER, F_ACK, self._filter_head(index, prio, handle), f"filter {prio}/{handle:#x}")
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                return
            raise AttachError(f"cannot delete cls_bpf filter: {_reason(exc)}") from exc

    def delete_clsact_if_empty(self, index: int) -> bool:
        if self.filters(index, TC_H_INGRESS) or self.filters(index, TC_H_EGRESS):
            return False
        try:
            self._clsact(RTM_DELQDISC, 0, index)
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                return False
            raise AttachError(f"cannot delete clsact qdisc: {_reason(exc)}") from exc
        return True


def _reason(exc: NetlinkError) -> str:
    return f"{os.strerror(exc.code)} (errno {exc.code})"


_WATCHED = {
    RTM_NEWLINK,
    RTM_DELLINK,
    RTM_NEWQDISC,
    RTM_DELQDISC,
    RTM_NEWTFILTER,
    RTM_DELTFILTER,
}
_HOST_BITS = {socket.AF_INET: 32, socket.AF_INET6: 128}


def notifies_change(data: bytes | memoryview, own_port: int = 0, uplinks: Collection[int] | None = None) -> bool:
    """Whether a datagram of rtnetlink notifications holds one capture has to follow: an interface added, removed or
    changed, a clsact qdisc or tc filter added or removed, or a host route (a pod's /32 or /128) added or removed.
    Other routes (a routing daemon's prefixes) are ignored, so their churn costs no reconcile, and so are the
    notifications of capture's own requests (``own_port``, its Netlink socket's port): the kernel answers even a
    qdisc *get* with a notification to every tc listener, so a reconcile whose attach kept failing woke its own watch
    and reconciled again, without end. Given ``uplinks``, a route through a router (RTA_GATEWAY, RTA_VIA or
    multipath) leaving by another interface is a change too: that interface brings other hosts' traffic."""
    try:
        for mtype, _, _, port, payload in messages_with_port(memoryview(data)):
            if own_port and port == own_port:
                continue
            if mtype in _WATCHED:
                return True
            if mtype in (RTM_NEWROUTE, RTM_DELROUTE) and len(payload) >= _RTMSG.size:
                family, dst_len = _RTMSG.unpack_from(payload)[:2]
                if _HOST_BITS.get(family) == dst_len:
                    return True
                if uplinks is not None and mtype == RTM_NEWROUTE:
                    attrs = attributes(payload, _RTMSG.size)
                    routed = RTA_GATEWAY in attrs or RTA_VIA in attrs or RTA_MULTIPATH in attrs
                    if routed and route_oifs(attrs) - set(uplinks):
                        return True
    except CutMessage:
        return True  # cut short: cannot tell what it said, so assume the worst
    return False


class ChangeWatch:
    """Link, tc and host-route notifications of the node netns, read without blocking from the agent's event loop.

    Capture is keyed by interface: a pod sandbox re-created with the same IP gets a new veth that carries no program,
    and the controller sees no change at all, so without this the pod's traffic went uncaptured (plaintext, no
    policy, no anti-spoofing) until some unrelated config change made the agent reconcile. The same holds for a
    filter or qdisc someone else removed and for a pod route that moved."""

    def __init__(self, own_port: int = 0) -> None:
        """``own_port``: the port of the Netlink socket capture changes the netns with, whose own changes (and gets)
        are no news to it."""
        self.own_port = own_port
        self.uplinks: set[int] | None = None  # set by the redirector: the interfaces capture treats as uplinks
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        try:
            self.sock.bind((0, RTMGRP_LINK | RTMGRP_TC | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE))
        except OSError:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> bool:
        """Read every pending notification; True when one of them means capture may have to change. A receive
        buffer that overflowed (ENOBUFS: notifications were lost) counts as a change, as does any other socket
        error (reported once: the caller reconciles, which reads the kernel's state afresh)."""
        changed = False
        while True:
            try:
                data = self.sock.recv(_RECV_SIZE)
            except BlockingIOError:
                return changed
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    changed = True
                    continue
                return True
            changed = changed or notifies_change(data, self.own_port, self.uplinks)

    def close(self) -> None:
        self.sock.close()
