"""One record per proxied connection: the Istio metrics it moves and the JSON access-log line it ends with.

Created as soon as the agent knows who is talking to whom, so connections denied or failed before any byte
moved are still counted (opened, then closed with a response flag) and logged, as ztunnel does. Field names
follow ztunnel's access log (`src.addr`, `dst.workload`, ...), plus the policy decision that let the
connection through or stopped it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from agent.metrics import Metrics, Progress, ProtoValues, traffic_label_values
from agent.rbac import Decision
from common.log import direct_handler, kv
from common.spiffe import Identity

ACCESS_LOGGER = "access"

Address = tuple[str, int]


def _addr(addr: Address | None) -> str | None:
    if addr is None:
        return None
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _compute_log_values(wl: Any) -> tuple[str | None, str | None, str | None]:
    """name, namespace, cluster as ztunnel logs them: the pod's name (else the canonical service; the metrics keep
    the workload's name); a value it does not know is left out."""
    return (wl.name or wl.canonical_name or None, wl.namespace or None, wl.cluster_id or None)


_log_values = ProtoValues(_compute_log_values)
_UNNAMED: tuple[None, None, None] = (None, None, None)


@dataclass(eq=False)
class ConnectionReport:
    """Mutable while the connection is set up (fields get filled in as they are learned), final at `finish`."""

    log: AccessLog
    direction: str  # "outbound" (reporter source) or "inbound" (reporter destination)
    src_addr: tuple[str, int]
    dst_addr: tuple[str, int]
    src: Any | None = None  # Workload proto
    dst: Any | None = None  # Workload proto
    service: Any | None = None  # Service proto
    src_identity: Identity | None = None
    dst_identity: Identity | None = None
    mtls: bool = False
    hbone_addr: tuple[str, int] | None = None
    path: str = "direct"  # "hbone", "passthrough", "same_node", "plaintext"
    decision: Decision | None = None
    start: float = field(default_factory=time.monotonic)
    _opened_labels: tuple[str, ...] | None = None
    _progress: Progress | None = None
    _finished: bool = False

    @property
    def reporter(self) -> str:
        return "source" if self.direction == "outbound" else "destination"

    def labels(self) -> tuple[str, ...]:
        """The connection's traffic labels (response_flags "-"), as metrics.traffic_label_values orders them."""
        return traffic_label_values(
            reporter=self.reporter,
            src=self.src,
            dst=self.dst,
            service=self.service,
            src_identity=self.src_identity,
            dst_identity=self.dst_identity,
            mtls=self.mtls,
        )

    def opened(self) -> None:
        """Count the connection as opened; call once the source and destination are known (they are not
        re-read at close: opened and closed count the same series)."""
        if self._opened_labels is None:
            self._opened_labels = self.labels()
            self.log.metrics.connection_opened(self._opened_labels)

    def relaying(self, progress: Progress) -> None:
        """The relay's live counts (client->server, server->client), read at every scrape until `finish`, so
        the byte counters move while the connection lasts, as ztunnel's do."""
        self.opened()
        assert self._opened_labels is not None
        self._progress = progress
        self.log.metrics.relaying(self, self._opened_labels, progress)

    def finish(self, bytes_up: int = 0, bytes_down: int = 0, *, error: str | None = None, flags: str = "-") -> None:
        """Close the record: count it closed with the final response flag, its bytes, and write the access-log line.

        bytes_up is client->server, bytes_down server->client; a relaying record counts at least what its relay
        reported (a connection cut mid-relay may be finished without counts). Idempotent: the first call wins.
        """
        if self._finished:
            return
        self._finished = True
        self.opened()
        labels = self._opened_labels
        assert labels is not None
        if self._progress is not None:
            self.log.metrics.relay_ended(self)
            up, down = self._progress()
            bytes_up, bytes_down = max(bytes_up, up), max(bytes_down, down)
        self.log.metrics.connection_closed(labels, bytes_up, bytes_down, flags)
        self.log.write(self, bytes_up, bytes_down, error, flags)


class AccessLog:
    def __init__(self, metrics: Metrics, logger: logging.Logger | None = None) -> None:
        self.metrics = metrics
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    def start(
        self, direction: str, src_addr: tuple[str, int], dst_addr: tuple[str, int], **fields: Any
    ) -> ConnectionReport:
        return ConnectionReport(self, direction, src_addr, dst_addr, **fields)

    def refused(self, direction: str, src_addr: Address | None, dst_addr: Address, reason: str, **detail: Any) -> None:
        """A connection turned away before source and destination were known (ztunnel's early failure): counted
        by reason and logged, without Istio traffic metrics."""
        self.metrics.error(direction, reason)
        fields = {"src.addr": _addr(src_addr), "dst.addr": _addr(dst_addr), "direction": direction, "error": reason}
        self.logger.warning("connection failed", extra=kv(**{k: v for k, v in fields.items() if v}, **detail))

    def write(self, r: ConnectionReport, bytes_up: int, bytes_down: int, error: str | None, flags: str) -> None:
        """ztunnel's access_log!: "connection complete", INFO, or ERROR with `error` when the connection failed
        ("connection failed" is only the early refusal's line, as log_early_deny's)."""
        level = logging.ERROR if error else logging.INFO
        logger = self.logger
        if not logger.isEnabledFor(level):
            return

        # As ztunnel logs them: what the reporting side's workload sent and received, so an inbound line's
        # bytes_sent is the pod's response (the metrics keep request/response for both reporters).
        sent, received = (bytes_up, bytes_down) if r.direction == "outbound" else (bytes_down, bytes_up)

        s_name, s_ns, s_cluster = _UNNAMED if r.src is None else _log_values(r.src)
        d_name, d_ns, d_cluster = _UNNAMED if r.dst is None else _log_values(r.dst)
        fields: dict[str, Any] = {
            "src.addr": _addr(r.src_addr),
            "src.workload": s_name,
            "src.namespace": s_ns,
            # identities only for mutual TLS, as ztunnel logs them (the metrics keep the destination's for plaintext)
            "src.identity": str(r.src_identity) if r.src_identity and r.mtls else None,
            "src.cluster": s_cluster,
            "dst.addr": _addr(r.dst_addr),
            "dst.hbone_addr": _addr(r.hbone_addr),
            "dst.service": r.service.hostname if r.service is not None else None,
            "dst.workload": d_name,
            "dst.namespace": d_ns,
            "dst.identity": str(r.dst_identity) if r.dst_identity and r.mtls else None,
            "dst.cluster": d_cluster,
            "direction": r.direction,
            "path": r.path,
            "security": "mutual_tls" if r.mtls else "plaintext",
            "bytes_sent": sent,
            "bytes_recv": received,
            "duration": f"{int((time.monotonic() - r.start) * 1000)}ms",
            "response_flags": flags,
        }
        if r.decision is not None:
            fields["policy.decision"] = "allow" if r.decision.allowed else "deny"
            fields["policy.reason"] = r.decision.outcome.value
            if r.decision.policy:
                fields["policy.name"] = r.decision.policy
            if r.decision.dry_run:
                fields["policy.dry_run"] = list(r.decision.dry_run)
        if error:
            fields["error"] = error
        clean = {k: v for k, v in fields.items() if v is not None}
        msg = "connection complete"
        # One line per connection: straight to the JSON handler when that is where it would end up anyway (no
        # LogRecord, no handler chain); otherwise a record made directly, skipping Logger._log's caller lookup (a
        # stack walk per record whose file and line an access log does not use).
        direct = direct_handler(logger, level)
        if direct is not None:
            direct.write_fields("error" if error else "info", logger.name, msg, clean)
        else:
            logger.handle(logger.makeRecord(logger.name, level, "", 0, msg, (), None, extra={"fields": clean}))
