"""An HTTP GET from async tests to the agent's operator servers (readiness, admin), errors included."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request


async def http_get(url: str) -> tuple[int, str]:
    """Status and body of `url`; a 4xx/5xx answer is returned, not raised. urllib blocks: it runs in a thread so the
    server under test keeps its event loop."""

    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    return await asyncio.to_thread(fetch)
