"""The heap trimmer's back-off: while connections are open, a trim holds off the next for `backoff` times as long as
that malloc_trim held the loop (a large heap's trims cost tens of milliseconds each); with none open the next look
(every interval) trims whatever the last one cost."""

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


async def test_a_costly_trim_holds_off_trims_while_connections_are_open(trimmer: heap.HeapTrimmer) -> None:
    slow = _SlowTrim(trimmer._libc, 0.02)
    trimmer._libc = slow
    _worth_trimming(trimmer)
    trimmer._look()
    try:
        assert slow.calls == 1 and trimmer.trims == 1
        assert trimmer.last_trim_seconds >= slow.seconds, "the trim's cost is what malloc_trim took"
        assert _next_look_in(trimmer) == pytest.approx(trimmer.interval, abs=0.5)
        _worth_trimming(trimmer)
        trimmer._look()  # the next look, within the back-off (1000 x 20 ms): busy, no trim
        assert slow.calls == 1
        assert _next_look_in(trimmer) == pytest.approx(trimmer.interval, abs=0.5)
    finally:
        trimmer.stop()


async def test_with_no_connection_open_the_next_look_trims_whatever_the_last_cost(trimmer: heap.HeapTrimmer) -> None:
    """What a burst left is given back right after it ends: a trim holds up nobody then. Before, a costly trim
    put every look off by its back-off, idle or not."""
    slow = _SlowTrim(trimmer._libc, 0.02)
    trimmer._libc = slow
    open_connections = [3]
    trimmer.idle = lambda: open_connections[0] == 0
    _worth_trimming(trimmer)
    trimmer._look()
    try:
        _worth_trimming(trimmer)
        trimmer._look()
        assert slow.calls == 1, "connections open: within the back-off"
        open_connections[0] = 0
        trimmer._look()
        assert slow.calls == 2, "idle: trimmed at the next look"
    finally:
        trimmer.stop()


async def test_a_cheap_trim_keeps_the_interval(trimmer: heap.HeapTrimmer) -> None:
    slow = _SlowTrim(trimmer._libc, 0.0)
    trimmer._libc = slow
    trimmer.backoff = 0.0  # whatever the trim took, its back-off is over by the next look
    _worth_trimming(trimmer)
    trimmer._look()
    try:
        assert slow.calls == 1
        assert _next_look_in(trimmer) == pytest.approx(trimmer.interval, abs=0.5)
        _worth_trimming(trimmer)
        trimmer._look()
        assert slow.calls == 2
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
