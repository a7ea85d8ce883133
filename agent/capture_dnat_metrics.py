"""Prometheus view of the DNAT capture table's no-listener counter (agent/capture_dnat.py).

The counter lives in nftables, and reading it means running ``nft``, which a scrape on the event loop must not wait
for: a poller runs capture_dnat's CounterRead (``nft -j list table``, the read DnatCapture runs blocking around its
writes) as an asyncio subprocess in the background (with a timeout, killed past it) and a scrape serves what the
two read last. Istio has no such counter (its redirection is iptables in the pod, whose drops it does not export),
hence an ``ambit_`` name, after ztunnel's style: a counter of what happened, by label.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from agent.capture_dnat import CounterRead, NoListenerCounts, no_listener_counts, table_name
from agent.prometheus import MetricFamily, counter_family
from common.log import kv

log = logging.getLogger(__name__)

POLL_INTERVAL = 15.0  # Prometheus' default scrape interval: a scrape is at most one poll behind
POLL_TIMEOUT = 5.0


class DnatCounterCollector:
    """Polls the table of agent ``instance`` every ``interval`` (:meth:`run`) and exports what it counted.

    ``netns`` is the path of a network namespace to read the table in (tests); by default the process's own, the
    node's, where the agent keeps it."""

    def __init__(
        self,
        instance: str,
        *,
        interval: float = POLL_INTERVAL,
        timeout: float = POLL_TIMEOUT,
        nft: str = "nft",
        netns: str | None = None,
    ) -> None:
        self.table = table_name(instance)
        self.interval = interval
        self.timeout = timeout
        self.counts: NoListenerCounts = no_listener_counts(self.table)
        self.read_errors = 0
        self._read = CounterRead(self.table, self.counts, nft=nft, netns=netns, timeout=timeout)
        self._failing = False

    async def run(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.interval)

    async def poll(self) -> bool:
        """Read the table's counters once; False when nft could not (counted, logged when it starts failing). No
        table (nothing enrolled on the node) reads as nothing new."""
        error = await self._read.run()
        if error is not None:
            return self._failed(error)
        self._failing = False
        return True

    def _failed(self, error: str) -> bool:
        self.read_errors += 1
        if not self._failing:
            log.warning("cannot read the DNAT capture table's counters", extra=kv(table=self.table, error=error))
        self._failing = True
        return False

    def collect(self) -> Iterator[MetricFamily]:
        packets = counter_family(
            "ambit_capture_dnat_no_listener_packets",
            "SYNs of connections the node DNATed to an enrolled pod that found no agent listener, dropped (fail "
            "closed) or passed on uncaptured (fail open), counted by the nftables capture table",
            labels=["family", "action"],
        )
        for (family, action), value in self.counts.totals().items():
            packets.add_metric([family, action], value)
        yield packets
        yield counter_family(
            "ambit_capture_dnat_counter_read_errors",
            "Times the agent could not read the DNAT capture table's counters (nft failed or timed out)",
            value=self.read_errors,
        )
