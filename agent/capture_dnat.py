"""Capture of connections the node DNATs to an enrolled local pod (Service VIPs, NodePorts, hostPorts).

The tc program sees a packet before netfilter's PREROUTING, so a connection addressed to a Service VIP or a
NodePort is not yet addressed to the pod kube-proxy will pick: nothing enrolled is in it, the program lets it pass,
kube-proxy rewrites it, and it reached an enrolled pod uncaptured: plaintext past STRICT and past every
AuthorizationPolicy. (Istio redirects inside the pod, after the node's NAT, so every inbound connection meets
ztunnel there.) This adds the missing step after the rewrite, in the node netns, with nftables: a chain at
priority dstnat+1 hands the SYN of a DNATed connection now addressed to an enrolled local pod to the inbound
listener (TPROXY, the listener sees the pod's address as the original destination), with the capture mark that
policy routing delivers locally, as the tc program does. Replies leave through the same conntrack entry and are
rewritten back to the VIP, so the client sees the address it dialled. A connection now addressed to the pod's port
15008 (a Service whose targetPort is 15008, an east-west gateway forwarding HBONE) goes to the HBONE listener, as the
tc program sends podIP:15008 arriving at an uplink or a bridge (in Istio, 15008 inside the pod is ztunnel's whoever
calls): the plaintext listener would relay the client's TLS to a pod port where nothing listens. With no listener
(the agent restarting) the SYN is dropped: fail closed, as the tc program; with fail-open (debugging only) it goes on
to the pod uncaptured, as the tc program lets it, and is counted either way.

The same rewrite hides an enrolled client's connection from the tc program after its SYN: the SYN was assigned to
the outbound listener at the pod's veth, but later packets are looked up there by the VIP, find no socket, and
after the rewrite would be routed to the endpoint (which resets them). So a DNATed connection whose SYN was
captured, by the tc program or here, keeps the capture mark in its conntrack entry, and its later packets get it
back: delivered locally, they meet their socket by the kernel's own lookup. Connections established before
capture began have no mark and are left alone. A connection whose conntrack entry went (expired while idle:
kube-proxy sets 24 h; flushed) is picked up again mid-stream without the mark; its packets are matched by their
socket instead (``socket transparent``), an established one only: nftables' socket lookup also finds the agent's
wildcard listeners, and through them a DNAT to any address's port 15001 or 15008 would reach the outbound or HBONE
listener (a non-mesh pod's connection tunnelled in mTLS under its own identity). The conntrack mark uses the same
bits as the packet mark (outside them nothing is changed), which nothing else on the node may use either.

The table also brings back the replies of the agent's own connections from a pod's address (HBONE, passthrough,
the same-node path: the agent connects from the client pod's address, as ztunnel's sockets inside the pod do).
The tc program hands those replies to the agent's socket by their tuple, which NAT may have changed: a masqueraded
egress is answered to the node's address (conntrack turns it back into the pod's in prerouting, and routing would
then forward it to the pod), a destination the node DNATs in OUTPUT answers from its real address. So a connection
the node's OUTPUT sees leaving from an enrolled address is marked in conntrack, and its replies get the capture mark
after de-NAT. What the node delivers to the agent instead of forwarding to a pod is dropped at TTL (hop limit) 1,
as forwarding would: an answer meant to stay one hop away (EC2's IMDSv2) reaches no pod through the agent.

Otherwise only DNATed connections (``ct status dnat``) are touched: pod-to-pod and node-to-pod traffic is the tc
program's (or, for the node's own processes, not captured: OUTPUT, as in Istio ambient). The table is replaced
whole and atomically (one ``nft -f`` transaction) when the enrolled addresses change or someone else changed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from common.log import kv

log = logging.getLogger(__name__)

NFT_TIMEOUT = 10.0


IPVS_DEVICE = "kube-ipvs0"
"""The dummy interface kube-proxy's IPVS mode binds every Service address to: that mode rewrites connections in
LOCAL_IN and sends them straight out, past this table's prerouting chain."""


def uncovered_rewrites(link_names: Iterable[str]) -> str | None:
    """Why connections the node rewrites to enrolled pods may escape capture here, judged by its interfaces; None
    when nothing says so."""
    if IPVS_DEVICE in set(link_names):
        return (
            f"{IPVS_DEVICE} exists: kube-proxy runs in IPVS mode, whose rewrites of Service and NodePort connections "
            "to this node's enrolled pods happen after the capture table's hook, so plaintext through them is not "
            "captured (use kube-proxy's iptables or nftables mode)"
        )
    return None


class DnatCaptureError(Exception):
    """nft is missing or refused the table (no nf_tables, tproxy, socket or conntrack support in the kernel)."""


def table_name(instance: str) -> str:
    """nft takes an instance name as it is (letters, digits, ``_.-``) after a leading letter: mapping ``.`` and
    ``-`` to ``_`` would give instances ``a-b`` and ``a_b`` one table, each agent replacing the other's set."""
    return "ambit_" + instance


NO_LISTENER_ACTIONS = {"drop": "drop", "accept": "pass"}  # the verdict of a no-listener rule -> the metric's label
NO_LISTENER_FAMILIES = {"ip": "ipv4", "ip6": "ipv6"}


class NoListenerCounts:
    """The packets the table's no-listener rules counted (SYNs that found no agent listener: dropped, or passed with
    fail-open), by (family, action), kept monotonic although each rewrite of the table starts its counters at 0.

    nf_tables gives every new table a larger handle than the netns's tables before it, so a listing with a larger
    handle is a rewrite: what the previous table counted is kept, as last read. The agent reads the counters before
    it rewrites or removes the table, so only what a table counted after that read is lost, and a listing of an
    older table arriving late is ignored; it reads them right after it wrote a table too, so the series are there,
    at 0, from then on. Fed from the blocking-work thread (syncs) and from the event loop (the
    poller): a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handle = -1
        self._current: dict[tuple[str, str], int] = {}
        self._before: dict[tuple[str, str], int] = {}

    def observe(self, listing: str) -> None:
        """Take in ``nft -j list table inet <table>``'s output; raises ValueError when it is not such a listing."""
        handle, counts = parse_no_listener_counts(listing)
        with self._lock:
            if handle > self._handle:
                for key, value in self._current.items():
                    self._before[key] = self._before.get(key, 0) + value
                self._handle, self._current = handle, {}
            elif handle < self._handle:
                return
            for key, value in counts.items():
                self._current[key] = max(self._current.get(key, 0), value)

    def totals(self) -> dict[tuple[str, str], int]:
        with self._lock:
            keys = self._before.keys() | self._current.keys()
            return {key: self._before.get(key, 0) + self._current.get(key, 0) for key in sorted(keys)}


def parse_no_listener_counts(listing: str) -> tuple[int, dict[tuple[str, str], int]]:
    """The table's handle and its no-listener rules' packet counts by (family, action), from nft's JSON listing of
    one table. Raises ValueError when it is not such a listing."""
    try:
        handle = None
        counts: dict[tuple[str, str], int] = {}
        for obj in json.loads(listing)["nftables"]:
            if "table" in obj:
                handle = int(obj["table"]["handle"])
            elif "rule" in obj:
                rule = _no_listener_rule(obj["rule"]["expr"])
                if rule is not None:
                    key, packets = rule
                    counts[key] = counts.get(key, 0) + packets
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not an nft JSON listing of a table: {exc!r}") from exc
    if handle is None:
        raise ValueError("not an nft JSON listing of a table: no table in it")
    return handle, counts


def _no_listener_rule(exprs: list[dict[str, Any]]) -> tuple[tuple[str, str], int] | None:
    """((family, action), packets) when these are a no-listener rule's expressions: a daddr match, a counter and
    a verdict."""
    packets, action, family = None, None, None
    for expr in exprs:
        if "counter" in expr:
            packets = int(expr["counter"]["packets"])
        for verdict, label in NO_LISTENER_ACTIONS.items():
            if verdict in expr:
                action = label
        left = expr.get("match", {}).get("left")
        if isinstance(left, dict) and left.get("payload", {}).get("field") == "daddr":
            family = NO_LISTENER_FAMILIES.get(left["payload"].get("protocol"))
    if packets is None or action is None or family is None:
        return None
    return (family, action), packets


def nft_argv(nft: str, args: Sequence[str], netns: str | None = None) -> list[str]:
    """nft's command line with ``args``, run in the network namespace at path ``netns`` when one is given."""
    if netns is None:
        return [nft, *args]
    # nsenter (util-linux) enters the netns for nft alone: no setns in the agent's own threads
    return ["nsenter", f"--net={netns}", nft, *args]


class CounterRead:
    """One read of table ``inet <table>``'s no-listener counters into ``counts``: ``nft -j list table`` and what its
    outcome means, the same whichever way it runs: :meth:`blocking` (DnatCapture, in the reconcile's worker thread,
    around its writes) or :meth:`run` (DnatCounterCollector's poller, an asyncio subprocess the event loop never
    waits on). Both return None when the counts are as nft has them, else why not. No table (nothing enrolled on
    the node, or capture not started yet) is nothing to read, not an error. ``netns`` is the path of the network
    namespace to read in (``/proc/self/fd/N`` with N in ``pass_fds`` for a namespace held open); by default the
    caller's."""

    def __init__(
        self,
        table: str,
        counts: NoListenerCounts,
        *,
        nft: str = "nft",
        netns: str | None = None,
        pass_fds: tuple[int, ...] = (),
        timeout: float = NFT_TIMEOUT,
    ) -> None:
        self.counts = counts
        self.argv = nft_argv(nft, ("-j", "list", "table", "inet", table), netns)
        self.pass_fds = pass_fds
        self.timeout = timeout

    @staticmethod
    def _env() -> dict[str, str]:
        return {**os.environ, "LC_ALL": "C"}  # nft's errors in English: a missing table is told by its text

    def blocking(self) -> str | None:
        try:
            done = subprocess.run(
                self.argv,
                capture_output=True,
                timeout=self.timeout,
                check=False,
                pass_fds=self.pass_fds,
                env=self._env(),
            )
        except subprocess.TimeoutExpired:  # run() killed and reaped it
            return self._timed_out()
        except OSError as exc:
            return f"cannot run nft: {exc}"
        return self.take(done.returncode, done.stdout, done.stderr)

    async def run(self) -> str | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=self.pass_fds,
                env=self._env(),
            )
        except OSError as exc:
            return f"cannot run nft: {exc}"
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):  # it exited (and was reaped) as the timeout fired
                proc.kill()
            await proc.wait()
            return self._timed_out()
        assert proc.returncode is not None  # communicate() waited for it
        return self.take(proc.returncode, out, err)

    def _timed_out(self) -> str:
        return f"nft took more than {self.timeout} s"

    def take(self, returncode: int, out: bytes, err: bytes) -> str | None:
        """Fold a finished ``nft -j list table``'s output into :attr:`counts`; why not, when it cannot be."""
        if returncode != 0:
            if b"No such file or directory" in err:
                return None
            return err.decode(errors="replace").strip()[-300:] or f"nft exited with {returncode}"
        try:
            self.counts.observe(out.decode(errors="replace"))
        except ValueError as exc:
            return str(exc)
        return None


_COUNTS: dict[str, NoListenerCounts] = {}
_COUNTS_LOCK = threading.Lock()


def no_listener_counts(table: str) -> NoListenerCounts:
    """The counts of this process's table ``inet <table>``: one object for the DnatCapture that writes the table and
    the poller that exports them, which the agent builds apart (the Redirector owns the former)."""
    with _COUNTS_LOCK:
        return _COUNTS.setdefault(table, NoListenerCounts())


_FAMILIES = (("ip", "enrolled4"), ("ip6", "enrolled6"))  # nft's family keyword and the set of its addresses


def ruleset(
    table: str,
    addresses: Iterable[str],
    *,
    port: int,
    hbone_port: int,
    mark: int,
    mark_mask: int,
    fail_open: bool = False,
) -> str:
    """The whole table, replacing any previous one in the same transaction. ``port`` is the plaintext inbound
    listener's, ``hbone_port`` the HBONE listener's (and the pod port that goes to it)."""
    v4 = sorted(a for a in addresses if ipaddress.ip_address(a).version == 4)
    v6 = sorted(a for a in addresses if ipaddress.ip_address(a).version == 6)
    keep = 0xFFFFFFFF & ~mark_mask
    set_mark = f"meta mark set meta mark & {keep:#x} | {mark:#x}"
    marked = f"meta mark & {mark_mask:#x} == {mark:#x}"
    unmarked = f"meta mark & {mark_mask:#x} != {mark:#x}"
    remember = f"ct mark set ct mark & {keep:#x} | {mark:#x}"
    syn = "tcp flags & (syn | ack) == syn"
    lines = [
        f"table inet {table} {{}}",
        f"delete table inet {table}",
        f"table inet {table} {{",
    ]
    for name, kind, items in (("enrolled4", "ipv4_addr", v4), ("enrolled6", "ipv6_addr", v6)):
        elements = f" elements = {{ {', '.join(items)} }};" if items else ""
        lines.append(f"  set {name} {{ type {kind};{elements} }}")
    lines += [
        # A connection the agent makes from an enrolled pod's address is remembered as the agent's (see the module
        # docstring). No other process of the node sends from a pod's address.
        "  chain output {",
        "    type filter hook output priority filter; policy accept;",
        *(f"    ct state new {family} saddr @{field} {remember}" for family, field in _FAMILIES),
        "  }",
        "  chain prerouting {",
        "    type filter hook prerouting priority dstnat + 1; policy accept;",
        # a reply of one of those, after de-NAT: delivered locally, to the agent's socket
        f"    ct direction reply ct mark & {mark_mask:#x} == {mark:#x} {set_mark}",
        # What the node delivers to the agent instead of forwarding to a pod meets forwarding's hop limit: an
        # answer sent with TTL 1 (EC2's IMDSv2 keeps its tokens from pods so) reaches no pod through the agent.
        *(
            f"    {marked} {family} daddr @{field} {ttl} <= 1 drop"  # no counter: not a no-listener drop
            for (family, field), ttl in zip(_FAMILIES, ("ip ttl", "ip6 hoplimit"), strict=True)
        ),
        # a later packet of a captured connection (a SYN goes on, to be captured again if its socket is gone)
        f"    ct status dnat ct direction original ct mark & {mark_mask:#x} == {mark:#x} tcp flags & syn == 0"
        f" {set_mark} accept",
        # one whose conntrack entry was lost (expired while idle, flushed) and picked up again mid-stream: its
        # socket, an established one of the agent's (a wildcard one is a listener: never matched); looked up for
        # the entry's first packet only (state new), not for every packet the node forwards for a DNAT
        f"    ct status dnat ct state new ct direction original tcp flags & syn == 0"
        " socket transparent 1 socket wildcard 0"
        f" {set_mark} {remember} accept",
        # a SYN the tc program captured (an enrolled client's, to the outbound listener) before the rewrite
        f"    ct status dnat {syn} {marked} {remember} accept",
    ]
    no_listener = "accept" if fail_open else "drop"
    for family, field in _FAMILIES:
        match = f"ct status dnat {family} daddr @{field} {syn} {unmarked}"
        lines += [
            # tproxy does not end the rule's evaluation when it found the listener (accept does); when it found
            # none, the rule stops there, before the mark (a mark set ahead of it stayed, the next rule skipped
            # the SYN as captured and policy routing delivered it locally to no socket), and evaluation goes on.
            # The plaintext rule leaves the HBONE port alone, so a SYN for it whose listener is missing is not
            # taken by the plaintext listener: it reaches the last rule, which drops and counts it (fail-open:
            # counts it and lets it go on to the pod)
            f"    {match} tcp dport {hbone_port} tproxy {family} to :{hbone_port} {set_mark} {remember} accept",
            f"    {match} tcp dport != {hbone_port} tproxy {family} to :{port} {set_mark} {remember} accept",
            f"    {match} counter {no_listener}",
        ]
    lines += ["  }", "}", ""]
    return "\n".join(lines)


class DnatCapture:
    """The nftables table of one agent instance: in the netns bound by :meth:`bind_netns`, else in the calling
    thread's."""

    def __init__(
        self,
        instance: str,
        *,
        port: int,
        hbone_port: int,
        mark: int,
        mark_mask: int,
        fail_open: bool = False,
        nft: str = "nft",
    ) -> None:
        self.table = table_name(instance)
        self.port = port
        self.hbone_port = hbone_port
        self.mark = mark
        self.mark_mask = mark_mask
        self.fail_open = fail_open  # takes effect at the next sync
        self.nft = nft
        self._netns: int | None = None  # fd of the bound netns
        self._applied: frozenset[str] | None = None
        self._script = ""  # the table as we last wrote it ("" when we wrote none since start or removal)
        self._listed = ""  # the table as nft listed it after our last write
        self.counts = no_listener_counts(self.table)
        self._counts_failing = False  # the last read of the counters failed (logged once until one works)

    def bind_netns(self) -> None:
        """Keep the table in the calling thread's netns from now on, whichever thread syncs: a Redirector binds its
        netlink socket at start, in the node netns, and reconciles from any thread (a worker of the agent's, or a
        test's, which is not in the node netns)."""
        self.close()
        self._netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        """Let go of the bound netns (the table stays, as the tc filters do)."""
        if self._netns is not None:
            os.close(self._netns)
            self._netns = None

    def sync(self, addresses: Iterable[str]) -> None:
        """Capture DNATed connections to exactly ``addresses`` (the enrolled local pods), as :attr:`fail_open` says.

        The table is written again when the addresses or fail-open changed or when it is no longer as written: a
        firewall reload (``flush ruleset`` heads Debian's /etc/nftables.conf) or a hand edit would otherwise leave
        DNATed connections uncaptured, kube-proxy having put its own rules back, until the enrolled set next changed.
        Unchanged, a sync costs one read. Raises DnatCaptureError when nft cannot write the table; the next sync
        tries again."""
        want = frozenset(addresses)
        if not want:
            # Nothing enrolled here: nothing to capture, and a table's `ct` expressions would turn conntrack on in
            # a netns that may not use it yet (a cost on every packet of the node's traffic).
            if self._applied != want:
                self.remove()
                self._applied, self._script, self._listed = want, "", ""
            return
        script = ruleset(
            self.table,
            want,
            port=self.port,
            hbone_port=self.hbone_port,
            mark=self.mark,
            mark_mask=self.mark_mask,
            fail_open=self.fail_open,
        )
        if script == self._script and self._listing() == self._listed:
            return
        if script == self._script:
            log.warning(
                "DNAT capture table was changed or removed by someone else; writing it again",
                extra=kv(table=self.table),
            )
        self._read_counts()  # a rewrite starts the counters at 0
        self._run(script)
        # The new table's counters, at 0: their series are exported from now on, not a poll interval later, and
        # the first SYN dropped is an increase a query sees (a series that appears at 1 has no increase to show).
        self._read_counts()
        if not self._script:
            log.info(
                "DNAT capture installed", extra=kv(table=self.table, addresses=len(want), fail_open=self.fail_open)
            )
        self._applied, self._script = want, script
        self._listed = self._listing()

    def remove(self) -> bool:
        """Delete the table; False when there was none (or no nft to ask)."""
        self._applied, self._script = None, ""
        if shutil.which(self.nft) is None or not self._listing():
            return False
        self._read_counts()
        try:
            self._run(f"delete table inet {self.table}\n")
        except DnatCaptureError as exc:  # the rest of a cleanup still runs
            log.warning("cannot remove the DNAT capture table", extra=kv(table=self.table, error=str(exc)))
            return False
        return True

    def _listing(self) -> str:
        """The table as nft lists it now, without the counters; empty when it does not exist (or nft cannot be
        run)."""
        try:
            done = subprocess.run(
                self._command("--stateless", "list", "table", "inet", self.table),
                capture_output=True,
                text=True,
                timeout=NFT_TIMEOUT,
                check=False,
                pass_fds=self._fds(),
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout if done.returncode == 0 else ""

    def _read_counts(self) -> None:
        """Fold the no-listener counters of the table there is now (if any) into :attr:`counts`, in this thread."""
        read = CounterRead(self.table, self.counts, nft=self.nft, netns=self._netns_path(), pass_fds=self._fds())
        error = read.blocking()
        if error is not None and not self._counts_failing:  # an nft without JSON fails them all: say it once
            log.warning("cannot read the DNAT capture table's counters", extra=kv(table=self.table, error=error))
        self._counts_failing = error is not None

    def _run(self, script: str) -> None:
        try:
            done = subprocess.run(
                self._command("-f", "-"),
                input=script,
                capture_output=True,
                text=True,
                timeout=NFT_TIMEOUT,
                check=False,
                pass_fds=self._fds(),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DnatCaptureError(f"cannot run {self.nft}: {exc}") from exc
        if done.returncode != 0:
            raise DnatCaptureError(f"nft refused table inet {self.table}: {done.stderr.strip()[-400:]}")

    def _command(self, *args: str) -> list[str]:
        return nft_argv(self.nft, args, self._netns_path())

    def _netns_path(self) -> str | None:
        """The bound netns as nsenter opens it: by the fd the child inherits (:meth:`_fds`)."""
        return None if self._netns is None else f"/proc/self/fd/{self._netns}"

    def _fds(self) -> tuple[int, ...]:
        return () if self._netns is None else (self._netns,)
