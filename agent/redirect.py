"""Capture loader: has bpf/redirect.bpf.c compiled once (BCC, in a child process), sets up the node's policy
routing, attaches the program to the uplink and to pods' node-side interfaces, and keeps the pinned maps in step
with enrollment.

Capture outlives the agent on purpose: the tc filters stay attached and the maps stay pinned when the process
exits, so enrolled pods never leak plaintext while the agent restarts (their new connections fail closed until a
listener is back), and a restarted agent adopts the pins and swaps in its freshly compiled program atomically.
Only :func:`cleanup` (``ambit-agent --cleanup``) removes capture.

All methods block (netlink; a ~1-2 s compile child in :meth:`Redirector.start`): call them from a worker thread
(``await asyncio.to_thread(redirector.reconcile, ips)``), never on the event loop. They act on the network
namespace the calling thread was in when :meth:`Redirector.start` ran (the node netns).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import redirect_syscalls as sysbpf
from agent.capture_dnat import DnatCapture, DnatCaptureError, uncovered_rewrites
from agent.redirect_errors import (
    AttachError,
    RedirectCompileError,
    RedirectConfigError,
    RedirectError,
    RedirectKernelError,
    RedirectPinError,
)
from agent.redirect_maps import (
    IF_BRIDGE,
    IF_BRIDGE_PORT,
    IF_POD,
    IF_UPLINK,
    LAYOUT_VERSION,
    LOADER_OWNS_QDISC,
    ConfigEntry,
    IfaceEntry,
    RedirectMaps,
    migrate_pins,
    read_pinned_config,
)
from agent.redirect_netlink import TUNNEL_KINDS, ChangeWatch, LinkInfo, Netlink, NetlinkError
from agent.redirect_plan import (
    PodInterface,
    RouteProblem,
    Sighting,
    classify_route,
    hold_reused_addresses,
    plan_capture,
)
from common.log import kv

__all__ = [
    "AttachError",
    "RedirectCompileError",
    "RedirectConfig",
    "RedirectConfigError",
    "RedirectError",
    "RedirectKernelError",
    "RedirectPinError",
    "Redirector",
    "WorkloadCounters",
    "cleanup",
]

log = logging.getLogger("ambit.redirect")

DEFAULT_SOURCE = Path(__file__).resolve().parent.parent / "bpf" / "redirect.bpf.c"
PROGRAM_FUNCTION = "ambit_tc_ingress"
PROGRAM_PIN = "ambit_prog"
DNAT_FAILURE = "capture:dnat"
"""The key of :meth:`Redirector.status`'s ``failures`` under which the DNAT capture table's failure is reported."""
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_RESERVED_TABLES = {0, 253, 254, 255}


@dataclass(frozen=True)
class RedirectConfig:
    """Capture settings. Defaults fit the lab and a single-agent node; ``instance`` must be unique per node netns
    sharing one bpffs (lab nodes share the host's)."""

    instance: str = "default"
    pin_root: str = "/sys/fs/bpf/ambit"
    source: str = str(DEFAULT_SOURCE)
    outbound_port: int = 15001
    inbound_port: int = 15006
    hbone_port: int = 15008
    # Empty: the interfaces of the node's default route(s) and of every route through a router (other nodes' pod
    # CIDRs over a second network); given: exactly these.
    uplinks: tuple[str, ...] = ()
    # Tunnel devices of the node netns (VXLAN, Geneve, IPIP, GRE, WireGuard) are uplinks too, found at each
    # reconcile: overlay networks deliver other nodes' pod traffic there, and any pod can feed one with plain UDP.
    capture_tunnels: bool = True
    fail_open: bool = False  # debugging only: pass enrolled pods' SYNs on (plaintext!) when no listener is there
    tc_priority: int = 10
    tc_handle: int = 0xA3B1
    mark: int = 0x200
    mark_mask: int = 0xF00
    route_table: int = 100
    rule_priority: int = 100
    # The node netns keeps TIME_WAIT sockets of captured connections. TCP early demux attaches such a socket to a
    # *forwarded* packet with the same 4-tuple, and ip_forward then drops it: after a pod is released, its reused
    # 4-tuples would be blackholed for up to 60 s. Capture therefore turns early demux off in the node netns (and
    # cleanup restores the previous value).
    disable_early_demux: bool = True
    # Connections the node DNATs to an enrolled local pod (Service VIPs, NodePorts) pass the tc program before the
    # rewrite; an nftables chain after it hands them to the inbound listener (agent/capture_dnat.py). Needs nft.
    capture_dnat: bool = True
    # How long an address whose pod interface was re-created stays held without the controller naming its workload
    # anew (see reconcile's ``owners``); then it is captured as the workload named for it.
    reuse_hold_seconds: float = 30.0

    def __post_init__(self) -> None:
        if not _INSTANCE_RE.match(self.instance):
            raise RedirectConfigError(
                f"instance: {self.instance!r} must be 1-63 characters of letters, digits, '_', '.', '-'"
            )
        ports = {"outbound_port": self.outbound_port, "inbound_port": self.inbound_port, "hbone_port": self.hbone_port}
        for name, port in ports.items():
            if not 1 <= port <= 65535:
                raise RedirectConfigError(f"{name}: {port} is not a TCP port (1-65535)")
        if len(set(ports.values())) != 3:
            raise RedirectConfigError(f"outbound_port/inbound_port/hbone_port must differ, got {ports}")
        if not self.mark or self.mark & ~self.mark_mask or self.mark_mask > 0xFFFFFFFF:
            raise RedirectConfigError(f"mark: {self.mark:#x} must be non-zero and inside mark_mask {self.mark_mask:#x}")
        if not 1 <= self.tc_priority <= 0xFFFF:
            raise RedirectConfigError(f"tc_priority: {self.tc_priority} must be 1-65535")
        if not 1 <= self.tc_handle <= 0xFFFFFFFF:
            raise RedirectConfigError(f"tc_handle: {self.tc_handle:#x} must be a non-zero 32-bit value")
        if self.route_table in _RESERVED_TABLES or not 1 <= self.route_table <= 0xFFFFFFFF:
            raise RedirectConfigError(f"route_table: {self.route_table} is reserved or out of range")
        if not 1 <= self.rule_priority <= 32765:
            raise RedirectConfigError(f"rule_priority: {self.rule_priority} must be 1-32765 (before the main table)")
        if not (math.isfinite(self.reuse_hold_seconds) and self.reuse_hold_seconds > 0):
            raise RedirectConfigError(f"reuse_hold_seconds: {self.reuse_hold_seconds} must be a positive number")
        for up in self.uplinks:
            if not up or len(up) > 15 or "/" in up:
                raise RedirectConfigError(f"uplinks: {up!r} is not an interface name")
        if not os.path.isabs(self.pin_root):
            raise RedirectConfigError(f"pin_root: {self.pin_root!r} must be an absolute path in bpffs")

    @property
    def pin_dir(self) -> str:
        return os.path.join(self.pin_root, self.instance)

    @property
    def prog_pin(self) -> str:
        """The loaded program, pinned by the loader child so the agent can attach it without BCC."""
        return os.path.join(self.pin_dir, PROGRAM_PIN)

    @property
    def filter_name(self) -> str:
        """TCA_BPF_NAME of our filters: with prio/handle it is how cleanup tells ours from anyone else's."""
        return f"ambit:{self.instance}"


@dataclass(frozen=True)
class WorkloadCounters:
    """In-kernel counters of one enrolled workload (summed over CPUs), for the agent's metrics."""

    packets: int  # TCP packets the workload sent (seen at its node-side interface)
    bytes: int
    connections_out: int  # new outbound connections captured
    connections_in: int  # new inbound connections captured (plaintext 15006 or HBONE 15008)
    drops: int  # connections dropped because no agent listener was there (fail closed)


@dataclass
class _Attached:
    name: str
    flags: int


@dataclass
class _State:
    attached: dict[int, _Attached] = field(default_factory=dict)
    uplinks: dict[int, str] = field(default_factory=dict)
    enrolled: set[str] = field(default_factory=set)
    requested: set[str] = field(default_factory=set)
    peers: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    ip_iface: dict[str, int] = field(default_factory=dict)  # pod IP -> ifindex at the last reconcile
    tunnels: set[int] = field(default_factory=set)  # uplinks that are such because they are tunnel devices
    bridge_ports: dict[int, int] = field(default_factory=dict)  # port ifindex -> its bridge's (both carry the program)
    seen: dict[str, Sighting] = field(default_factory=dict)  # enrolled address -> where and as whose it was captured
    held: dict[str, str] = field(default_factory=dict)  # enrolled address -> owner token it is held under
    held_since: dict[str, float] = field(default_factory=dict)  # enrolled address -> when its hold began (monotonic)


class Redirector:
    def __init__(self, config: RedirectConfig | None = None) -> None:
        self.config = config or RedirectConfig()
        self._lock = threading.RLock()  # start, reconcile, set_fail_open, close: one at a time
        # The read-only views (counters, stats, readiness, status) run on the agent's event loop, for metrics scrapes,
        # probes and the admin dump: they must never wait for a reconcile's netlink work, only for the map handles
        # to stay open while they read. Reconcile replaces what they read whole (or mutates dicts, which a copy
        # under the GIL sees before or after), so this lock only orders them against close.
        self._view = threading.RLock()
        self._prog_fd = -1
        self._maps: RedirectMaps | None = None
        self._nl: Netlink | None = None
        self._watch: ChangeWatch | None = None
        self._state = _State()
        self._adopted: list[str] = []
        self._dnat = _dnat_capture(self.config) if self.config.capture_dnat else None

    # --- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Compile, adopt pins and filters of a previous run, set up policy routing, attach to the uplink(s).

        Raises RedirectConfigError / RedirectCompileError / RedirectKernelError / RedirectPinError with the
        precise cause; on failure nothing this call installed is left behind.
        """
        with self._lock:
            if self._maps is not None:
                return
            cfg = self.config
            _require_bpffs(cfg.pin_root)
            netns = _netns_cookie()
            nl = Netlink()
            try:
                links = nl.links()
                uplinks = self._uplinks_now(nl, links, keep_on_error=False)  # a config mistake fails first
                created_dir = _precheck_pins(cfg, netns)
            except RedirectError:
                nl.close()
                raise
            try:
                self._prog_fd = _compile(cfg)
                maps = RedirectMaps.open(cfg.pin_dir)
            except RedirectError:
                nl.close()
                self._drop_program()
                if created_dir:
                    _remove_pin_dir(cfg.pin_dir)
                raise
            self._maps, self._nl = maps, nl
            maps.clear_agent_conns()  # no connect of the previous agent's is still in progress
            if self._dnat is not None:
                self._dnat.fail_open = cfg.fail_open
                self._dnat.bind_netns()  # its nft calls act on this (the node's) netns, whichever thread reconciles
            routing_existed = False
            attached_now: list[int] = []
            swapped_now = 0
            try:
                # Subscribed before adopting, so no interface change after our first look at the netns goes unseen.
                self._watch = ChangeWatch(own_port=nl.port)
                saved = maps.read_config().early_demux_saved  # kept across restarts: the node's original value
                if cfg.disable_early_demux and not saved:
                    saved = 1 + _swap_tcp_early_demux(0)
                    swapped_now = saved
                maps.write_config(
                    ConfigEntry(
                        outbound_port=cfg.outbound_port,
                        inbound_port=cfg.inbound_port,
                        hbone_port=cfg.hbone_port,
                        fail_open=int(cfg.fail_open),
                        early_demux_saved=saved,
                        mark=cfg.mark,
                        mark_mask=cfg.mark_mask,
                        layout_version=LAYOUT_VERSION,
                        netns_cookie=netns,
                    )
                )
                routing_existed = nl.has_policy_routing(cfg.mark, cfg.mark_mask, cfg.route_table, cfg.rule_priority)
                nl.ensure_policy_routing(cfg.mark, cfg.mark_mask, cfg.route_table, cfg.rule_priority)
                self._refresh_homes(maps, nl, uplinks)
                self._adopt(maps, nl, uplinks)
                for idx, name in uplinks.items():
                    fresh = idx not in self._state.attached
                    try:
                        self._attach(idx, name, IF_UPLINK)
                    except AttachError as exc:
                        raise RedirectKernelError(f"cannot capture on uplink {name}: {exc}") from exc
                    if fresh:
                        attached_now.append(idx)
                self._state.uplinks = uplinks
                if not cfg.uplinks:  # found, not given: a route through a router elsewhere is news
                    self._watch.uplinks = set(uplinks)
            except Exception:
                for idx in attached_now:
                    self._detach(idx)
                if not routing_existed and not self._adopted:
                    nl.remove_policy_routing(cfg.mark, cfg.mark_mask, cfg.route_table, cfg.rule_priority)
                if swapped_now:
                    _swap_tcp_early_demux(swapped_now - 1)
                fresh_pins = created_dir and not self._adopted
                self._close_handles()
                if fresh_pins:
                    _remove_pin_dir(cfg.pin_dir)
                raise
            if not cfg.capture_dnat:
                # turned off: a table a previous agent left would go on capturing the addresses it was last given
                _dnat_capture(cfg).remove()
            elif why := uncovered_rewrites(link.name for link in links.values()):
                log.warning("connections the node rewrites may escape capture", extra=kv(reason=why))
            log.info(
                "capture started",
                extra=kv(
                    instance=cfg.instance,
                    pin_dir=cfg.pin_dir,
                    uplinks=sorted(uplinks.values()),
                    adopted=self._adopted,
                    fail_open=cfg.fail_open,
                ),
            )

    @property
    def change_watch(self) -> ChangeWatch | None:
        """Interface, tc and pod-route notifications of the node netns while started (None otherwise). The agent
        watches its fd on the event loop (``drain()`` never blocks and takes no lock) and reconciles when it reports
        a change: a pod interface re-created with the same IP is invisible to the controller. Stop watching before
        :meth:`close`, which closes it."""
        return self._watch

    def close(self) -> None:
        """Release this process's handles; capture (filters, maps, routing) stays for the next agent."""
        with self._lock:
            self._close_handles()

    # --- enrollment ------------------------------------------------------------------------------------------

    def reconcile(
        self,
        enrolled_ips: Iterable[str],
        local_ips: Iterable[str] | None = None,
        owners: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Make capture match the controller's view: ``enrolled_ips`` are the enrolled workloads running on this
        node; ``local_ips`` (optional) all pods on this node, so non-enrolled ones can be captured when they call an
        enrolled local pod. Returns the per-IP failures of enrolled workloads (also in :meth:`status`, with the
        non-enrolled pods that were skipped and why); every other enrolled workload is captured.

        ``owners`` (enrolled address -> a token naming the workload the controller gives it, e.g. its uid and xDS
        resource version) turns on the reused-address hold: an address that comes back behind another interface
        while its token is unchanged (a new sandbox holds the IP, the controller has not caught up) stays enrolled
        without a home, so all TCP from it is dropped and nothing reaches it, until the token changes
        (:func:`agent.redirect_plan.hold_reused_addresses`). Held addresses are reported as failures. Without
        ``owners`` a moved address is captured as the workload named for it at once.

        It also follows the node as it is now, whatever the controller knows: uplinks that appeared (tunnel devices)
        or vanished, and interfaces holding a pod route the controller has not named, which get the peer role while
        anything is enrolled. Call it again whenever :attr:`change_watch` reports a change.
        """
        with self._lock:
            maps, nl = self._require_started()
            st = self._state
            enrolled = set(enrolled_ips)
            uplink_failures: dict[str, str] = {}
            links = nl.links()
            self._refresh_uplinks(nl, links, uplink_failures)  # before planning: a route via a new tunnel is no pod's
            plan = plan_capture(
                enrolled, set(local_ips or ()), self._resolver(nl), nl.pod_route_links(exclude=st.uplinks)
            )
            failures = dict(plan.failures) | uplink_failures
            ok: set[int] = set()
            all_bridges = {i for i, link in links.items() if link.kind == "bridge"}
            for idx, ip_plan in plan.interfaces.items():
                try:
                    self._attach(idx, ip_plan.name, IF_POD | (IF_BRIDGE if idx in all_bridges else 0))
                    ok.add(idx)
                except (AttachError, RedirectKernelError) as exc:
                    for ip in ip_plan.enrolled | ip_plan.peers:
                        failures[ip] = f"cannot attach to {ip_plan.name}: {exc}"
            bridges = ok & all_bridges
            ports = self._attach_bridge_ports(maps, links, bridges, failures)
            homes = self._port_homes(nl, links, ports, plan.homes_on(ok))
            want = set(homes)
            # A home the agent knows only as a bridge says nothing of which pod holds the address now: such an
            # address keeps the port it was last seen behind (a dump that missed it must not look like a move).
            precise = {ip: idx for ip, idx in homes.items() if idx not in bridges}
            now = time.monotonic()
            expired = {ip for ip, t in st.held_since.items() if now - t >= self.config.reuse_hold_seconds}
            held, st.seen = (
                hold_reused_addresses(enrolled, precise, owners, st.seen, st.held, expired) if owners else ({}, {})
            )
            self._log_holds(held, homes, expired)
            st.held = held
            st.held_since = {ip: st.held_since.get(ip, now) for ip in held}
            for ip in held:
                failures[ip] = (
                    f"its interface was re-created ({homes.get(ip, 'none now')}) and the controller has not confirmed "
                    "the workload since (a new pod reusing the IP?): held, its TCP dropped"
                )
            homes = {ip: idx for ip, idx in homes.items() if ip not in held}
            have = maps.workload_ips()
            # Release before detaching (nothing is captured half-way), enroll after attaching (the return path is
            # in place before the first captured SYN). A home is written before its workload is enrolled and
            # removed after it is released, so an enrolled address has one unless it is held; one that moved to
            # another interface (a new pod with a recycled IP) has its home rewritten in place.
            for ip in sorted(have - want):
                maps.delete_workload(ip)
            self._write_homes(maps, homes)
            for ip in sorted(want - have):
                maps.add_workload(ip)
            self._sync_dnat(want, failures)
            for idx, att in list(st.attached.items()):
                if idx in ok or idx in ports:
                    continue
                try:
                    if att.flags & IF_UPLINK and att.flags & IF_BRIDGE_PORT:
                        self._attach(idx, att.name, IF_UPLINK)  # its bridge is no longer captured
                    elif att.flags & IF_POD:
                        self._detach(idx)
                except (AttachError, RedirectKernelError) as exc:
                    failures[f"interface:{att.name}"] = f"cannot detach: {exc}"
            for idx in maps.bridge_port_entries().keys() - ports.keys():
                if not st.attached.get(idx, _Attached("", 0)).flags & IF_BRIDGE_PORT:
                    maps.delete_bridge_port(idx)
            st.bridge_ports = ports
            self._log_changes(want, failures)
            st.enrolled = want
            st.requested = enrolled
            st.peers = {ip for idx in ok for ip in plan.interfaces[idx].peers}
            st.ip_iface = {ip: idx for idx in ok for ip in plan.interfaces[idx].enrolled | plan.interfaces[idx].peers}
            st.failures = failures
            st.skipped = plan.skipped
            return dict(failures)

    def set_fail_open(self, fail_open: bool) -> None:
        """Flip fail-open at run time (a debugging switch: fail-open lets enrolled pods talk plaintext), in the
        programs' config and in the DNAT capture table. The table is rewritten here once a reconcile has enrolled
        pods; before that the first reconcile writes it (a sync of no addresses now would remove the table a previous
        agent left, uncapturing DNATed connections until then)."""
        with self._lock:
            maps, _ = self._require_started()
            cfg = maps.read_config()
            cfg.fail_open = int(fail_open)
            maps.write_config(cfg)
            st = self._state
            if self._dnat is not None:
                self._dnat.fail_open = fail_open
                if st.enrolled:
                    failures = {k: v for k, v in st.failures.items() if k != DNAT_FAILURE}
                    self._sync_dnat(st.enrolled, failures)
                    self._log_changes(st.enrolled, failures)
                    st.failures = failures
            log.warning("fail-open changed", extra=kv(instance=self.config.instance, fail_open=fail_open))

    # --- the agent's own connections from inside pods ----------------------------------------------------------

    def allow_agent_conn(self, src: tuple[str, int], dst: tuple[str, int]) -> bool:
        """Let the SYN of the agent's connection src -> dst, made from inside the pod that owns ``src``, cross the
        pod's interface uncaptured; False (nothing written) before capture started or after it stopped."""
        with self._view:
            if self._maps is None:
                return False
            self._maps.allow_agent_conn(src, dst)
            return True

    def forget_agent_conn(self, src: tuple[str, int], dst: tuple[str, int]) -> None:
        """Once its connect is done: a later SYN of that tuple (the pod's own, after the agent's socket closed) is
        captured again."""
        with self._view:
            if self._maps is None:
                return
            try:
                self._maps.forget_agent_conn(src, dst)
            except RedirectKernelError as exc:  # the entry ages out of the LRU map; the connection is made anyway
                log.warning("agent connection not forgotten", extra=kv(src=src, dst=dst, error=str(exc)))

    # --- observation -----------------------------------------------------------------------------------------

    def counters(self) -> dict[str, WorkloadCounters]:
        with self._view:
            maps, _ = self._require_started()
            return {
                ip: WorkloadCounters(c.packets, c.bytes, c.conns_out, c.conns_in, c.drops)
                for ip, c in maps.workload_counters().items()
            }

    def stats(self) -> dict[str, int]:
        """Node-wide program counters: captures per listener, fail-closed drops, fail-open passes, errors."""
        with self._view:
            maps, _ = self._require_started()
            return maps.stat_totals()

    def spoofed_drops(self) -> dict[str, int]:
        """Interface name (a pod's, or the uplink) -> TCP that came in there from an enrolled workload's address living
        elsewhere (dropped): who spoofs."""
        with self._view:
            maps, _ = self._require_started()
            attached = dict(self._state.attached)  # a reconcile may attach or detach meanwhile
            return {attached[i].name: n for i, n in sorted(maps.spoofed_by_iface().items()) if i in attached}

    @property
    def capturing_any(self) -> bool:
        """At least one interface (uplink or pod) carries our program."""
        with self._view:
            return self._maps is not None and bool(self._state.attached)

    @property
    def ready(self) -> bool:
        """Started, capturing at least one pod when pods are enrolled (a node agent that can capture none of its
        enrolled pods must not report ready), and, unless fail-open, with the DNAT capture table in place: without
        it, plaintext the node DNATs to an enrolled pod reaches it past policy, which fail-closed capture exists to
        prevent. Under fail-open (debugging, where capture already lets connections pass when it cannot take them)
        the table's failure is only reported (:meth:`status`, logs)."""
        with self._view:
            st = self._state
            if self._maps is None or not st.uplinks:
                return False
            dnat = self._dnat
            if dnat is not None and DNAT_FAILURE in st.failures and not dnat.fail_open:
                return False
            return not st.requested or bool(st.enrolled)

    def status(self) -> dict[str, Any]:
        """Attached interfaces, enrolled pods, per-pod failures, program counters. No netlink and no wait for a
        reconcile in progress: cheap enough for an admin handler on the event loop (like :meth:`counters` and the
        properties, it only reads maps and the state the last reconcile published)."""
        with self._view:
            st = self._state
            started = self._maps is not None
            interfaces: dict[str, dict[str, Any]] = {}
            by_ip = st.ip_iface
            spoofed = self._maps.spoofed_by_iface() if self._maps else {}
            for idx, att in sorted(dict(st.attached).items()):
                bridge = st.attached.get(st.bridge_ports.get(idx, 0))
                interfaces[att.name] = {
                    "ifindex": idx,
                    "role": "uplink" if att.flags & IF_UPLINK else "pod",
                    "bridge": "" if bridge is None else bridge.name,  # a port of this bridge
                    "enrolled": sorted(ip for ip, i in by_ip.items() if i == idx and ip in st.enrolled),
                    "peers": sorted(ip for ip, i in by_ip.items() if i == idx and ip in st.peers),
                    "spoofed_drops": spoofed.get(idx, 0),
                }
            return {
                "instance": self.config.instance,
                "pin_dir": self.config.pin_dir,
                "started": started,
                "adopted": list(self._adopted),
                "uplinks": sorted(st.uplinks.values()),
                "interfaces": interfaces,
                "enrolled": sorted(st.enrolled),
                "held": sorted(st.held),
                "failures": dict(sorted(st.failures.items())),
                "skipped_peers": dict(sorted(st.skipped.items())),
                "capturing_any": started and bool(st.attached),
                "fail_open": bool(self._maps.read_config().fail_open) if self._maps else self.config.fail_open,
                "ready": self.ready,
                "stats": self._maps.stat_totals() if self._maps else {},
            }

    # --- internals -------------------------------------------------------------------------------------------

    def _require_started(self) -> tuple[RedirectMaps, Netlink]:
        if self._maps is None or self._nl is None:
            raise RedirectError("Redirector.start() has not completed")
        return self._maps, self._nl

    def _resolver(self, nl: Netlink) -> Any:
        def resolve(ip: str) -> PodInterface:
            return classify_route(ip, nl.route_get(ip), nl.link_name, self._state.uplinks)

        return resolve

    def _resolve_uplinks(self, nl: Netlink, links: Mapping[int, LinkInfo]) -> dict[int, str]:
        out: dict[int, str] = {}
        if self.config.uplinks:
            for name in self.config.uplinks:
                idx = nl.link_index(name)
                if idx is None:
                    raise RedirectConfigError(f"uplinks: interface {name!r} does not exist in the node netns")
                out[idx] = name
            return out
        for idx in nl.default_route_oifs():
            found = nl.link_name(idx)
            if found:
                out[idx] = found
        if not out:
            raise RedirectConfigError("uplinks: none given and the node netns has no default route; pass --uplink")
        # Other nodes' pod CIDRs may be routed over a second network rather than the default route's: HBONE from
        # those nodes arrives there. Any interface a route through a router leaves by is an uplink too, apart from
        # pod interfaces (a pod acting as a router stays a pod): those holding pod host routes, and bridges with a
        # port into another netns (an uplink's pods would all be refused).
        pods = set(nl.pod_route_links(exclude=out))
        pods |= {link.master for link in links.values() if link.master and link.peer_netns is not None}
        for idx in nl.gateway_route_oifs():
            found = nl.link_name(idx)
            if found and found != "lo" and idx not in pods:
                out.setdefault(idx, found)
        return out

    def _uplinks_now(self, nl: Netlink, links: Mapping[int, LinkInfo], keep_on_error: bool) -> dict[int, str]:
        """The uplinks capture must cover at this moment: the configured or default-route ones, plus tunnel devices.
        With ``keep_on_error`` (a reconcile) a transient failure, the default route being replaced, keeps the last
        known ones instead of raising."""
        try:
            out = self._resolve_uplinks(nl, links)
        except RedirectConfigError:
            if not keep_on_error:
                raise
            out = {i: n for i, n in self._state.uplinks.items() if i not in self._state.tunnels}
        tunnels = (
            {i: link.name for i, link in links.items() if link.kind in TUNNEL_KINDS}
            if self.config.capture_tunnels
            else {}
        )
        self._state.tunnels = set(tunnels) - set(out)
        return {**tunnels, **out}

    def _refresh_uplinks(self, nl: Netlink, links: Mapping[int, LinkInfo], failures: dict[str, str]) -> None:
        """Attach to uplinks that appeared (a tunnel device an overlay agent created after us) and forget those whose
        link is gone. An uplink that still exists keeps the program even when it stops qualifying: capturing on an
        interface that no longer brings mesh traffic costs nothing, missing one that does is a bypass."""
        st = self._state
        now = self._uplinks_now(nl, links, keep_on_error=True)
        for idx, name in now.items():
            if idx not in st.uplinks:
                try:
                    self._attach(idx, name, IF_UPLINK)
                except (AttachError, RedirectKernelError) as exc:
                    failures[f"uplink:{name}"] = f"cannot attach: {exc}"
                    continue
                st.uplinks[idx] = name
                log.info("capture attached to a new uplink", extra=kv(instance=self.config.instance, interface=name))
        for idx in list(st.uplinks):
            if idx not in now and nl.link_name(idx) is None:
                self._detach(idx)
                del st.uplinks[idx]
        if self._watch is not None and not self.config.uplinks:
            self._watch.uplinks = set(st.uplinks)

    def _attach_bridge_ports(
        self, maps: RedirectMaps, links: dict[int, LinkInfo], bridges: set[int], failures: dict[str, str]
    ) -> dict[int, int]:
        """Put the program on every port of ``bridges`` (bridges that hold pods, already attached), in the role of what
        is behind the port: two pods of one bridge talk through the bridge's L2 switching, which never passes their
        frames up to the bridge's own program. Ports come and go with pods (the change watch reports it). Returns
        port -> bridge for the ports that carry it."""
        st = self._state
        entries = maps.bridge_port_entries()
        out: dict[int, int] = {}
        for idx, link in sorted(links.items()):
            if link.master not in bridges or idx in bridges:
                continue
            bridge = links[link.master]
            role = IF_UPLINK if idx in st.uplinks else IF_POD  # an L2 overlay's tunnel device can be a port too
            try:
                if entries.get(idx) != (bridge.index, bridge.mac):  # before the flag that makes the program read it
                    maps.set_bridge_port(idx, bridge.index, bridge.mac)
                self._attach(idx, link.name, role | IF_BRIDGE_PORT)
            except (AttachError, RedirectKernelError) as exc:
                failures[f"bridge port:{link.name}"] = f"cannot attach, pods of {bridge.name} talk uncaptured: {exc}"
                continue
            out[idx] = bridge.index
        return out

    def _port_homes(
        self, nl: Netlink, links: dict[int, LinkInfo], ports: dict[int, int], homes: dict[str, int]
    ) -> dict[str, int]:
        """Narrow the home of each enrolled address behind a bridge from the bridge (the route says no more) to the one
        port whose veth's far end holds it. With the bridge as home every pod of the bridge could send as any other
        and be captured as it (its certificate, its policy): the pod's own address list, read in its netns, is not
        the pod's to forge without CAP_NET_ADMIN there, unlike the ARP and FDB entries it can poison. An address
        found behind no port or behind several (a pod that added another's) keeps the bridge, as before."""
        behind: dict[str, set[int]] = {}
        for port in ports:
            link = links.get(port)
            if link is None or link.peer is None or link.peer_netns is None:
                continue  # not a veth into a pod's netns: its pods' homes stay the bridge
            try:
                found = nl.peer_addresses(link.peer_netns, link.peer)
            except (NetlinkError, RedirectKernelError, OSError) as exc:  # the pod's netns is going away; an old kernel
                log.debug("bridge port peer unreadable", extra=kv(interface=link.name, error=str(exc)))
                continue
            for ip in found:
                behind.setdefault(str(ipaddress.ip_address(ip)), set()).add(port)
        out = dict(homes)
        for ip, idx in homes.items():
            candidates = {p for p in behind.get(str(ipaddress.ip_address(ip)), ()) if ports[p] == idx}
            if len(candidates) == 1:
                out[ip] = candidates.pop()
        return out

    @staticmethod
    def _write_homes(maps: RedirectMaps, homes: dict[str, int]) -> None:
        current = maps.workload_homes()
        for ip in sorted(current.keys() - homes.keys()):
            maps.delete_home(ip)
        for ip, idx in sorted(homes.items()):
            if current.get(ip) != idx:
                maps.set_home(ip, idx)

    def _refresh_homes(self, maps: RedirectMaps, nl: Netlink, uplinks: dict[int, str]) -> None:
        """Homes of the pinned workloads from the routes as they are now, before our program takes over the filters:
        pins migrated from layout 1 have none (every enrolled pod would be dropped as a spoofer until the first
        reconcile), and a pod may have moved while no agent ran. A workload whose pod is gone keeps no home (nothing
        may send as it) until the first reconcile releases it."""
        homes: dict[str, int] = {}
        for ip in maps.workload_ips():
            try:
                homes[ip] = classify_route(ip, nl.route_get(ip), nl.link_name, uplinks).index
            except RouteProblem:
                continue
        self._write_homes(maps, homes)

    def _adopt(self, maps: RedirectMaps, nl: Netlink, uplinks: dict[int, str]) -> None:
        """Take over what a previous agent attached: swap its filters to our program (same prio/handle: atomic)."""
        cfg = self.config
        for idx, entry in maps.iface_entries().items():
            name = nl.link_name(idx)
            if name is None:
                maps.delete_iface(idx)  # the pod (and its veth) went away while no agent ran
                continue
            info = nl.find_filter(idx, cfg.tc_priority, cfg.tc_handle)
            if entry.flags & IF_UPLINK and idx not in uplinks:
                if info is not None and info.name == cfg.filter_name:
                    self._state.attached[idx] = _Attached(name, entry.flags)
                    self._detach(idx)
                else:
                    maps.delete_iface(idx)
                continue
            if info is not None and info.name == cfg.filter_name:
                nl.put_filter(idx, self._prog_fd, cfg.filter_name, cfg.tc_priority, cfg.tc_handle, replace=True)
                self._state.attached[idx] = _Attached(name, entry.flags)
                self._adopted.append(name)
            elif entry.flags & IF_POD:
                self._attach(idx, name, entry.flags)  # someone removed the filter: restore capture now
                self._adopted.append(name)
            for prio, handle in nl.named_filters(idx, cfg.filter_name):
                if (prio, handle) != (cfg.tc_priority, cfg.tc_handle):  # left by a run with another tc_priority
                    nl.delete_filter(idx, prio, handle)
        for ip in maps.workload_ips():
            self._state.enrolled.add(ip)
            self._state.requested.add(ip)

    def _attach(self, idx: int, name: str, flags: int) -> None:
        maps, nl = self._require_started()
        cfg = self.config
        current = self._state.attached.get(idx)
        if current is not None and current.flags == flags:
            found = nl.find_filter(idx, cfg.tc_priority, cfg.tc_handle)
            if found is not None and found.name == cfg.filter_name:
                return
            # Someone removed our filter (or the clsact qdisc) behind our back: put capture back.
            log.warning("capture filter vanished; re-attaching", extra=kv(instance=cfg.instance, interface=name))
        prev = maps.iface_entries().get(idx)
        created = nl.ensure_clsact(idx)
        owns = created or bool(prev and prev.loader_flags & LOADER_OWNS_QDISC)
        maps.set_iface(idx, IfaceEntry(flags, LOADER_OWNS_QDISC if owns else 0))
        try:
            info = nl.find_filter(idx, cfg.tc_priority, cfg.tc_handle)
            if info is not None and not (info.kind == "bpf" and info.name == cfg.filter_name):
                raise AttachError(
                    f"tc ingress priority {cfg.tc_priority} handle {cfg.tc_handle:#x} on {name} is taken by another "
                    f"filter ({info.kind} {info.name!r}); choose another tc_priority/tc_handle"
                )
            nl.put_filter(idx, self._prog_fd, cfg.filter_name, cfg.tc_priority, cfg.tc_handle, replace=info is not None)
        except Exception:
            if prev is not None:
                maps.set_iface(idx, prev)
            else:
                maps.delete_iface(idx)
            if created:
                nl.delete_clsact_if_empty(idx)
            raise
        self._state.attached[idx] = _Attached(name, flags)

    def _detach(self, idx: int) -> None:
        maps, nl = self._require_started()
        cfg = self.config
        att = self._state.attached.pop(idx, None)
        entry = maps.iface_entries().get(idx)
        info = nl.find_filter(idx, cfg.tc_priority, cfg.tc_handle)
        if info is not None and info.name == cfg.filter_name:
            nl.delete_filter(idx, cfg.tc_priority, cfg.tc_handle)
        maps.delete_iface(idx)
        if entry is not None and entry.loader_flags & LOADER_OWNS_QDISC:
            nl.delete_clsact_if_empty(idx)
        log.info("capture detached", extra=kv(instance=cfg.instance, interface=att.name if att else idx))

    def hold_expires_in(self) -> float | None:
        """Seconds until the next held address is released unless the controller names its workload anew (the
        caller reconciles then); None when nothing is held."""
        since = self._state.held_since
        if not since:
            return None
        return max(0.0, min(since.values()) + self.config.reuse_hold_seconds - time.monotonic())

    def _log_holds(self, held: dict[str, str], homes: dict[str, int], expired: set[str]) -> None:
        for ip in sorted(held.keys() - self._state.held.keys()):
            log.warning(
                "holding a workload address: its pod interface was re-created and the controller has not confirmed "
                "the workload since",
                extra=kv(instance=self.config.instance, ip=ip, interface=homes.get(ip), owner=held[ip]),
            )
        for ip in sorted(self._state.held.keys() - held.keys()):
            if ip in expired:
                log.warning(
                    "workload address released from hold: the controller named no other workload for it in time, so "
                    "the re-created interface is taken for the same pod",
                    extra=kv(instance=self.config.instance, ip=ip, seconds=self.config.reuse_hold_seconds),
                )
            else:
                log.info("workload address released from hold", extra=kv(instance=self.config.instance, ip=ip))

    def _sync_dnat(self, want: set[str], failures: dict[str, str]) -> None:
        """Bring the DNAT capture table to ``want``; a failure goes into ``failures`` under DNAT_FAILURE (it holds
        readiness, see :attr:`ready`) until a later sync succeeds."""
        if self._dnat is None:
            return
        try:
            self._dnat.sync(want)
        except DnatCaptureError as exc:
            failures[DNAT_FAILURE] = (
                f"connections DNATed to enrolled pods (Service VIPs, NodePorts) are not captured (DNAT capture "
                f"table inet {self._dnat.table}): {exc}"
            )

    def _log_changes(self, want: set[str], failures: dict[str, str]) -> None:
        st = self._state
        added, removed = sorted(want - st.enrolled), sorted(st.enrolled - want)
        if added or removed:
            log.info("capture changed", extra=kv(instance=self.config.instance, enrolled=added, released=removed))
        for ip, reason in sorted(failures.items()):
            if st.failures.get(ip) != reason:
                log.error("cannot capture workload", extra=kv(instance=self.config.instance, ip=ip, reason=reason))

    def _drop_program(self) -> None:
        if self._prog_fd >= 0:
            os.close(self._prog_fd)
        self._prog_fd = -1

    def _close_handles(self) -> None:
        with self._view:  # no view is reading the maps through these fds
            if self._maps is not None:
                self._maps.close()
            if self._nl is not None:
                self._nl.close()
            if self._watch is not None:
                self._watch.close()
            if self._dnat is not None:
                self._dnat.close()
            self._maps, self._nl, self._watch = None, None, None
            self._drop_program()
            self._state = _State()
            self._adopted = []


def cleanup(target: str | RedirectConfig) -> list[str]:
    """Remove everything an instance installed in this node netns: its tc filters (matched by kind and name on
    every interface, whatever prio/handle they were given), clsact qdiscs it created that are now empty, the
    policy-routing rule and local table route, and its pin directory. Returns what was removed; safe to repeat.
    Policy routing and the early-demux setting stay while another instance's filters remain in the netns.
    Pass the agent's RedirectConfig when it changed mark, table or rule priority from the defaults."""
    cfg = target if isinstance(target, RedirectConfig) else RedirectConfig(instance=target)
    removed: list[str] = []
    owned: dict[int, IfaceEntry] = {}
    maps: RedirectMaps | None = None
    early_demux_saved = 0
    if not os.path.isdir(cfg.pin_dir):
        try:
            _require_bpffs(cfg.pin_root)
        except (RedirectKernelError, OSError) as exc:
            # `ip netns exec` mounts a fresh /sys: the pins (and the early-demux value they keep) are out of sight
            # here, not gone, and a clean "cleanup done" would hide that they and early demux off stay behind.
            log.warning(
                "no bpffs here: the instance's pins and the tcp_early_demux value they keep are left as they are",
                extra=kv(instance=cfg.instance, reason=str(exc)),
            )
    if os.path.isdir(cfg.pin_dir):
        try:
            migrate_pins(cfg.pin_dir)  # one reader for every layout this agent can adopt; all of it goes below
            maps = RedirectMaps.open(cfg.pin_dir)
            for ip in sorted(maps.workload_ips()):
                maps.delete_workload(ip)  # stop capturing before filters go, so nothing half-captured remains
            owned = maps.iface_entries()
            early_demux_saved = maps.read_config().early_demux_saved
        except RedirectError as exc:
            log.warning("pins unreadable; removing filters by name only", extra=kv(reason=str(exc)))
        finally:
            if maps is not None:
                maps.close()
    nl = Netlink()
    try:
        node_addrs = nl.local_addresses()
        others: set[str] = set()  # other Ambit instances still capturing in this netns share the routing
        for idx in nl.all_link_indexes():
            for _, _, info in nl.filters(idx):
                if info.kind == "bpf" and info.name.startswith("ambit:") and info.name != cfg.filter_name:
                    others.add(info.name)
            ours = nl.named_filters(idx, cfg.filter_name)
            if not ours:
                continue
            name = nl.link_name(idx) or str(idx)
            for prio, handle in ours:
                nl.delete_filter(idx, prio, handle)
                removed.append(f"tc filter {cfg.filter_name} on {name}")
            entry = owned.get(idx)
            if entry is not None and entry.loader_flags & LOADER_OWNS_QDISC and nl.delete_clsact_if_empty(idx):
                removed.append(f"clsact qdisc on {name}")
        if others:
            log.warning(
                "keeping policy routing and early demux setting: other instances still capture here",
                extra=kv(instance=cfg.instance, others=sorted(others)),
            )
        else:
            removed += nl.remove_policy_routing(cfg.mark, cfg.mark_mask, cfg.route_table, cfg.rule_priority)
    finally:
        nl.close()
    if early_demux_saved and not others:
        lingering = _captured_time_wait(node_addrs)
        if lingering:
            # Restoring early demux now would blackhole pods reusing these 4-tuples until the sockets expire.
            log.warning(
                "leaving net.ipv4.tcp_early_demux=0",
                extra=kv(instance=cfg.instance, time_wait_sockets=lingering, restore_to=early_demux_saved - 1),
            )
        else:
            _swap_tcp_early_demux(early_demux_saved - 1)
            removed.append(f"net.ipv4.tcp_early_demux restored to {early_demux_saved - 1}")
    dnat = _dnat_capture(cfg)
    if dnat.remove():
        removed.append(f"nftables table inet {dnat.table}")
    if _remove_pin_dir(cfg.pin_dir):
        removed.append(f"pins {cfg.pin_dir}")
    with contextlib.suppress(OSError):
        os.rmdir(cfg.pin_root)  # only succeeds when no other instance is left
    log.info("capture removed", extra=kv(instance=cfg.instance, removed=removed))
    return removed


# --- helpers ---------------------------------------------------------------------------------------------------


def _dnat_capture(cfg: RedirectConfig) -> DnatCapture:
    return DnatCapture(
        cfg.instance,
        port=cfg.inbound_port,
        hbone_port=cfg.hbone_port,
        mark=cfg.mark,
        mark_mask=cfg.mark_mask,
        fail_open=cfg.fail_open,
    )


def _netns_cookie() -> int:
    """Identity of the calling thread's netns (inode), stored with the pins so that another node cannot adopt."""
    return os.stat("/proc/thread-self/ns/net").st_ino


_EARLY_DEMUX = "/proc/sys/net/ipv4/tcp_early_demux"


def _swap_tcp_early_demux(value: int) -> int:
    """Set the calling thread's netns tcp_early_demux (procfs resolves the netns at open) and return the old one."""
    try:
        with open(_EARLY_DEMUX, "r+") as f:
            old = int(f.read().strip() or 0)
            if old != value:
                f.seek(0)
                f.write(str(value))
    except OSError as exc:
        raise RedirectKernelError(f"cannot set {_EARLY_DEMUX} to {value}: {exc.strerror}") from exc
    return old


def _captured_time_wait(local: set[str]) -> int:
    """TIME_WAIT sockets of captured connections in the calling thread's netns: their local address is not one of
    the node's ``local`` addresses (it is the original destination, or a client address the agent preserved)."""
    count = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/thread-self/net/{table}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] != "06":  # TCP_TIME_WAIT
                    continue
                raw = bytes.fromhex(fields[1].split(":")[0])
                # /proc prints each 32-bit word in host (little-endian) order.
                packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                addr = ipaddress.ip_address(packed)
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                    addr = addr.ipv4_mapped
                if str(addr) not in local and not addr.is_loopback:
                    count += 1
    return count


def _require_bpffs(pin_root: str) -> None:
    best = ("", "")
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            under = len(parts) >= 3 and (pin_root == parts[1] or pin_root.startswith(parts[1].rstrip("/") + "/"))
            if under and len(parts[1]) >= len(best[0]):
                best = (parts[1], parts[2])
    if best[1] != "bpf":
        raise RedirectKernelError(
            f"{pin_root} is not on a bpf filesystem (found {best[1] or 'nothing'} at {best[0] or '?'}): "
            "mount it with `mount -t bpf bpf /sys/fs/bpf` (make setup does)"
        )


def _precheck_pins(cfg: RedirectConfig, netns: int) -> bool:
    """Refuse pins that belong to another netns or an incompatible layout before BCC would reuse them blindly, and
    migrate those of an older compatible layout. True when this call created the pin directory (so a failed start
    can remove it again)."""
    existed = os.path.isdir(cfg.pin_dir)
    try:
        os.makedirs(cfg.pin_dir, exist_ok=True)
    except OSError as exc:
        raise RedirectPinError(f"cannot create pin directory {cfg.pin_dir}: {exc.strerror}") from exc
    present = set(os.listdir(cfg.pin_dir))
    if not present >= {"ambit_config", "ambit_workloads", "ambit_ifaces"}:
        return not existed
    owner = read_pinned_config(cfg.pin_dir)
    if owner.netns_cookie and owner.netns_cookie != netns:
        if _netns_alive(owner.netns_cookie):
            raise RedirectPinError(
                f"pins in {cfg.pin_dir} belong to network namespace inode {owner.netns_cookie}, this agent runs in "
                f"{netns}: instance {cfg.instance!r} is used by another node; give each node its own instance"
            )
        # That netns is gone, and with it every filter that used these maps: nothing to adopt, start afresh.
        log.warning(
            "replacing pins of a network namespace that no longer exists",
            extra=kv(instance=cfg.instance, pin_dir=cfg.pin_dir, old_netns=owner.netns_cookie),
        )
        _remove_pin_dir(cfg.pin_dir)
        os.makedirs(cfg.pin_dir, exist_ok=True)
        return True
    migrated = migrate_pins(cfg.pin_dir)
    if migrated:
        log.warning(
            "migrated pins to this agent's layout",
            extra=kv(instance=cfg.instance, pin_dir=cfg.pin_dir, layout=LAYOUT_VERSION, changes=migrated),
        )
    return False


def _netns_alive(inode: int) -> bool:
    """Whether any named netns or any thread still lives in the network namespace with this inode."""
    candidates = [os.path.join("/var/run/netns", n) for n in _listdir("/var/run/netns")]
    for pid in _listdir("/proc"):
        if pid.isdigit():
            candidates += [f"/proc/{pid}/task/{tid}/ns/net" for tid in _listdir(f"/proc/{pid}/task")]
    for path in candidates:
        try:
            if os.stat(path).st_ino == inode:
                return True
        except OSError:
            continue
    return False


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _remove_pin_dir(pin_dir: str) -> bool:
    if not os.path.isdir(pin_dir):
        return False
    for entry_name in os.listdir(pin_dir):
        os.unlink(os.path.join(pin_dir, entry_name))
    os.rmdir(pin_dir)
    return True


LOADER_TIMEOUT_S = 300.0  # a compile takes 1-2 s; a loaded 2-core node can stretch that a lot


def _compile(cfg: RedirectConfig) -> int:
    """Compile, load and pin the program in a child process (agent/redirect_loader.py) and return an fd of it.

    BCC never enters the agent: LLVM and clang would stay resident for its whole life. The child's stderr (clang
    diagnostics, verifier log) becomes the detail of the exception, so failures are as precise as in-process."""
    src = Path(cfg.source)
    if not src.is_file():
        raise RedirectCompileError(f"eBPF source {src} does not exist or is not a file (RedirectConfig.source)")
    cflags = [f"-I{src.parent}", f'-DAMBIT_PIN_DIR="{cfg.pin_dir}"']
    argv = [sys.executable, "-m", "agent.redirect_loader", str(src), PROGRAM_FUNCTION, cfg.prog_pin, *cflags]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=LOADER_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RedirectCompileError(f"compiling {src} took longer than {LOADER_TIMEOUT_S:.0f} s") from exc
    except OSError as exc:
        raise RedirectCompileError(f"cannot run the eBPF loader {sys.executable}: {exc}") from exc
    if proc.returncode != 0:
        raise _loader_error(src, proc.returncode, proc.stdout, proc.stderr)
    try:
        return sysbpf.obj_get(cfg.prog_pin)
    except OSError as exc:
        raise RedirectPinError(f"cannot open the pinned program {cfg.prog_pin}: {exc.strerror}") from exc


def _loader_error(src: Path, returncode: int, stdout: str, stderr: str) -> RedirectError:
    try:
        report = json.loads(stdout.strip().splitlines()[-1])
        stage, error = str(report["stage"]), str(report["error"])
    except (IndexError, ValueError, KeyError, TypeError):
        stage, error = "compile", f"the loader exited with status {returncode}"
    detail = _diagnostics(stderr)
    if stage == "import":
        return RedirectCompileError(f"BCC is not importable ({error}); run `make setup` (python3-bpfcc)\n{detail}")
    if stage == "load":
        return RedirectKernelError(
            f"the kernel rejected {PROGRAM_FUNCTION} from {src} (needs bpf_skc_lookup_tcp/bpf_sk_assign, "
            f"kernel >= 5.7): {error}\n{detail}"
        )
    if stage == "pin":
        return RedirectPinError(f"cannot pin the program from {src}: {error}\n{detail}")
    return RedirectCompileError(f"BCC failed to compile {src}: {error}\n{detail}")


def _diagnostics(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-40:]) if lines else "(no diagnostics)"
