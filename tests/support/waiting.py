"""Waiting, in async tests, for a condition that other tasks bring about."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable


async def eventually(check: Callable[[], object], what: str = "condition", within: float = 20.0) -> None:
    """Poll `check` until it is true; AssertionError naming `what` once `within` seconds have passed."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


async def drain_until_closed(reader: asyncio.StreamReader, within: float = 10.0) -> None:
    """Read and drop what the peer sends until it closes or resets the connection; TimeoutError after `within`
    seconds if it does neither."""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass


class LoopTurns:
    """Counts the event loop's turns while it is entered: how a test sees that long work hands the loop back
    (other tasks run between its pieces) without timing anything."""

    def __init__(self) -> None:
        self.turns = 0
        self._task: asyncio.Task[None] | None = None

    async def _count(self) -> None:
        while True:
            self.turns += 1
            await asyncio.sleep(0)

    async def __aenter__(self) -> LoopTurns:
        self._task = asyncio.create_task(self._count())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
