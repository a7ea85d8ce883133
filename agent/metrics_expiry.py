"""Series of workloads and services the agent no longer knows are dropped from /metrics once they stopped changing.

Istio's traffic series carry both ends' workload names and the destination service's, so every workload a node
ever served, and every service it was called by, adds series that outlive it: with pods coming and going a scrape
grows without bound until it passes Prometheus' body size limit (istio/ztunnel#1719, open: ztunnel never evicts;
its src/proxy/metrics.rs keeps prometheus_client Families, from which nothing is removed, by workload or service).
Envoy sidecars can: Istio's stats filter removed unused metrics after a rotation interval (off by default;
`graceful_deletion_interval` 5 min, istio/istio release notes 1.18), and since 1.28 Envoy's per-stat eviction
(`sidecar.istio.io/statsEvictionInterval`, off by default) does, for any series unused for the interval. This
removes fewer: a series only goes once a workload it names (source or destination, by workload name and namespace,
as its labels carry them) or its destination service (by destination_service, _namespace and _name: a Service
deleted or renamed while its pods live on, a ServiceEntry removed) is gone from the agent's state, no connection
with its labels is open, and its value has not changed for `interval`. A live workload's or service's series are
never touched, so its counters stay monotonic; a deleted one's final value was scraped long before (any scrape
interval under `interval`), and if it comes back its series starts again at 0, which `rate()` reads as a counter
reset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from agent.metrics import TRAFFIC_LABELS, UNKNOWN, Metrics, service_label_values, workload_key
from agent.prometheus import MetricFamily, counter_family
from common.log import kv

log = logging.getLogger(__name__)

SERIES_EXPIRY = 300.0
ROWS_PER_TURN = 1000  # series looked at between two hand-backs of the event loop

Key = tuple[str, ...]
WorkloadKey = tuple[str, str]  # (workload name, namespace), as the series' labels carry them
ServiceKey = tuple[str, str, str]  # (hostname, namespace, name), as the series' labels carry them

_SOURCE = (TRAFFIC_LABELS.index("source_workload"), TRAFFIC_LABELS.index("source_workload_namespace"))
_DESTINATION = (TRAFFIC_LABELS.index("destination_workload"), TRAFFIC_LABELS.index("destination_workload_namespace"))
_SERVICE = tuple(
    TRAFFIC_LABELS.index(name)
    for name in ("destination_service", "destination_service_namespace", "destination_service_name")
)


@dataclass(frozen=True)
class _Table:
    """One family's series: their label values -> a value that changes whenever the series does."""

    name: str
    rows: MutableMapping[Key, Any]
    workloads: tuple[tuple[int, int], ...]  # positions of (workload, namespace) label values in a key
    value: Callable[[Any], float]
    service: tuple[int, ...] = ()  # positions of (hostname, namespace, name) label values in a key, if any


class SeriesExpiry:
    """Sweeps ``metrics``' workload series every ``interval / 2``; ``workloads()`` gives every Workload in the agent's
    state, ``services()`` every Service (without it, series are expired by their workloads only). A series goes
    between ``interval`` and 1.5 ``interval`` after its last change."""

    def __init__(
        self,
        metrics: Metrics,
        workloads: Callable[[], Iterable[Any]],
        interval: float = SERIES_EXPIRY,
        clock: Callable[[], float] = time.monotonic,
        services: Callable[[], Iterable[Any]] | None = None,
    ) -> None:
        self.metrics = metrics
        self.workloads = workloads
        self.services = services
        self.interval = interval
        self.clock = clock
        self.expired = 0
        # (table name, key) -> (the value seen, when it was first seen at it): the series of gone workloads only
        self._idle: dict[tuple[str, Key], tuple[float, float]] = {}

    def _tables(self) -> list[_Table]:
        t = self.metrics.traffic
        counters = [
            _Table(name, rows, (_SOURCE, _DESTINATION), float, _SERVICE if self.services is not None else ())
            for name, rows in (
                ("opened", t.opened),
                ("closed", t.closed),
                ("received", t.received),
                ("sent", t.sent),
                ("failed", t.failed),
            )
        ]
        # istio_on_demand_dns: the source's workload and namespace lead its labels (ztunnel's OnDemandDnsLabels)
        dns = _Table("on_demand_dns", self.metrics.on_demand_dns.children, ((0, 3),), lambda child: child.value)
        return [*counters, dns]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval / 2)
            await self.sweep()

    async def sweep(self) -> int:
        """One pass over every workload series; returns how many were removed."""
        known: set[WorkloadKey] = set()
        for i, wl in enumerate(self.workloads()):
            if i and i % ROWS_PER_TURN == 0:
                await asyncio.sleep(0)
            known.add(workload_key(wl))
        if not known:
            # An agent that knows no workload (started without saved state, before its first configuration) would
            # find every workload and service gone.
            return 0
        services: set[ServiceKey] = set()
        for i, svc in enumerate(self.services() if self.services is not None else ()):
            if i and i % ROWS_PER_TURN == 0:
                await asyncio.sleep(0)
            services.add(service_label_values(svc))
        now, removed, seen = self.clock(), 0, set()
        for table in self._tables():
            keys = list(table.rows)
            for start in range(0, len(keys), ROWS_PER_TURN):
                if start:
                    await asyncio.sleep(0)
                live = None
                for key in keys[start : start + ROWS_PER_TURN]:
                    row = table.rows.get(key)
                    if row is None or not _names_gone(key, table, known, services):
                        continue
                    ident, value = (table.name, key), table.value(row)
                    seen.add(ident)
                    idle = self._idle.get(ident)
                    if idle is None or idle[0] != value:
                        self._idle[ident] = (value, now)
                        continue
                    if now - idle[1] < self.interval:
                        continue
                    if live is None:  # the labels of connections relaying now (bytes still to come)
                        live = {labels for labels, _ in self.metrics.traffic.live.values()}
                    if key in live:
                        continue
                    del table.rows[key]
                    del self._idle[ident]
                    seen.discard(ident)
                    removed += 1
        for ident in self._idle.keys() - seen:  # their workload is back, or the series went another way
            del self._idle[ident]
        if removed:
            self.expired += removed
            log.info(
                "expired the metric series of workloads or services gone",
                extra=kv(series=removed, seconds=self.interval),
            )
        return removed

    def collect(self) -> Iterator[MetricFamily]:
        yield counter_family(
            "ambit_metric_series_expired",
            "Series of workloads or services gone from the agent's state removed from /metrics after they stopped "
            "changing",
            value=self.expired,
        )


def _names_gone(key: Key, table: _Table, known: set[WorkloadKey], services: set[ServiceKey]) -> bool:
    """Whether a workload or the service the series names is not in the agent's state (`unknown` names none)."""
    for name, namespace in table.workloads:
        workload = key[name]
        if workload != UNKNOWN and (workload, key[namespace]) not in known:
            return True
    if table.service:
        host, service_namespace, service_name = (key[i] for i in table.service)
        if host != UNKNOWN and (host, service_namespace, service_name) not in services:
            return True
    return False
