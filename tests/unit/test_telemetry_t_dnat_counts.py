"""The DNAT capture table's no-listener counts: parsed from nft's JSON listing (the shape nft 1.0 prints for the
table capture_dnat.ruleset writes), kept monotonic across the table's rewrites, and a poller that does not hang on
an nft that does not answer. The real table, traffic and nft are in tests/integration/test_telemetry_t_dnat_counter.py.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.capture_dnat import NoListenerCounts, parse_no_listener_counts
from agent.capture_dnat_metrics import DnatCounterCollector


def _rule(handle: int, protocol: str, packets: int, verdict: str) -> dict[str, Any]:
    """A no-listener rule as nft -j lists it."""
    return {
        "rule": {
            "family": "inet",
            "table": "ambit_t",
            "chain": "prerouting",
            "handle": handle,
            "expr": [
                {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
                {
                    "match": {
                        "op": "==",
                        "left": {"payload": {"protocol": protocol, "field": "daddr"}},
                        "right": "@enrolled4" if protocol == "ip" else "@enrolled6",
                    }
                },
                {"counter": {"packets": packets, "bytes": packets * 60}},
                {verdict: None},
            ],
        }
    }


def listing(table_handle: int, v4: int, v6: int, verdict: str = "drop") -> str:
    other = {  # a rule with a counter-less verdict (the tproxy rules end in accept): not counted
        "rule": {"family": "inet", "table": "ambit_t", "chain": "prerouting", "handle": 5, "expr": [{"accept": None}]}
    }
    return json.dumps(
        {
            "nftables": [
                {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
                {"table": {"family": "inet", "name": "ambit_t", "handle": table_handle}},
                other,
                _rule(9, "ip", v4, verdict),
                _rule(12, "ip6", v6, verdict),
            ]
        }
    )


def test_the_no_listener_rules_are_read_by_family_and_verdict() -> None:
    assert parse_no_listener_counts(listing(3, 7, 2)) == (3, {("ipv4", "drop"): 7, ("ipv6", "drop"): 2})
    assert parse_no_listener_counts(listing(4, 1, 0, "accept"))[1] == {("ipv4", "pass"): 1, ("ipv6", "pass"): 0}


@pytest.mark.parametrize("bad", ["", "{}", '{"nftables": 3}', '{"nftables": [{"rule": {"expr": []}}]}'])
def test_what_is_not_a_listing_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_no_listener_counts(bad)


def test_counts_stay_monotonic_across_rewrites_and_late_listings() -> None:
    counts = NoListenerCounts()
    counts.observe(listing(3, 5, 1))
    counts.observe(listing(3, 8, 1))
    assert counts.totals() == {("ipv4", "drop"): 8, ("ipv6", "drop"): 1}
    counts.observe(listing(7, 0, 0))  # the table was rewritten: its counters start at 0
    assert counts.totals() == {("ipv4", "drop"): 8, ("ipv6", "drop"): 1}
    counts.observe(listing(3, 9, 1))  # a read of the old table that finished late
    assert counts.totals() == {("ipv4", "drop"): 8, ("ipv6", "drop"): 1}
    counts.observe(listing(7, 2, 0))
    counts.observe(listing(9, 1, 0, "accept"))  # fail-open
    assert counts.totals() == {
        ("ipv4", "drop"): 10,
        ("ipv4", "pass"): 1,
        ("ipv6", "drop"): 1,
        ("ipv6", "pass"): 0,
    }


def _fake_nft(tmp_path: Path, body: str) -> str:
    path = tmp_path / "nft"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


async def test_an_nft_that_does_not_answer_is_killed_and_counted(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    nft = _fake_nft(tmp_path, f"echo $$ > {pidfile}; exec sleep 60")
    collector = DnatCounterCollector("t_hang", nft=nft, timeout=0.2)
    assert not await collector.poll()
    assert collector.read_errors == 1
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)  # killed and reaped, not left behind
    errors = next(f for f in collector.collect() if f.name == "ambit_capture_dnat_counter_read_errors")
    assert errors.samples[0].value == 1


async def test_poller_outcomes(tmp_path: Path) -> None:
    collector = DnatCounterCollector("t_poll", nft=str(tmp_path / "missing"))
    assert not await collector.poll()  # no nft at all
    collector = DnatCounterCollector(
        "t_poll", nft=_fake_nft(tmp_path, "echo 'Error: No such file or directory' >&2; exit 1")
    )
    assert await collector.poll() and collector.read_errors == 0  # no table: nothing enrolled
    collector = DnatCounterCollector(
        "t_poll", nft=_fake_nft(tmp_path, "echo 'Error: Operation not permitted' >&2; exit 1")
    )
    assert not await collector.poll() and collector.read_errors == 1
    collector = DnatCounterCollector("t_poll", nft=_fake_nft(tmp_path, f"echo '{listing(2, 4, 0)}'"))
    assert await collector.poll()
    family = next(f for f in collector.collect() if f.name == "ambit_capture_dnat_no_listener_packets")
    assert {(s.labels["family"], s.labels["action"]): s.value for s in family.samples} == {
        ("ipv4", "drop"): 4,
        ("ipv6", "drop"): 0,
    }
