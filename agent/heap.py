"""The agent's glibc heap: one arena, and memory a burst left free given back to the node.

A relay's receive buffers and backlogs are 256 KiB blocks. glibc raises its mmap threshold to the size of every
mmapped block freed, so after the first one came back they are carved from the heap, which returns only its top on
its own: a burst of slow readers (20 stalled streams, +120 MB) left the agent at 3x its baseline RSS long after they
closed. Keeping big blocks mmapped instead (a fixed threshold) gave that memory back, but each TLS write then
mmapped, faulted in and unmapped a fresh 256 KiB block: +20-40% CPU per GB moved (measured in the mesh lab,
alternated with the dynamic threshold). So the threshold stays dynamic and the heap is trimmed after bursts:
``malloc_trim`` releases the free pages inside the heap, not only at its top.

Not glibc (e.g. musl): nothing to do. glibc before 2.33 (no mallinfo2: Debian 11, Ubuntu 20.04, RHEL 8, where the
agent may run outside its image) still gets one arena and the trims, counted with mallinfo.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from common.log import kv

log = logging.getLogger("agent.heap")

_M_ARENA_MAX = -8  # mallopt parameter, malloc.h
TRIM_INTERVAL = 5.0  # seconds between looks at the heap
TRIM_SLACK = 4 * 1024 * 1024  # free heap (and RSS growth since the last trim) worth giving back
TRIM_BACKOFF = 1000.0
"""While connections are open, a trim holds off the next for this many times as long as it took (at least the
interval): trims then hold the event loop for 0.1% of its time at most. Measured here (2 cores, shared), a
malloc_trim of a 20 MB heap takes 0.3-3 ms, so the interval decides (5 s); of a 300 MB heap 8-90 ms (more the more
pages it gives back, 7-18 ms when it gives none), which every relay on the loop waits for: those trims come 8-90 s
apart instead of every 13 s under steady traffic. With no connection open a trim holds up nobody, so the next look
trims whatever the last one cost: what a burst left is given back within the interval of its end, not up to a
minute and a half later (a soak's agent sat at 96 MB for 30 s after its last connection, 58 MB once trimmed)."""


_MALLINFO_FIELDS = (
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",  # free bytes in the heap: what a trim could give back, at most
    "keepcost",
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO_FIELDS]


class _MallInfo(ctypes.Structure):
    """glibc < 2.33: the same counts as int, read unsigned (right up to 4 GiB free, which a trim then misjudges)."""

    _fields_ = [(name, ctypes.c_uint) for name in _MALLINFO_FIELDS]


def _libc() -> Any | None:
    """glibc's malloc controls, or None. Its heap statistics are ``mallinfo2`` (glibc >= 2.33) or ``mallinfo``."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):  # a library of that name, not glibc's malloc
        return None
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2
    elif hasattr(libc, "mallinfo"):
        libc.mallinfo.restype = _MallInfo
    else:
        return None
    return libc


def one_arena() -> None:
    """glibc gives every thread that allocates its own heap (arena), which keeps what it freed. The data path is
    the event loop thread; the blocking-work thread only borrows memory under the GIL, so it shares the main heap.
    Called before any thread starts."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, 1)


def _rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HeapTrimmer:
    """Every `interval`, trims the heap when it holds more than `slack` free bytes beyond what it held free right
    after the last trim (the lowest count seen since). A trimmed heap keeps its free chunks, only their pages go, so
    the count does not fall with a trim: measured from there, only memory freed since is given back, and a heap
    trimmed already is not walked again. Counting walks the free chunks (about 1.5 ms for 10,000); a trim holds the
    heap's lock for a few milliseconds after a burst of tens of MB.

    The count misses memory taken from the trimmed chunks and freed again between two looks: it is back where it
    was, but the pages were written, so they are resident again. Steady traffic does that all over a fragmented heap,
    which ends up resident however little of it is used: the HBONE server agent of a soak grew from 60 to 74 MB in
    15 minutes and stayed there after every connection closed, 13 MB free in its heap (a malloc_trim took 12 MB
    off). So the heap is also trimmed when the process grew by more than `slack` since the last trim (from the
    lowest RSS seen since) while the heap holds more than `slack` free: under traffic that gives back pages the
    traffic soon takes again (a trim at most every `interval`, each page faulted in again once), once it stops they
    stay given back. A heap with little free is not trimmed for growth: that is memory in use.

    A trim's cost grows with the heap (it walks every free chunk and gives back page by page), so after a trim the
    looks of the next `backoff` times as long as that trim took do not trim while `idle()` says connections are
    open (see TRIM_BACKOFF)."""

    def __init__(
        self,
        interval: float = TRIM_INTERVAL,
        slack: int = TRIM_SLACK,
        backoff: float = TRIM_BACKOFF,
        idle: Callable[[], bool] = lambda: False,
    ) -> None:
        self.interval = interval
        self.slack = slack
        self.backoff = backoff
        self.idle = idle
        self._quiet_until = 0.0  # loop time before which a busy agent is not trimmed (the last trim's back-off)
        self.trims = 0
        self.last_trim_seconds = 0.0  # how long the last malloc_trim held the loop
        self._libc = _libc()
        self._mallinfo = None if self._libc is None else getattr(self._libc, "mallinfo2", None) or self._libc.mallinfo
        self._free_base = 0 if self._libc is None else self._free()
        self._rss_base = _rss()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._libc is None:
            return
        self._free_base, self._rss_base = self._free(), _rss()
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._look)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _look(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            now = loop.time()
            if (now >= self._quiet_until or self.idle()) and self.maybe_trim():
                self._quiet_until = now + self.backoff * self.last_trim_seconds
        finally:
            self._timer = loop.call_later(self.interval, self._look)

    def _free(self) -> int:
        assert self._mallinfo is not None
        return int(self._mallinfo().fordblks)

    def maybe_trim(self) -> bool:
        """Trim now if the heap is worth it; returns whether it was."""
        assert self._libc is not None
        free, rss = self._free(), _rss()
        freed = free - self._free_base > self.slack
        refaulted = free > self.slack and rss - self._rss_base > self.slack
        if not (freed or refaulted):
            # Reused since, or shrunk: freeing it again, or faulting it in again, will count.
            self._free_base = min(self._free_base, free)
            self._rss_base = min(self._rss_base, rss)
            return False
        started = time.perf_counter()
        self._libc.malloc_trim(0)
        self.last_trim_seconds = time.perf_counter() - started
        self._free_base, self._rss_base = free, _rss()
        self.trims += 1
        log.debug(
            "heap trimmed",
            extra=kv(
                free_bytes=free,
                rss_before=rss,
                rss_after=self._rss_base,
                refaulted=refaulted and not freed,
                seconds=round(self.last_trim_seconds, 4),
            ),
        )
        return True
