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
