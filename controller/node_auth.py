"""Who is calling the CA: turns gRPC call metadata into the node the calling agent runs on.

Two authenticators, chosen by the controller's flags:
- :class:`NodeTokenAuthenticator` (lab): ``authorization: Bearer <token>`` matched against a JSON file
  ``{"<node>": "<token>"}`` that ``lab up`` provisions.
- :class:`TokenReviewAuthenticator` (cluster): the agent's projected service-account token (audience ``istio-ca``)
  checked with the Kubernetes TokenReview API; the token's bound pod gives the node, as istiod's node authorizer.
  Answers are cached (by default acceptances 60 s, definite refusals 10 s, API failures never), each API call gives
  up after 10 s (the controller's ``--token-review-*`` flags set both), and concurrent requests with one token share
  one review, so no caller can make the controller flood the API server.

Failures are split by what the caller can do about them: :class:`AuthenticationError` (no or bad credential ->
UNAUTHENTICATED), :class:`UntrustedCallerError` (valid credential, but not a node agent -> PERMISSION_DENIED),
:class:`AuthBackendError` (the API server failed -> UNAVAILABLE, worth retrying).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from common.log import kv

log = logging.getLogger("ambit.node_auth")

TOKEN_AUDIENCE = "istio-ca"
DEFAULT_TRUSTED_NODE_ACCOUNTS = ("istio-system/ztunnel", "ambit-system/ambit-agent")
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SA_PREFIX = "system:serviceaccount:"
# TokenReviewAuthenticator's caches; the controller's --token-review-* flags default to these.
ACCEPTED_CACHE_SECONDS = 60.0
ACCEPTED_CACHE_SIZE = 4096
REFUSED_CACHE_SECONDS = 10.0
REFUSED_CACHE_SIZE = 4096
# Each API call of a review (the TokenReview, then the caller's pod) gives up after this long: a hung API server
# must not hold a token's review, and every request waiting for it, for ever. The controller's
# --token-review-timeout-seconds sets it; agents give up on a CA call after 10 s themselves (agent/ca_client.py).
REVIEW_TIMEOUT_SECONDS = 10.0
# Reviews run in a pool of their own: with the API server hung, each holds a thread for up to two timeouts, and in
# the loop's default executor (cores + 4 threads) they would starve the other blocking work (the CA Secret's sync,
# the file source's scans). A review that waited in the queue past its two timeouts is dropped unsent.
REVIEW_WORKERS = 8

Metadata = Sequence[tuple[str, str | bytes]]


class AuthError(Exception):
    """Base: ``reason`` is the metrics label, the message goes to the caller."""

    reason = "auth_error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason:
            self.reason = reason


class AuthenticationError(AuthError):
    reason = "bad_credentials"


class UntrustedCallerError(AuthError):
    reason = "untrusted_account"


class AuthBackendError(AuthError):
    reason = "auth_backend_error"


@dataclass(frozen=True)
class Caller:
    node: str
    subject: str  # who, for logs: the node name, or "ns/sa pod ns/name"


class Authenticator(Protocol):
    async def authenticate(self, metadata: Metadata) -> Caller: ...


def bearer_token(metadata: Metadata) -> str:
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if not values:
        raise AuthenticationError("no credentials: expected `authorization: Bearer <token>` metadata", "no_credentials")
    raw = values[0]
    value = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("authorization metadata is not `Bearer <token>`", "no_credentials")
    return token.strip()


class NodeTokenAuthenticator:
    """Per-node shared secrets from a JSON file, re-read when the file changes (the lab may add nodes)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._tokens: dict[str, str] = {}
        self._reload()

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except OSError as e:
            if self._stamp is None:
                raise AuthBackendError(f"{self.path}: cannot read node tokens: {e.strerror}") from e
            log.error("node token file unreadable; keeping the previous tokens", extra=kv(file=str(self.path)))
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in data.items()
            ):
                raise ValueError('expected {"<node>": "<token>"} with non-empty strings')
        except (OSError, ValueError) as e:
            if self._stamp is None:
                raise AuthBackendError(f"{self.path}: invalid node token file: {e}") from e
            log.error(
                "node token file invalid; keeping the previous tokens", extra=kv(file=str(self.path), error=str(e))
            )
            return
        self._tokens = data
        self._stamp = stamp

    def node_for(self, token: str) -> str | None:
        self._reload()
        found = None
        # Compare against every entry so the time taken does not reveal which node (or prefix) matched.
        for node, expected in self._tokens.items():
            if hmac.compare_digest(expected.encode(), token.encode()):
                found = node
        return found

    async def authenticate(self, metadata: Metadata) -> Caller:
        node = self.node_for(bearer_token(metadata))
        if node is None:
            raise AuthenticationError("bearer token does not match any node's token", "bad_token")
        return Caller(node=node, subject=f"node {node}")


V = TypeVar("V")


class _ExpiringCache(Generic[V]):
    """A bounded map whose entries all live ``ttl`` seconds.

    With one TTL and a monotonic clock, insertion order is expiry order, so a full cache drops its oldest entry
    without scanning: a flood of new keys costs the entries it displaces, never a pass over the whole map.
    """

    def __init__(self, ttl: float, size: int) -> None:
        self.ttl = ttl
        self.size = size
        self._items: dict[bytes, tuple[float, V]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes, now: float) -> V | None:
        hit = self._items.get(key)
        if hit is None:
            return None
        if hit[0] <= now:
            del self._items[key]
            return None
        return hit[1]

    def put(self, key: bytes, value: V, now: float) -> None:
        if self.ttl <= 0 or self.size <= 0:
            return
        self._items.pop(key, None)
        while len(self._items) >= self.size:
            del self._items[next(iter(self._items))]
        self._items[key] = (now + self.ttl, value)


@dataclass(frozen=True)
class _Refusal:
    """An :class:`AuthError` kept as its parts: every answer raises a fresh exception of the same type, message
    and reason (raising one stored object again and again would grow its traceback with every request)."""

    kind: type[AuthError]
    message: str
    reason: str

    @classmethod
    def of(cls, error: AuthError) -> _Refusal:
        return cls(type(error), str(error), error.reason)

    def error(self) -> AuthError:
        return self.kind(self.message, self.reason)


class TokenReviewAuthenticator:
    """Kubernetes TokenReview + pod lookup, as istiod does for ztunnel's impersonated requests.

    The ``kubernetes`` client is synchronous; its calls run in worker threads of the authenticator's own pool
    (``workers``, see REVIEW_WORKERS) so the event loop never blocks and a hung API server starves no other work.
    Accepted tokens are remembered for ``cache_seconds`` (keyed by their SHA-256) because an agent asks once per
    workload: a node with a hundred pods would otherwise cost the API server two hundred calls per refresh round.
    The price is that a deleted agent pod keeps its access for at most that long.

    Definite refusals (the API server answered: not authenticated, wrong audience, not a node agent, pod gone...)
    are remembered for ``failure_cache_seconds``, in a cache of their own so a flood of bad tokens cannot push
    accepted ones out: an agent retrying with an expired token, or a scanner, then costs one review per token and
    TTL instead of one per request. Backend errors (unreachable, HTTP errors, malformed answers) are never
    remembered; the next request reviews again. Requests with a token whose review is in flight wait for that
    review and share its outcome, backend errors included, as the API server's own cached token authenticator
    does. The review runs in a task of its own, so a waiter that is cancelled (its call ended) leaves it running
    for the others; each API call is bounded by ``request_timeout``, so a hung API server cannot hold a token's
    review, and everyone waiting for it, forever.
    """

    def __init__(
        self,
        api_client: Any,
        *,
        audiences: Iterable[str] = (TOKEN_AUDIENCE,),
        trusted_accounts: Iterable[str] = DEFAULT_TRUSTED_NODE_ACCOUNTS,
        cache_seconds: float = ACCEPTED_CACHE_SECONDS,
        cache_size: int = ACCEPTED_CACHE_SIZE,
        failure_cache_seconds: float = REFUSED_CACHE_SECONDS,
        failure_cache_size: int = REFUSED_CACHE_SIZE,
        request_timeout: float = REVIEW_TIMEOUT_SECONDS,
        workers: int = REVIEW_WORKERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import client as k8s

        self._k8s = k8s
        self._authn = k8s.AuthenticationV1Api(api_client)
        self._core = k8s.CoreV1Api(api_client)
        self.audiences = list(audiences)
        self.trusted_accounts = frozenset(trusted_accounts)
        self.request_timeout = request_timeout
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="token-review")
        self._clock = clock
        self._accepted: _ExpiringCache[Caller] = _ExpiringCache(cache_seconds, cache_size)
        self._refused: _ExpiringCache[_Refusal] = _ExpiringCache(failure_cache_seconds, failure_cache_size)
        self._flights: dict[bytes, asyncio.Task[Caller | _Refusal]] = {}
        self.reviews = 0  # TokenReviews sent
        self.answered_without_review = 0  # from a cache or by joining a review in flight

    def _review(self, token: str) -> Caller:
        k8s = self._k8s
        body = k8s.V1TokenReview(spec=k8s.V1TokenReviewSpec(token=token, audiences=self.audiences))
        try:
            review = self._authn.create_token_review(body, _request_timeout=self.request_timeout)
        except k8s.ApiException as e:
            raise AuthBackendError(f"token review failed: HTTP {e.status} {e.reason}") from None
        status = review.status
        if status is None:
            raise AuthBackendError("token review failed: the API server's answer has no status")
        if not status.authenticated:
            detail = status.error or "not authenticated"
            raise AuthenticationError(f"token rejected by TokenReview: {detail}", "bad_token")
        if status.audiences is not None and not set(status.audiences) & set(self.audiences):
            raise AuthenticationError(
                f"token audiences {status.audiences} do not include {self.audiences}", "bad_token"
            )
        user = status.user
        username = (user.username if user else None) or ""
        if not username.startswith(SA_PREFIX) or username.count(":") != 3:
            raise AuthenticationError(f"token belongs to {username!r}, not a service account", "bad_token")
        namespace, sa = username[len(SA_PREFIX) :].split(":")
        account = f"{namespace}/{sa}"
        if account not in self.trusted_accounts:
            trusted = ", ".join(sorted(self.trusted_accounts))
            raise UntrustedCallerError(f"service account {account} is not a trusted node agent account ({trusted})")
        extra = (user.extra if user else None) or {}
        pod_name = (extra.get(POD_NAME_EXTRA) or [""])[0]
        pod_uid = (extra.get(POD_UID_EXTRA) or [""])[0]
        if not pod_name or not pod_uid:
            raise AuthenticationError(
                f"token of {account} is not bound to a pod (use a projected service-account token)", "bad_token"
            )
        try:
            pod = self._core.read_namespaced_pod(pod_name, namespace, _request_timeout=self.request_timeout)
        except k8s.ApiException as e:
            if e.status == 404:
                raise AuthenticationError(f"caller pod {namespace}/{pod_name} does not exist", "bad_token") from None
            raise AuthBackendError(f"reading pod {namespace}/{pod_name} failed: HTTP {e.status} {e.reason}") from None
        if pod.metadata is None or pod.spec is None:
            raise AuthBackendError(f"reading pod {namespace}/{pod_name} failed: no metadata or spec in the answer")
        if pod.metadata.uid != pod_uid:
            raise AuthenticationError(f"caller pod {namespace}/{pod_name} was replaced (uid mismatch)", "bad_token")
        if pod.spec.service_account_name != sa:
            raise AuthenticationError(f"caller pod {namespace}/{pod_name} does not run as {account}", "bad_token")
        if not pod.spec.node_name:
            raise AuthenticationError(f"caller pod {namespace}/{pod_name} is not scheduled on a node", "bad_token")
        return Caller(node=pod.spec.node_name, subject=f"{account} pod {namespace}/{pod_name}")

    async def authenticate(self, metadata: Metadata) -> Caller:
        token = bearer_token(metadata)
        key = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        outcome: Caller | _Refusal | None = self._accepted.get(key, now)
        if outcome is None:
            outcome = self._refused.get(key, now)
        if outcome is None:
            flight = self._flights.get(key)
            if flight is None:
                flight = asyncio.create_task(self._fly(key, token), name="token-review")
                self._flights[key] = flight
            else:
                self.answered_without_review += 1
            # shield: a waiter's cancellation must not cancel the review the other waiters are waiting for.
            outcome = await asyncio.shield(flight)
        else:
            self.answered_without_review += 1
        if isinstance(outcome, _Refusal):
            raise outcome.error()
        return outcome

    async def _fly(self, key: bytes, token: str) -> Caller | _Refusal:
        """One review, shared by every request with its token until it lands; then cached unless the backend
        failed. Returns refusals rather than raising them, so each waiter raises a fresh exception."""
        self.reviews += 1
        outcome: Caller | _Refusal
        deadline = 2 * self.request_timeout  # the review's two API calls, time in the queue included
        try:
            run = asyncio.get_running_loop().run_in_executor(self._pool, self._review, token)
            try:
                caller = await asyncio.wait_for(run, deadline)
            except TimeoutError:  # still queued behind hung reviews (a running one ends at its own timeout)
                raise AuthBackendError(f"token review timed out: not answered within {deadline:g}s") from None
        except AuthBackendError as e:
            outcome = _Refusal.of(e)
        except AuthError as e:
            outcome = _Refusal.of(e)
            self._refused.put(key, outcome, self._clock())
        except Exception as e:  # urllib3/connection errors of the client, whatever their type
            outcome = _Refusal.of(AuthBackendError(f"token review failed: {type(e).__name__}: {e}"))
        else:
            outcome = caller
            self._accepted.put(key, caller, self._clock())
        finally:
            del self._flights[key]
        log.debug(
            "token review",
            extra=kv(
                outcome=outcome.subject if isinstance(outcome, Caller) else outcome.reason,
                reviews=self.reviews,
                answered_without_review=self.answered_without_review,
            ),
        )
        return outcome


class FirstMatchAuthenticator:
    """Several credential kinds on one port (e.g. lab tokens and TokenReview): the first that accepts wins."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        if not authenticators:
            raise ValueError("at least one authenticator is required")
        self.authenticators = list(authenticators)

    async def authenticate(self, metadata: Metadata) -> Caller:
        first: AuthError | None = None
        for a in self.authenticators:
            try:
                return await a.authenticate(metadata)
            except AuthenticationError as e:
                first = first or e
        assert first is not None
        raise first


def for_xds(authenticator: Authenticator) -> Callable[[Mapping[str, str]], Awaitable[str]]:
    """The same node credentials for the xDS stream (controller.xds_server's Authenticator shape: node name or
    PermissionError), so agents present one token to both services."""

    async def authenticate(metadata: Mapping[str, str]) -> str:
        try:
            return (await authenticator.authenticate(list(metadata.items()))).node
        except AuthError as e:
            raise PermissionError(str(e)) from None

    return authenticate
