"""Token reviews run in the authenticator's own thread pool. With the API server hung, each review holds a thread for
up to two request timeouts: in the loop's default executor (cores + 4 threads, at most 32) a burst of agents with
distinct tokens took every thread, and the controller's other blocking work (the CA Secret's sync, the file source's
scans) waited behind them. A review that cannot even start before its deadline is dropped unsent."""

from __future__ import annotations

import asyncio
import threading

from controller.node_auth import AuthBackendError
from tests.unit.test_ca_token_cache import Backend, authenticator, backend, md, refusal

__all__ = ["backend"]  # the fake API server fixture, shared with the cache's own tests


async def test_hung_reviews_leave_the_default_executor_free(backend: Backend) -> None:
    auth = authenticator(backend, request_timeout=20.0)
    backend.gate.clear()  # the API server takes reviews and answers none
    reviews = [asyncio.create_task(auth.authenticate(md(f"token-{i}"))) for i in range(40)]
    try:
        assert await asyncio.to_thread(backend.arrived.wait, 10)
        # Before: 40 reviews held every default worker until their 20 s timeouts; this waited behind them.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "done"), 10) == "done"
        assert not any(r.done() for r in reviews)
    finally:
        backend.gate.set()
        await asyncio.gather(*reviews, return_exceptions=True)


async def test_a_review_that_cannot_start_before_its_deadline_is_dropped_unsent(backend: Backend) -> None:
    auth = authenticator(backend, request_timeout=0.2, workers=1)
    busy = threading.Event()
    auth._pool.submit(busy.wait, 30)  # the only review thread is taken (a review hung on the API server)
    try:
        e = await refusal(auth, "agent-token")
        assert type(e) is AuthBackendError and "not answered within 0.4s" in str(e), e
        assert backend.calls == 0
    finally:
        busy.set()
