"""The TokenReview authenticator's caches and single flight, against a fake API server speaking TokenReview JSON.

The fake's TokenReview route can be held closed (to have requests overlap a review in flight), made to fail with an
HTTP status or to answer without a status; ``calls`` counts every TokenReview it received. Time is an injected
clock, never a sleep.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes import client as k8s

from controller.node_auth import (
    AuthBackendError,
    AuthenticationError,
    AuthError,
    Caller,
    TokenReviewAuthenticator,
    UntrustedCallerError,
)
from tests.support.fake_kube import serve, status_object
from tests.support.fake_kube_identity import TokenIdentity, TokenReviews, install, pod


@dataclass
class Backend:
    url: str = ""
    table: TokenReviews = field(default_factory=TokenReviews)
    gate: threading.Event = field(default_factory=threading.Event)  # set: reviews are answered
    arrived: threading.Event = field(default_factory=threading.Event)  # a review reached the server
    fail_with: int | None = None
    no_status: bool = False
    calls: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def review(self, _: re.Match[str], body: Any) -> tuple[int, Any]:
        with self.lock:
            self.calls += 1
        self.arrived.set()
        self.gate.wait(timeout=30)
        if self.fail_with:
            return self.fail_with, status_object(self.fail_with, "InternalError", "injected failure")
        answer = self.table.review(body or {})
        if self.no_status:
            del answer["status"]
        return 201, answer


@pytest.fixture
def backend() -> Iterator[Backend]:
    with serve() as fake:
        b = Backend(url=fake.url)
        b.gate.set()
        # Routes match in the order added: this one answers TokenReviews; install's serves pod reads.
        fake.add_route("POST", r"/apis/authentication\.k8s\.io/v1/tokenreviews", b.review)
        b.table = install(fake)
        b.table.tokens["agent-token"] = TokenIdentity("ambit-system", "ambit-agent", "agent-x1", "uid-1")
        b.table.tokens["app-token"] = TokenIdentity("default", "web", "web-1", "uid-3")
        b.table.tokens["gone-token"] = TokenIdentity("ambit-system", "ambit-agent", "agent-gone", "uid-9")
        fake.upsert(pod("ambit-system", "agent-x1", "uid-1", "ambit-agent", "node1"))
        try:
            yield b
        finally:
            b.gate.set()  # never leave a server thread waiting


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def authenticator(backend: Backend, clock: Clock | None = None, **kwargs: Any) -> TokenReviewAuthenticator:
    config = k8s.Configuration()
    config.host = backend.url
    return TokenReviewAuthenticator(k8s.ApiClient(config), clock=clock or Clock(), **kwargs)


def md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def refusal(auth: TokenReviewAuthenticator, token: str) -> AuthError:
    with pytest.raises(AuthError) as exc:
        await auth.authenticate(md(token))
    return exc.value


async def test_acceptance_cached_for_cache_seconds(backend: Backend) -> None:
    clock = Clock()
    auth = authenticator(backend, clock, cache_seconds=60)
    for _ in range(3):
        assert (await auth.authenticate(md("agent-token"))).node == "node1"
    clock.now += 59.9
    assert (await auth.authenticate(md("agent-token"))).node == "node1"
    assert backend.calls == 1
    clock.now += 0.1
    assert (await auth.authenticate(md("agent-token"))).node == "node1"
    assert backend.calls == 2


@pytest.mark.parametrize(
    ("token", "kind", "reason", "text"),
    [
        ("nonsense", AuthenticationError, "bad_token", "rejected by TokenReview"),
        ("app-token", UntrustedCallerError, "untrusted_account", "not a trusted node agent"),
        ("gone-token", AuthenticationError, "bad_token", "does not exist"),
    ],
)
async def test_refusal_reviewed_once_per_failure_ttl(
    backend: Backend, token: str, kind: type[AuthError], reason: str, text: str
) -> None:
    clock = Clock()
    auth = authenticator(backend, clock, failure_cache_seconds=10)
    first = await refusal(auth, token)
    assert type(first) is kind and first.reason == reason and text in str(first)
    clock.now += 9.9
    again = await refusal(auth, token)
    assert backend.calls == 1
    # The cached answer is the same refusal (so the same gRPC status and counted reason), as a fresh exception.
    assert (type(again), again.reason, str(again)) == (kind, reason, str(first))
    assert again is not first
    clock.now += 0.1
    await refusal(auth, token)
    assert backend.calls == 2


async def test_refusal_does_not_shadow_other_tokens(backend: Backend) -> None:
    auth = authenticator(backend)
    await refusal(auth, "nonsense")
    assert (await auth.authenticate(md("agent-token"))).node == "node1"
    assert backend.calls == 2


@pytest.mark.parametrize("failure", ["http_500", "no_status"])
async def test_backend_error_is_not_cached(backend: Backend, failure: str) -> None:
    auth = authenticator(backend)
    backend.fail_with = 500 if failure == "http_500" else None
    backend.no_status = failure == "no_status"
    for n in (1, 2):
        e = await refusal(auth, "agent-token")
        assert type(e) is AuthBackendError and e.reason == "auth_backend_error"
        assert backend.calls == n
    backend.fail_with, backend.no_status = None, False
    assert (await auth.authenticate(md("agent-token"))).node == "node1"
    assert backend.calls == 3


async def test_hung_api_server_times_out_and_is_not_cached(backend: Backend) -> None:
    auth = authenticator(backend, request_timeout=0.3)
    backend.gate.clear()
    for n in (1, 2):
        e = await refusal(auth, "agent-token")
        assert type(e) is AuthBackendError and "timed out" in str(e).lower()
        assert backend.calls == n


async def test_unreachable_api_server_is_not_cached() -> None:
    config = k8s.Configuration()
    config.host = "http://127.0.0.1:9"
    config.retries = 0
    auth = TokenReviewAuthenticator(k8s.ApiClient(config))
    for _ in range(2):
        with pytest.raises(AuthBackendError, match="token review failed"):
            await auth.authenticate(md("agent-token"))
    assert auth.reviews == 2


async def concurrently(backend: Backend, auth: TokenReviewAuthenticator, token: str, n: int) -> list[Any]:
    """``n`` authentications of ``token`` started while the review route is held closed, then released."""
    backend.gate.clear()
    tasks = [asyncio.create_task(auth.authenticate(md(token))) for _ in range(n)]
    assert await asyncio.to_thread(backend.arrived.wait, 10)
    backend.gate.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_concurrent_acceptance_is_one_review(backend: Backend) -> None:
    auth = authenticator(backend)
    results = await concurrently(backend, auth, "agent-token", 50)
    assert all(isinstance(r, Caller) and r.node == "node1" for r in results), results
    assert backend.calls == 1
    assert (auth.reviews, auth.answered_without_review) == (1, 49)


async def test_concurrent_refusal_is_one_review(backend: Backend) -> None:
    auth = authenticator(backend)
    results = await concurrently(backend, auth, "nonsense", 50)
    assert all(type(r) is AuthenticationError and r.reason == "bad_token" for r in results), results
    assert len({id(r) for r in results}) == 50  # each waiter raised its own exception
    assert backend.calls == 1


async def test_backend_error_shared_by_its_flight_only(backend: Backend) -> None:
    auth = authenticator(backend)
    backend.fail_with = 503
    results = await concurrently(backend, auth, "agent-token", 20)
    assert all(type(r) is AuthBackendError and "HTTP 503" in str(r) for r in results), results
    assert backend.calls == 1
    backend.fail_with = None
    assert (await auth.authenticate(md("agent-token"))).node == "node1"
    assert backend.calls == 2


async def test_cancelled_waiter_leaves_others_their_answer(backend: Backend) -> None:
    auth = authenticator(backend)
    backend.gate.clear()
    first = asyncio.create_task(auth.authenticate(md("agent-token")))  # starts the review
    assert await asyncio.to_thread(backend.arrived.wait, 10)
    second = asyncio.create_task(auth.authenticate(md("agent-token")))
    await asyncio.sleep(0)  # second joins the review in flight
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    backend.gate.set()
    assert (await second).node == "node1"
    assert backend.calls == 1


async def test_review_without_waiters_still_lands_in_the_cache(backend: Backend) -> None:
    auth = authenticator(backend)
    backend.gate.clear()
    only = asyncio.create_task(auth.authenticate(md("agent-token")))
    assert await asyncio.to_thread(backend.arrived.wait, 10)
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    backend.gate.set()
    assert (await auth.authenticate(md("agent-token"))).node == "node1"  # joins the flight or hits the cache
    assert backend.calls == 1


async def test_refusal_cache_bounded_under_distinct_bad_tokens(backend: Backend) -> None:
    auth = authenticator(backend, failure_cache_size=5)
    assert (await auth.authenticate(md("agent-token"))).node == "node1"
    bad = [f"scan-{i}" for i in range(20)]
    for token in bad:
        await refusal(auth, token)
    assert backend.calls == 21
    for token in bad[-5:]:  # the newest five are remembered
        await refusal(auth, token)
    assert backend.calls == 21
    await refusal(auth, bad[-6])  # older ones were dropped: reviewed again
    assert backend.calls == 22
    # Refusals have a cache of their own: the flood did not push the accepted token out.
    assert (await auth.authenticate(md("agent-token"))).node == "node1"
    assert backend.calls == 22
