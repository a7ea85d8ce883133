"""Hypervisor steal in bench/: reading it from /proc/stat, its share of the machine, and the re-measure rule."""

from __future__ import annotations

from typing import cast

import pytest

from bench import measures
from bench.cpu import Steal, parse_steal, steal_between
from bench.drivers.base import Endpoint
from bench.measures import MAX_ATTEMPTS, MEASURES, Result, another_attempt, kept_attempt, run_measure
from bench.options import QUICK
from bench.tools import Tools

PROC_STAT = """cpu  1437789 18307 484415 1462390 7606 0 161807 12039 0 0
cpu0 641817 7820 238874 813945 1169 0 82099 6026 0 0
cpu1 795972 10487 245541 648444 6436 0 79707 6013 0 0
intr 79118651 0 0 0
ctxt 1234
cpu_note_not_a_cpu 1 2 3
btime 1700000000
"""


def test_steal_is_the_eighth_value_of_the_cpu_line_and_cpus_are_counted() -> None:
    assert parse_steal(PROC_STAT) == Steal(ticks=12039, cpus=2)


def test_a_cpu_line_without_a_steal_column_means_no_steal() -> None:
    old_kernel = "cpu  100 2 30 400 5 0 6\ncpu0 100 2 30 400 5 0 6\n"
    assert parse_steal(old_kernel) == Steal(ticks=0, cpus=1)


def test_steal_fraction_is_of_all_cpus_time_over_the_wall() -> None:
    stolen_s, frac = steal_between(Steal(1000, 2), Steal(1150, 2), wall_s=3.0, ticks_per_s=100)
    assert stolen_s == pytest.approx(1.5)
    assert frac == pytest.approx(0.25)  # 1.5 of 2 CPUs x 3 s


def test_steal_fraction_of_no_time_or_a_counter_going_back_is_zero() -> None:
    assert steal_between(Steal(1000, 2), Steal(1100, 2), wall_s=0.0, ticks_per_s=100) == (1.0, 0.0)
    assert steal_between(Steal(1000, 2), Steal(900, 2), wall_s=1.0, ticks_per_s=100) == (0.0, 0.0)


def test_retry_only_a_clean_attempt_stolen_from_and_only_up_to_the_limit() -> None:
    assert not another_attempt([{"steal_frac": 0.10}], max_steal=0.10)
    assert another_attempt([{"steal_frac": 0.11}], max_steal=0.10)
    assert not another_attempt([{"steal_frac": 0.5, "error": "iperf3: refused"}], max_steal=0.10)
    assert another_attempt([{"steal_frac": 0.5}] * (MAX_ATTEMPTS - 1), max_steal=0.10)
    assert not another_attempt([{"steal_frac": 0.5}] * MAX_ATTEMPTS, max_steal=0.10)


def test_the_least_stolen_attempt_is_kept_unless_the_last_one_failed() -> None:
    a: Result = {"steal_frac": 0.3, "p50": 1}
    b: Result = {"steal_frac": 0.2, "p50": 2}
    c: Result = {"steal_frac": 0.4, "p50": 3}
    assert kept_attempt([a, b, c]) is b
    failed: Result = {"steal_frac": 0.0, "error": "pingpong exited 1"}
    assert kept_attempt([a, failed]) is failed


def _fake_runs(monkeypatch: pytest.MonkeyPatch, steals: list[float]) -> list[int]:
    """measure_once replaced by attempts stolen from as given; returns the list of attempts actually run."""
    ran: list[int] = []

    def once(*_args: object) -> Result:
        ran.append(len(ran))
        return {"p50": 10.0 + len(ran), "steal_frac": steals[len(ran) - 1]}

    monkeypatch.setattr(measures, "measure_once", once)
    return ran


def _run(max_steal: float, retries: list[tuple[int, float]]) -> Result:
    endpoint, tools = cast(Endpoint, None), cast(Tools, None)
    return run_measure(MEASURES[2], tools, endpoint, QUICK, max_steal, lambda n, s: retries.append((n, s)))


def test_run_measure_repeats_a_stolen_measure_and_records_every_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = _fake_runs(monkeypatch, [0.4, 0.15, 0.3])
    retries: list[tuple[int, float]] = []
    result = _run(0.10, retries)
    assert len(ran) == MAX_ATTEMPTS
    assert retries == [(2, 0.4), (3, 0.15)]
    assert result["p50"] == 12.0  # the second attempt, the least stolen
    assert result["attempts"] == 3
    assert result["steal_fracs"] == [0.4, 0.15, 0.3]


def test_run_measure_stops_at_the_first_clean_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = _fake_runs(monkeypatch, [0.02, 0.9])
    retries: list[tuple[int, float]] = []
    result = _run(0.10, retries)
    assert (len(ran), retries, result["attempts"], result["steal_fracs"]) == (1, [], 1, [0.02])
