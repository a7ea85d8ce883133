"""Netlink side of capture (pyroute2): tc clsact + cls_bpf filters, the policy-routing rule and local table, and
route lookups that find a pod's node-side interface.

Every call acts on the network namespace the IPRoute socket was opened in (the node netns). Our tc filter is
recognised by (priority, handle, kind bpf, name), never by position, so other filters on the same hook and a
clsact qdisc that others use are left alone.
"""

from __future__ import annotations

import errno
import importlib.util
import socket
import sys
from dataclasses import dataclass
from typing import Any

from agent.redirect_errors import AttachError, RedirectKernelError


def _register_pyroute2_lazily() -> None:
    """pyroute2's package __init__ imports every feature it has (NDB with sqlite3, IPDB, wireless, nftables, ipvs,
    psutil, unittest, multiprocessing: ~160 modules, ~7 MB resident for the agent's whole life) while capture needs
    rtnetlink alone. So the package is registered without running its __init__; the first access to an attribute
    the submodules did not define (``from pyroute2 import NDB`` elsewhere in the process) runs it after all."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None:
        raise ImportError("pyroute2 is not installed; run `make setup`")
    pkg = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def full_package(name: str) -> Any:
        if name.startswith("__") or importlib.util.find_spec(f"pyroute2.{name}") is not None:
            raise AttributeError(name)  # a submodule: the import system loads it
        del pkg.__dict__["__getattr__"]
        loader.exec_module(pkg)
        return getattr(pkg, name)

    pkg.__dict__["__getattr__"] = full_package  # PEP 562 module __getattr__
    sys.modules["pyroute2"] = pkg


_register_pyroute2_lazily()

from pyroute2.iproute.linux import IPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

TC_H_CLSACT = 0xFFFFFFF1
TC_H_INGRESS = 0xFFFFFFF2  # ffff:fff2 = clsact ingress
TC_H_EGRESS = 0xFFFFFFF3
ETH_P_ALL = 0x0003
RTN_UNICAST = 1
RTN_LOCAL = 2
RT_SCOPE_HOST = 254
FAMILIES = ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0"))
_FAMILY_NAMES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}


@dataclass(frozen=True)
class RouteInfo:
    """The kernel's answer to `ip route get <ip>` in the node netns."""

    rtype: int
    oif: int | None
    gateway: str | None


@dataclass(frozen=True)
class FilterInfo:
    kind: str
    name: str


class Netlink:
    """A pyroute2 socket bound to the node netns plus the few operations capture needs."""

    def __init__(self) -> None:
        self.ipr = IPRoute()

    def close(self) -> None:
        self.ipr.close()

    # --- links and routes ------------------------------------------------------------------------------------

    def link_index(self, name: str) -> int | None:
        found = self.ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def link_name(self, index: int) -> str | None:
        try:
            links = self.ipr.get_links(index)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise
        return str(links[0].get_attr("IFLA_IFNAME")) if links else None

    def local_addresses(self) -> set[str]:
        return {str(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")) for a in self.ipr.get_addr()}

    def default_route_oifs(self) -> list[int]:
        out: list[int] = []
        for family, _ in FAMILIES:
            for r in self.ipr.route("dump", table=254, family=family):
                if r["dst_len"] == 0 and r.get_attr("RTA_OIF") is not None:
                    out.append(int(r.get_attr("RTA_OIF")))
        return sorted(set(out))

    def route_get(self, ip: str) -> RouteInfo | None:
        """None when the node has no route at all (ENETUNREACH / EHOSTUNREACH)."""
        try:
            msgs = self.ipr.route("get", dst=ip)
        except NetlinkError as exc:
            if exc.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL):
                return None
            raise
        m = msgs[0]
        oif = m.get_attr("RTA_OIF")
        gw = m.get_attr("RTA_GATEWAY")
        return RouteInfo(int(m["type"]), int(oif) if oif is not None else None, str(gw) if gw else None)

    # --- policy routing --------------------------------------------------------------------------------------

    def _find_rule(self, mark: int, mask: int, table: int, pref: int, family: int) -> bool:
        for r in self.ipr.get_rules(family=family):
            if (
                r.get_attr("FRA_FWMARK") == mark
                and r.get_attr("FRA_FWMASK") == mask
                and (r.get_attr("FRA_TABLE") or r["table"]) == table
                and r.get_attr("FRA_PRIORITY") == pref
            ):
                return True
        return False

    def ensure_policy_routing(self, mark: int, mask: int, table: int, pref: int) -> None:
        """Per family: `ip rule add fwmark MARK/MASK lookup TABLE pref PREF` + `ip route replace local 0/0 (::/0)
        dev lo table TABLE`, so packets the program marks are delivered to the socket it assigned."""
        lo = self.link_index("lo")
        if lo is None:
            raise RedirectKernelError("the node netns has no `lo` interface for the local route table")
        for family, default in FAMILIES:
            try:
                self.ipr.route(
                    "replace", dst=default, table=table, type="local", scope=RT_SCOPE_HOST, oif=lo, family=family
                )
                if not self._find_rule(mark, mask, table, pref, family):
                    self.ipr.rule("add", table=table, priority=pref, fwmark=mark, fwmask=mask, family=family)
            except NetlinkError as exc:
                if family == socket.AF_INET6 and exc.code in (errno.EACCES, errno.EAFNOSUPPORT):
                    continue  # IPv6 is disabled in this netns: there is no IPv6 traffic to deliver
                raise RedirectKernelError(
                    f"policy routing (fwmark {mark:#x}/{mask:#x} -> table {table}, local {default} dev lo) failed: "
                    f"{_reason(exc)}"
                ) from exc

    def has_policy_routing(self, mark: int, mask: int, table: int, pref: int) -> bool:
        """Whether the IPv4 half exists (IPv6 may legitimately be absent when the netns has IPv6 disabled)."""
        routes = [
            r
            for r in self.ipr.route("dump", table=table, family=socket.AF_INET)
            if r["type"] == RTN_LOCAL and r["dst_len"] == 0
        ]
        return bool(routes) and self._find_rule(mark, mask, table, pref, socket.AF_INET)

    def remove_policy_routing(self, mark: int, mask: int, table: int, pref: int) -> list[str]:
        removed: list[str] = []
        lo = self.link_index("lo")
        for family, default in FAMILIES:
            while self._find_rule(mark, mask, table, pref, family):
                self.ipr.rule("del", table=table, priority=pref, fwmark=mark, fwmask=mask, family=family)
                removed.append(f"rule fwmark {mark:#x}/{mask:#x} lookup {table} pref {pref} ({_FAMILY_NAMES[family]})")
            for r in self.ipr.route("dump", table=table, family=family):
                if r["type"] == RTN_LOCAL and r["dst_len"] == 0 and r.get_attr("RTA_OIF") == lo:
                    self.ipr.route(
                        "del", dst=default, table=table, type="local", scope=RT_SCOPE_HOST, oif=lo, family=family
                    )
                    removed.append(f"route local {default} dev lo table {table}")
        return removed

    # --- tc --------------------------------------------------------------------------------------------------

    def has_clsact(self, index: int) -> bool:
        return any(q.get_attr("TCA_KIND") == "clsact" for q in self.ipr.get_qdiscs(index=index))

    def ensure_clsact(self, index: int) -> bool:
        """True when this call created the qdisc (so the agent may remove it later when it is empty)."""
        if self.has_clsact(index):
            return False
        try:
            self.ipr.tc("add", "clsact", index=index)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise AttachError(f"cannot add clsact qdisc: {_reason(exc)} (kernel needs CONFIG_NET_SCH_INGRESS)") from exc
        return True

    def filters(self, index: int, parent: int = TC_H_INGRESS) -> list[tuple[int, int, FilterInfo]]:
        """(priority, handle, info) of every real filter (chain heads with handle 0 are skipped)."""
        out: list[tuple[int, int, FilterInfo]] = []
        try:
            msgs = self.ipr.get_filters(index=index, parent=parent)
        except NetlinkError as exc:
            if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                return out
            raise
        for m in msgs:
            if not m["handle"]:
                continue
            opts: Any = m.get_attr("TCA_OPTIONS")
            name = opts.get_attr("TCA_BPF_NAME") if opts is not None and hasattr(opts, "get_attr") else None
            out.append((m["info"] >> 16, int(m["handle"]), FilterInfo(str(m.get_attr("TCA_KIND")), str(name or ""))))
        return out

    def find_filter(self, index: int, prio: int, handle: int) -> FilterInfo | None:
        for p, h, info in self.filters(index):
            if p == prio and h == handle:
                return info
        return None

    def named_filters(self, index: int, name: str) -> list[tuple[int, int]]:
        """(priority, handle) of every ingress bpf filter called ``name``, wherever a past config put it."""
        return [(p, h) for p, h, info in self.filters(index) if info.kind == "bpf" and info.name == name]

    def put_filter(self, index: int, fd: int, name: str, prio: int, handle: int, replace: bool) -> None:
        """Add, or atomically replace (same prio/handle: the kernel swaps the program, no packet sees none)."""
        try:
            self.ipr.tc(
                "replace-filter" if replace else "add-filter",
                "bpf",
                index=index,
                handle=handle,
                fd=fd,
                name=name,
                parent=TC_H_INGRESS,
                classid=1,
                direct_action=True,
                prio=prio,
                protocol=ETH_P_ALL,
            )
        except NetlinkError as exc:
            raise AttachError(f"cannot {'replace' if replace else 'add'} cls_bpf filter: {_reason(exc)}") from exc

    def delete_filter(self, index: int, prio: int, handle: int) -> None:
        try:
            self.ipr.tc(
                "del-filter", "bpf", index=index, handle=handle, parent=TC_H_INGRESS, prio=prio, protocol=ETH_P_ALL
            )
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                return
            raise AttachError(f"cannot delete cls_bpf filter: {_reason(exc)}") from exc

    def delete_clsact_if_empty(self, index: int) -> bool:
        if self.filters(index, TC_H_INGRESS) or self.filters(index, TC_H_EGRESS):
            return False
        try:
            self.ipr.tc("del", "clsact", index=index)
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                return False
            raise AttachError(f"cannot delete clsact qdisc: {_reason(exc)}") from exc
        return True

    def all_link_indexes(self) -> list[int]:
        return [int(link["index"]) for link in self.ipr.get_links()]


def _reason(exc: NetlinkError) -> str:
    return f"{exc.args[1] if len(exc.args) > 1 else exc} (errno {exc.code})"
