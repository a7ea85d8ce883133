"""The DNAT capture table's no-listener counters are exported from the moment the table is written (at 0), with the
real nft and a real table in a netns of our own: the poller's first read comes at the agent's start, before the
first reconcile wrote the table, and its next one 15 s later, so without a read at the write the series appeared
only then, already counting whatever SYNs were dropped meanwhile (a series that appears at 5 shows no increase).
The blocking read the capture runs and the poller's asyncio one read the same table alike."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest

from agent.capture_dnat import DnatCapture
from agent.capture_dnat_metrics import DnatCounterCollector
from lab import netns
from tests.support.mesh import nft_in

ZERO = {("ipv4", "drop"): 0, ("ipv6", "drop"): 0}


@pytest.fixture
def node() -> Iterator[str]:
    name = f"ambit-t2{secrets.token_hex(2)}"
    netns.add(name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _exported(collector: DnatCounterCollector) -> dict[tuple[str, str], float]:
    family = next(f for f in collector.collect() if f.name == "ambit_capture_dnat_no_listener_packets")
    return {(s.labels["family"], s.labels["action"]): s.value for s in family.samples}


async def test_the_counters_are_exported_at_zero_once_the_table_is_written(node: str) -> None:
    instance = node.replace("-", "_")
    capture = DnatCapture(instance, port=15006, hbone_port=15008, mark=0x100, mark_mask=0x100)
    with netns.enter(node):
        capture.bind_netns()
    try:
        collector = DnatCounterCollector(instance, netns=str(netns.path(node)), timeout=10.0)
        assert await collector.poll()  # the agent's start: no table yet, nothing to export
        assert _exported(collector) == {}

        capture.sync(["10.78.5.5", "fd00:78::5"])
        assert "ambit_" in nft_in(node, "list", "tables")
        assert _exported(collector) == ZERO, "exported as the table was written, before any poll"

        assert await collector.poll() and collector.read_errors == 0
        assert _exported(collector) == ZERO

        capture.fail_open = True
        capture.sync(["10.78.5.5", "fd00:78::5"])  # rewritten: the pass series are there at once too
        assert _exported(collector) == {**ZERO, ("ipv4", "pass"): 0, ("ipv6", "pass"): 0}
    finally:
        capture.remove()
        capture.close()
