"""Retry schedule and refresh time of the agent's certificate manager (pure functions)."""

from __future__ import annotations

import itertools
import random

import pytest

from agent.identity import Backoff, refresh_at


def test_backoff_doubles_from_half_a_second_to_150s() -> None:
    b = Backoff(jitter=0.0)
    rng = random.Random(1)
    delays = [b.delay(n, rng) for n in range(1, 14)]
    assert delays[:5] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert delays[-1] == 150.0
    assert all(later >= earlier for earlier, later in itertools.pairwise(delays))
    assert b.delay(10_000, rng) == 150.0  # no overflow for long outages


@pytest.mark.parametrize("failures", [1, 2, 5, 9, 30])
def test_backoff_jitter_within_20_percent_and_actually_random(failures: int) -> None:
    b = Backoff()
    base = Backoff(jitter=0.0).delay(failures, random.Random(0))
    rng = random.Random(42)
    samples = [b.delay(failures, rng) for _ in range(500)]
    assert all(0.8 * base <= s <= 1.2 * base for s in samples)
    assert max(samples) - min(samples) > 0.2 * base, "jitter should spread retries"
    mean = sum(samples) / len(samples)
    assert abs(mean - base) < 0.05 * base


def test_refresh_at_half_life_from_not_before() -> None:
    assert refresh_at(not_before=1000.0, not_after=1000.0 + 86400, received_at=1000.0) == 1000.0 + 43200


def test_refresh_at_ignores_ca_backdating() -> None:
    # CA backdated not_before by 60 s on a 4 s certificate: refresh 2 s after receipt, not after expiry.
    assert refresh_at(not_before=940.0, not_after=1004.0, received_at=1000.0) == 1002.0


def test_refresh_at_never_before_receipt_even_for_expired() -> None:
    assert refresh_at(not_before=0.0, not_after=10.0, received_at=20.0) == 20.0
