"""Established connections whose policy the agent enforces, re-checked whenever policy or workloads change.

Istio closes an established connection as soon as a policy update no longer allows it
(`AuthorizationPolicyLateRejection`, ztunnel's PolicyWatcher): without this a DENY would only stop new
connections, and a long-lived one would keep the access it had. Tracked are connections whose destination
this agent authorizes: inbound HBONE, inbound plaintext and same-node ones.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from agent import rbac
from agent.accesslog import ConnectionReport
from agent.addressing import Address, format_address
from agent.metrics import Metrics
from agent.relay import SpliceRelay
from agent.sockets import abort, connect_upstream
from agent.state import StoreChange, WorkloadStore
from common.log import kv

log = logging.getLogger("agent.connections")

LATE_REJECTION = "AuthorizationPolicyLateRejection"


@dataclass(eq=False)
class TrackedConnection:
    conn: rbac.Connection
    workload_uid: str  # the destination workload whose policies apply
    direction: str
    close: Callable[[], object]  # cuts the connection (cancels the task relaying it)
    reports: list[ConnectionReport] = field(default_factory=list)
    rejected_by: rbac.Decision | None = field(default=None)
    # The workload as last seen: re-checks use it once it left the store, as ztunnel re-checks against the
    # workload the connection was opened to (its namespace and global policies still apply).
    workload: Any | None = None

    @property
    def late_rejection(self) -> str | None:
        """The error to log when this connection was cut by a policy change."""
        if self.rejected_by is None:
            return None
        return f"{LATE_REJECTION}: {self.rejected_by.explain()}"


class ConnectionRegistry:
    def __init__(self, store: WorkloadStore, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self._conns: set[TrackedConnection] = set()
        # By destination workload uid: a workload's update re-checks its own connections without a walk of all.
        self._by_workload: dict[str, set[TrackedConnection]] = {}
        store.subscribe(self.on_change)

    def __len__(self) -> int:
        return len(self._conns)

    def track(
        self,
        conn: rbac.Connection,
        workload_uid: str,
        direction: str,
        close: Callable[[], object],
        reports: list[ConnectionReport] | None = None,
    ) -> TrackedConnection:
        t = TrackedConnection(
            conn, workload_uid, direction, close, reports or [], workload=self.store.workload_by_uid(workload_uid)
        )
        self._conns.add(t)
        self._by_workload.setdefault(workload_uid, set()).add(t)
        return t

    def untrack(self, t: TrackedConnection) -> None:
        if t in self._conns:
            self._conns.discard(t)
            same = self._by_workload.get(t.workload_uid)
            if same is not None:
                same.discard(t)
                if not same:
                    del self._by_workload[t.workload_uid]

    def on_change(self, change: StoreChange) -> None:
        """Store subscriber. A policy change may change the decisions of connections to the workloads whose
        policies it touched (:meth:`StoreChange.policies_changed_for`: ztunnel's PolicyWatcher re-checks all, with
        the same outcome); a workload change only those of connections to that workload (its selector policies
        are listed in the workload itself)."""
        if change.policies:
            self.reevaluate(change=change)
        elif change.workloads:
            self.reevaluate(change.workloads)

    def reevaluate(
        self, workloads: Collection[str] | None = None, *, change: StoreChange | None = None
    ) -> list[TrackedConnection]:
        """Close the connections (to `workloads`, default all; with `change`, only those to a workload it names or
        whose policies it may have changed) current policy denies; returns them. Connections that present the same
        peer to the same workload share one decision."""
        uids = list(self._by_workload) if workloads is None else [u for u in workloads if u in self._by_workload]
        decided: dict[tuple[Any, ...], rbac.Decision] = {}
        cut = []
        for uid in uids:
            current = self.store.workload_by_uid(uid)
            if current is not None and not _affected(change, uid, current):
                continue
            for t in list(self._by_workload.get(uid, ())):
                wl: Any
                if current is not None:
                    t.workload = wl = current
                else:  # gone from the store: judged as the workload last seen
                    wl = t.workload
                    if wl is not None and not _affected(change, uid, wl):
                        continue
                conn = t.conn
                # Every field a policy may look at (the source port is none), and the workload object it is judged
                # against: the decision for one is the decision for all.
                key = (id(wl), conn.src_ip, conn.dst_ip, conn.dst_port, conn.src_identity)
                decision = decided.get(key)
                if decision is None:
                    policies = self.store.policies_for(wl) if wl is not None else []
                    decision = decided[key] = rbac.evaluate(policies, conn)
                if decision.allowed:
                    continue
                t.rejected_by = decision
                self.untrack(t)
                cut.append(t)
                self.metrics.error(t.direction, "policy_late_rejection")
                log.info(
                    "closing connection no longer allowed",
                    extra=kv(connection=str(t.conn), workload=t.workload_uid, reason=decision.explain()),
                )
                for r in t.reports:
                    r.decision = decision
                t.close()
        return cut

    async def splice_authorized(
        self,
        sock: socket.socket,
        conn: rbac.Connection,
        workload: Any,
        target: Address,
        reports: list[ConnectionReport],
        direction: str,
        *,
        keep_source: bool,
        connect_timeout: float = 5.0,
    ) -> None:
        """Authorize `conn` against `workload`'s policies, connect to `target`, splice, and track it so a
        policy change can cut it.

        Shared by the same-node fast path and inbound plaintext (15006): the same decision, tracking and
        reporting; only the identity differs (the source workload's own, or none). `reports` are finished
        with the outcome (one per reporter).
        """
        decision = rbac.evaluate(self.store.policies_for(workload), conn)
        for r in reports:
            r.decision = decision
            r.opened()
        for note in decision.dry_run:
            log.info("dry-run policy", extra=kv(connection=str(conn), result=note))
        if not decision.allowed:
            self.metrics.error(direction, "policy_denied")
            for r in reports:
                r.finish(error=decision.explain(), flags="DENY")
            abort(sock)
            return
        # Tracked from the decision on, as ztunnel registers before its first check: a policy change that lands
        # while the pod is still being connected must cut this connection too.
        task = asyncio.current_task()
        assert task is not None
        tracked = self.track(conn, workload.uid, direction, task.cancel, reports)
        splice: SpliceRelay | None = None
        error: str | None = None
        flags = "-"
        try:
            try:
                upstream = await connect_upstream(
                    target, source_ip=conn.src_ip if keep_source else None, connect_timeout=connect_timeout
                )
            except (OSError, TimeoutError) as e:
                self.metrics.error(direction, "connect_failed")
                error, flags = f"connect {format_address(target)}: {e}", "CONNECT"
                abort(sock)
                return
            splice = relaying = SpliceRelay(sock, upstream)
            for r in reports:
                r.relaying(lambda: (relaying.bytes_up, relaying.bytes_down))
            error = (await splice.run()).failure
            flags = "CONNECT" if error else "-"  # a copy error: ztunnel's SendError/ReceiveError, CONNECT
        except asyncio.CancelledError:
            error = tracked.late_rejection or "cancelled"
            if splice is None:
                abort(sock)  # cut before the relay owned it
            if tracked.late_rejection is None:
                raise
        finally:
            self.untrack(tracked)
            if tracked.late_rejection:
                flags = "DENY"
            up, down = (splice.bytes_up, splice.bytes_down) if splice is not None else (0, 0)
            for r in reports:
                r.finish(up, down, error=error, flags=flags)

    def snapshot(self) -> list[dict[str, Any]]:
        return [{"connection": str(t.conn), "workload": t.workload_uid, "direction": t.direction} for t in self._conns]


def _affected(change: StoreChange | None, uid: str, workload: Any) -> bool:
    """Whether `change` (None: any) may change the decisions on connections to `workload`."""
    return change is None or uid in change.workloads or change.policies_changed_for(workload)
