"""bench's command line: the selection and durations a run gets, and clear errors for bad flags."""

from __future__ import annotations

import argparse

import pytest

from bench.main import add_run_arguments, options_from
from bench.options import ALL_CONFIGS, FULL, QUICK


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_run_everything_for_three_rounds() -> None:
    opts = options_from(_parse())
    assert opts.selected() == list(ALL_CONFIGS)
    assert opts.wants_config_scale()
    assert opts.effective_rounds == 3
    assert opts.durations is FULL
    assert opts.max_steal == 0.10


def test_max_steal_is_a_fraction() -> None:
    assert options_from(_parse("--max-steal", "0.25")).max_steal == 0.25


def test_quick_is_one_short_round() -> None:
    opts = options_from(_parse("--quick"))
    assert opts.effective_rounds == 1
    assert opts.durations is QUICK
    assert QUICK.iperf_wall < FULL.iperf_wall


def test_only_keeps_report_order_and_can_skip_config_scale() -> None:
    opts = options_from(_parse("--only", "ambit-same,envoy, nomesh-same,nomesh", "--rounds", "2"))
    assert opts.selected() == ["nomesh", "nomesh-same", "envoy", "ambit-same"]
    assert not opts.wants_config_scale()
    assert opts.effective_rounds == 2
    only_scale = options_from(_parse("--only", "config-scale"))
    assert only_scale.selected() == []
    assert only_scale.wants_config_scale()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--only", "istio"), "unknown configuration"),
        (("--rounds", "0"), "at least 1"),
        (("--max-steal", "10"), "fraction between 0 and 1"),
        (("--max-steal", "-0.1"), "fraction between 0 and 1"),
    ],
)
def test_bad_flags_are_refused_with_a_reason(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        options_from(_parse(*argv))
