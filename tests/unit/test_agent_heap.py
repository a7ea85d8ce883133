"""The heap trimmer gives back what a burst left free inside glibc's heap, and leaves a heap it already trimmed alone.

Runs on this test process's own heap: blocks just under glibc's (raised) mmap threshold come from the heap, small
live objects between them keep the heap's top from being returned on its own, as a relay's buffers and the objects
of other connections do in the agent."""

from __future__ import annotations

import asyncio

from agent import heap

BLOCK = 200 * 1024  # a relay buffer's size class: heap memory once glibc has raised its mmap threshold past it


def _raise_mmap_threshold() -> None:
    """glibc raises the threshold to the size of an mmapped block freed: from then on blocks this size use the heap."""
    block = bytearray(1024 * 1024)
    del block


def _burst(blocks: int) -> list[bytes]:
    """Fill the heap with `blocks` blocks and free every other one: the live ones between keep the freed ones from
    merging into the heap's top, which glibc would return by itself. Returns the live ones."""
    big = [b"\x01" * BLOCK for _ in range(blocks)]  # written: their pages are resident
    live = big[1::2]
    del big
    return live


def test_a_burst_left_free_in_the_heap_is_given_back_once() -> None:
    _raise_mmap_threshold()
    trimmer = heap.HeapTrimmer(slack=8 * 1024 * 1024)
    assert trimmer._libc is not None, "glibc with mallinfo2 (>= 2.33) is what the agent runs on"
    trimmer._free_base = trimmer._free()
    live = _burst(400)  # ~80 MB, half of it freed
    freed = 200 * BLOCK
    held = heap._rss()
    assert trimmer._libc.mallinfo2().fordblks >= freed, "the freed blocks stay in the heap"
    assert trimmer.maybe_trim()
    assert held - heap._rss() > freed / 2, "the trim gave the freed blocks' pages back"
    # What is freed after a trim (streams closing one after another) is given back at the next look, although the
    # process did not grow: the heap's free count did.
    del live[::2]
    held = heap._rss()
    assert trimmer.maybe_trim()
    assert held - heap._rss() > 50 * BLOCK / 2
    assert not trimmer.maybe_trim(), "nothing was freed since: the heap is not walked again"
    del live


def test_freed_chunks_written_again_and_freed_again_between_looks_are_given_back() -> None:
    """Traffic between two looks takes the trimmed chunks and frees them again: the heap's free count is back where
    it was, but the pages are resident again. The process's growth tells."""
    _raise_mmap_threshold()
    trimmer = heap.HeapTrimmer(slack=8 * 1024 * 1024)
    assert trimmer._libc is not None
    live = _burst(400)
    assert trimmer.maybe_trim()
    free = trimmer._free()
    trimmed = heap._rss()
    again = [b"\x02" * BLOCK for _ in range(200)]  # the 200 freed blocks' holes, written
    del again
    assert abs(trimmer._free() - free) < trimmer.slack, "the free count alone does not show it"
    assert heap._rss() - trimmed > 200 * BLOCK / 2, "the holes' pages are resident again"
    held = heap._rss()
    assert trimmer.maybe_trim()
    assert held - heap._rss() > 200 * BLOCK / 2
    assert not trimmer.maybe_trim(), "nothing was written since: the heap is not walked again"
    del live


def test_growth_of_memory_in_use_is_not_trimmed() -> None:
    trimmer = heap.HeapTrimmer()
    assert trimmer._libc is not None
    trimmer.slack = trimmer._free() + 4 * 1024 * 1024  # more than the heap holds free, now and below
    grown = [b"\x03" * BLOCK for _ in range(trimmer.slack // BLOCK + 40)]  # taken from the free chunks, then the top
    assert heap._rss() - trimmer._rss_base > trimmer.slack
    assert not trimmer.maybe_trim()
    assert trimmer.trims == 0
    del grown


def test_a_small_heap_is_left_alone() -> None:
    trimmer = heap.HeapTrimmer(slack=1024 * 1024 * 1024)
    trimmer._free_base = 0
    assert not trimmer.maybe_trim()
    assert trimmer.trims == 0


async def test_the_trimmer_looks_periodically_until_stopped() -> None:
    trimmer = heap.HeapTrimmer(interval=0.01, slack=1024 * 1024 * 1024)
    looks = 0
    thrice = asyncio.Event()
    real = trimmer.maybe_trim

    def counting() -> bool:
        nonlocal looks
        looks += 1
        if looks == 3:
            thrice.set()
        return real()

    trimmer.maybe_trim = counting  # type: ignore[method-assign]
    trimmer.start()
    await asyncio.wait_for(thrice.wait(), 10)
    trimmer.stop()
    seen = looks
    await asyncio.sleep(0.05)
    assert looks == seen
