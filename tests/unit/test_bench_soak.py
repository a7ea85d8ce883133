"""The soak's judgement: what counts as a leak, a failed drain or a failed connection, from samples alone."""

from __future__ import annotations

import os

import pytest

from bench.soak import FD_SLACK, Sample, Tally, metric_sum, open_fds, resident_by_kind, rss_slope, threads, verdict


def _sample(node: str = "node1", *, t: float = 0.0, rss: float = 60.0, sockets: int = 12, other: int = 20) -> Sample:
    return Sample(t, node, rss, sockets, pipes=4, other_fds=other, buffered_bytes=0.0, sockets_open=0.0)


def test_a_clean_run_passes() -> None:
    base = [_sample("node1"), _sample("node2")]
    final = [_sample("node1", rss=64.0, sockets=12 + FD_SLACK), _sample("node2", rss=55.0)]
    assert verdict(base, final, drained=True, tally=Tally()) == []


def test_descriptors_beyond_the_slack_are_a_leak_pipes_are_not() -> None:
    final = _sample(sockets=12 + FD_SLACK + 1)
    final.pipes = 128  # the relay's pipe pool: bounded, not compared
    problems = verdict([_sample()], [final], drained=True, tally=Tally())
    assert len(problems) == 1 and "node1" in problems[0] and "sockets" in problems[0]


def test_rss_growth_beyond_the_slack_is_a_leak() -> None:
    problems = verdict([_sample(rss=60.0)], [_sample(rss=75.0)], drained=True, tally=Tally())
    assert problems == ["node1: RSS 75.0 MB at the end, 60.0 MB after the warm-up"]
    # the slack is relative for a big agent: 15% of 200 MB
    assert verdict([_sample(rss=200.0)], [_sample(rss=225.0)], drained=True, tally=Tally()) == []


def test_failed_connections_and_a_missing_drain_are_reported() -> None:
    tally = Tally()
    tally.ok["echo_cross"] = 9
    tally.fail("echo_same", "ValueError: echo of 100 bytes came back as 99 different bytes")
    stuck = _sample()
    stuck.sockets_open = 3
    problems = verdict([_sample()], [stuck], drained=False, tally=tally)
    assert problems[0].startswith("1 of 10 connections failed: echo_same: ValueError")
    assert "did not drain" in problems[1] and "node1: 3 open" in problems[1]


def test_an_agent_without_a_baseline_is_reported() -> None:
    assert verdict([_sample("node1")], [_sample("node2")], drained=True, tally=Tally()) == ["node2: no baseline sample"]


def test_metric_sum_adds_every_series_of_one_name_only() -> None:
    text = "\n".join(
        [
            "# TYPE istio_tcp_sockets_open gauge",
            'istio_tcp_sockets_open{reporter="source"} 3',
            'istio_tcp_sockets_open{reporter="destination"} 2',
            "istio_tcp_sockets_open_extra 100",
            "ambit_relay_buffered_bytes 4096.0",
        ]
    )
    assert metric_sum(text, "istio_tcp_sockets_open") == 5
    assert metric_sum(text, "ambit_relay_buffered_bytes") == 4096
    assert metric_sum(text, "absent") == 0


def test_rss_slope_is_the_second_half_trend_in_mb_per_hour() -> None:
    flat_then_rising = [_sample(t=t, rss=50.0) for t in range(0, 60, 10)]
    flat_then_rising += [_sample(t=t, rss=50.0 + (t - 60) / 60) for t in range(60, 180, 10)]  # 1 MB a minute
    assert rss_slope(flat_then_rising, "node1") == pytest.approx(60.0, rel=0.05)
    assert rss_slope(flat_then_rising, "node2") == 0.0


def test_open_fds_sorts_this_process_descriptors_by_kind() -> None:
    before = open_fds(os.getpid())
    r, w = os.pipe()
    try:
        after = open_fds(os.getpid())
    finally:
        os.close(r)
        os.close(w)
    assert after["pipe"] == before["pipe"] + 2
    assert after["other"] >= 1  # the interpreter's own files, /dev/null ...


def test_resident_by_kind_finds_an_anonymous_block_this_process_wrote() -> None:
    before = resident_by_kind(os.getpid())
    block = bytearray(b"\x01") * (64 * 1024 * 1024)  # past glibc's mmap threshold: its own anonymous mapping
    after = resident_by_kind(os.getpid())
    del block
    assert after["anon"] - before["anon"] >= 60 * 1024 * 1024
    assert before["heap"] > 0 and before["file"] > 0
    assert threads(os.getpid()) >= 1


def test_a_process_that_is_gone_has_nothing_resident() -> None:
    assert resident_by_kind(2**22 + 1) == {} and threads(2**22 + 1) == 0  # above pid_max's default and limit
