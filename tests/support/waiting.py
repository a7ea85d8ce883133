"""Waiting, in async tests, for a condition that other tasks bring about."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def eventually(check: Callable[[], object], what: str = "condition", within: float = 20.0) -> None:
    """Poll `check` until it is true; AssertionError naming `what` once `within` seconds have passed."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)
