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
RECHECK_BUDGET = 500  # decisions re-taken per loop turn after an update (~10-25 ms; 70 policies each: ~70 ms)


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
        # Workloads whose connections an update asked to re-check and the budget of its turn left for later.
        self._queue: dict[str, None] = {}
        self._scheduled: asyncio.Handle | None = None
        store.subscribe(self.on_change)

    def __len__(self) -> int:
        return len(self._conns)

    def tracked(self) -> list[TrackedConnection]:
        """The connections tracked now (a copy: /config_dump's workloadState reads it)."""
        return list(self._conns)

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
        are listed in the workload itself).

        At most :data:`RECHECK_BUDGET` decisions are taken in the update's loop turn; the workloads left are
        re-checked in the next turns, against the store as it is then (a mesh-wide policy with 10,000 tracked
        connections took 150-200 ms in one turn). ztunnel re-checks in each connection's own task, also after the
        update. Without a running loop (tools, tests) everything is re-checked at once."""
        if change.policies:
            uids = self._select(None, change)
        elif change.workloads:
            uids = self._select(change.workloads, change)
        else:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._recheck(uids, None)
            return
        self._queue.update(dict.fromkeys(uids))
        self._recheck_queued(loop)

    def _recheck_queued(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        queue = self._queue
        uids = list(queue)
        done = self._recheck(uids, RECHECK_BUDGET)
        for uid in uids[:done]:
            queue.pop(uid, None)
        if queue and self._scheduled is None:
            self._scheduled = (loop or asyncio.get_running_loop()).call_soon(self._recheck_queued)

    def reevaluate(
        self, workloads: Collection[str] | None = None, *, change: StoreChange | None = None
    ) -> list[TrackedConnection]:
        """Close the connections (to `workloads`, default all; with `change`, only those to a workload it names or
        whose policies it may have changed) current policy denies, all at once; returns them. Connections that
        present the same peer to the same workload share one decision."""
        cut: list[TrackedConnection] = []
        self._recheck(self._select(workloads, change), None, cut)
        return cut

    def _select(self, workloads: Collection[str] | None, change: StoreChange | None) -> list[str]:
        """The workloads whose connections `change` may concern, of `workloads` (default all)."""
        uids = list(self._by_workload) if workloads is None else [u for u in workloads if u in self._by_workload]
        if change is None:
            return uids
        out = []
        for uid in uids:
            current = self.store.workload_by_uid(uid)
            if current is not None:
                if _affected(change, uid, current):
                    out.append(uid)
            elif any(t.workload is None or _affected(change, uid, t.workload) for t in self._by_workload[uid]):
                out.append(uid)  # gone from the store: judged as the workload last seen
        return out

    def _recheck(self, uids: list[str], budget: int | None, cut: list[TrackedConnection] | None = None) -> int:
        """Re-check the connections to `uids` in order until `budget` decisions were taken (None: no limit);
        returns how many of `uids` were done."""
        decided: dict[tuple[Any, ...], rbac.Decision] = {}
        for done, uid in enumerate(uids):
            if budget is not None and len(decided) >= budget:
                return done
            current = self.store.workload_by_uid(uid)
            for t in list(self._by_workload.get(uid, ())):
                wl: Any
                if current is not None:
                    t.workload = wl = current
                else:
                    wl = t.workload
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
                if cut is not None:
                    cut.append(t)
                self.metrics.error(t.direction, "policy_late_rejection")
                log.info(
                    "closing connection no longer allowed",
                    extra=kv(connection=str(t.conn), workload=t.workload_uid, reason=decision.explain()),
                )
                for r in t.reports:
                    r.decision = decision
                t.close()
        return len(uids)

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
