"""The heap trimmer's back-off: after a trim, the next look waits `backoff` times as long as that malloc_trim held
the loop, and never less than the interval (a large heap's trims cost tens of milliseconds each)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from agent import heap


class _SlowTrim:
    """glibc's malloc controls, with a malloc_trim that takes at least `seconds` (as one on a large heap does)."""

    def __init__(self, libc: Any, seconds: float) -> None:
        self._libc = libc
        self.seconds = seconds
        self.calls = 0

    def malloc_trim(self, pad: int) -> int:
        self.calls += 1
        result = int(self._libc.malloc_trim(pad))
        time.sleep(self.seconds)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._libc, name)


def _worth_trimming(trimmer: heap.HeapTrimmer) -> None:
    """As if a burst had freed more than the slack since the last trim."""
    trimmer._free_base = trimmer._free() - 2 * trimmer.slack


def _next_look_in(trimmer: heap.HeapTrimmer) -> float:
    assert trimmer._timer is not None
    return trimmer._timer.when() - asyncio.get_running_loop().time()


@pytest.fixture
def trimmer() -> heap.HeapTrimmer:
    t = heap.HeapTrimmer(interval=5.0, backoff=1000.0)
    assert t._libc is not None, "glibc is what the agent runs on"
    return t


async def test_a_costly_trim_puts_the_next_look_off_in_proportion(trimmer: heap.HeapTrimmer) -> None:
    slow = _SlowTrim(trimmer._libc, 0.02)
    trimmer._libc = slow
    _worth_trimming(trimmer)
    trimmer._look()
    try:
        assert slow.calls == 1 and trimmer.trims == 1
        assert trimmer.last_trim_seconds >= slow.seconds, "the trim's cost is what malloc_trim took"
        delay = _next_look_in(trimmer)
        assert delay > trimmer.interval
        assert delay == pytest.approx(trimmer.backoff * trimmer.last_trim_seconds, abs=0.5)
    finally:
        trimmer.stop()


async def test_a_cheap_trim_keeps_the_interval(trimmer: heap.HeapTrimmer) -> None:
    slow = _SlowTrim(trimmer._libc, 0.0)
    trimmer._libc = slow
    trimmer.backoff = 0.0  # whatever the trim took, its back-off is shorter than the interval
    _worth_trimming(trimmer)
    trimmer._look()
    try:
        assert slow.calls == 1
        assert _next_look_in(trimmer) == pytest.approx(trimmer.interval, abs=0.5)
    finally:
        trimmer.stop()


async def test_no_trim_no_back_off(trimmer: heap.HeapTrimmer) -> None:
    trimmer.last_trim_seconds = 1.0  # a costly trim long ago
    trimmer.slack = 1024 * 1024 * 1024  # nothing worth trimming now
    trimmer._look()
    try:
        assert trimmer.trims == 0
        assert _next_look_in(trimmer) == pytest.approx(trimmer.interval, abs=0.5)
    finally:
        trimmer.stop()


async def test_a_failing_look_still_looks_again(trimmer: heap.HeapTrimmer, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable() -> int:
        raise OSError("statm")

    monkeypatch.setattr(heap, "_rss", unreadable)
    with pytest.raises(OSError):
        trimmer._look()
    try:
        assert _next_look_in(trimmer) == pytest.approx(trimmer.interval, abs=0.5)
    finally:
        trimmer.stop()
