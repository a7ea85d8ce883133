"""The heap trimmer and the one-arena setting on a glibc without mallinfo2 (before 2.33: Debian 11, Ubuntu 20.04,
RHEL 8). Both were skipped there, since the library check asked for mallinfo2, which only the trimmer reads: such a
node kept a burst's memory and one heap per thread."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from agent import heap
from tests.unit.test_agent_heap import BLOCK, _burst, _raise_mmap_threshold


class _GlibcBefore233:
    """This process's glibc, without mallinfo2."""

    def __init__(self) -> None:
        self._lib = ctypes.CDLL("libc.so.6")
        self.mallopt_calls: list[tuple[int, int]] = []

    def __getattr__(self, name: str) -> Any:
        if name == "mallinfo2":
            raise AttributeError(name)
        return getattr(self._lib, name)

    def mallopt(self, param: int, value: int) -> int:
        self.mallopt_calls.append((param, value))
        return 1


def test_without_mallinfo2_one_arena_is_still_set_and_bursts_are_still_trimmed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = _GlibcBefore233()
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: old)
    heap.one_arena()
    assert old.mallopt_calls == [(heap._M_ARENA_MAX, 1)]
    _raise_mmap_threshold()
    trimmer = heap.HeapTrimmer(slack=8 * 1024 * 1024)
    trimmer._free_base = trimmer._free()
    live = _burst(400)  # ~80 MB, half of it freed inside the heap
    held = heap._rss()
    assert trimmer.maybe_trim(), "mallinfo counts the freed blocks"
    assert held - heap._rss() > 200 * BLOCK / 2
    del live


def test_a_library_without_glibcs_malloc_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    class _NotGlibc:
        pass

    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: _NotGlibc())
    heap.one_arena()  # nothing to call, nothing raised
    trimmer = heap.HeapTrimmer()
    assert trimmer._libc is None
    trimmer.start()  # without a running loop: it must not even look
    trimmer.stop()
