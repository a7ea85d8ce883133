"""The TokenReview caches' sizes and lifetimes are controller flags: each value reaches the authenticator the
controller builds for ``--kube``, seen from outside by how many reviews the fake API server receives."""

from __future__ import annotations

import pytest
from kubernetes import client as k8s

from common import flags
from controller import node_auth
from controller.main import ControllerConfig
from tests.support.fake_kube_identity import TokenIdentity
from tests.unit.test_ca_token_cache import Backend, backend, md, refusal

__all__ = ["backend"]  # the fake API server fixture, shared with the cache's own tests


def authenticator(backend: Backend, *argv: str) -> node_auth.TokenReviewAuthenticator:
    # A second token of the same agent pod: two accepted tokens to fill the cache with.
    backend.table.tokens["other-agent"] = TokenIdentity("ambit-system", "ambit-agent", "agent-x1", "uid-1")
    cfg = flags.parse(ControllerConfig, ["--kube", *argv])
    api = k8s.Configuration()
    api.host = backend.url
    return cfg.token_review(k8s.ApiClient(api))


def test_defaults_are_the_authenticators_own() -> None:
    cfg = flags.parse(ControllerConfig, ["--kube"])
    assert (
        cfg.token_review_cache_seconds,
        cfg.token_review_cache_size,
        cfg.token_review_failure_cache_seconds,
        cfg.token_review_failure_cache_size,
    ) == (60.0, 4096, 10.0, 4096)


def test_environment_sets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMBIT_TOKEN_REVIEW_CACHE_SECONDS", "5")
    monkeypatch.setenv("AMBIT_TOKEN_REVIEW_FAILURE_CACHE_SIZE", "7")
    cfg = flags.parse(ControllerConfig, ["--kube"])
    assert (cfg.token_review_cache_seconds, cfg.token_review_failure_cache_size) == (5.0, 7)


@pytest.mark.parametrize(
    "flag",
    [
        "--token-review-cache-seconds",
        "--token-review-cache-size",
        "--token-review-failure-cache-seconds",
        "--token-review-failure-cache-size",
    ],
)
def test_a_negative_value_is_a_usage_error(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        flags.parse(ControllerConfig, ["--kube", flag, "-1"])
    assert exc.value.code == 2
    assert f"{flag}: must not be negative" in capsys.readouterr().err


async def test_by_default_an_accepted_token_is_reviewed_once(backend: Backend) -> None:
    auth = authenticator(backend)
    for token in ("agent-token", "other-agent", "agent-token", "other-agent"):
        assert (await auth.authenticate(md(token))).node == "node1"
    assert backend.calls == 2


async def test_cache_seconds_zero_reviews_every_request(backend: Backend) -> None:
    auth = authenticator(backend, "--token-review-cache-seconds", "0")
    for _ in range(3):
        assert (await auth.authenticate(md("agent-token"))).node == "node1"
    assert backend.calls == 3


async def test_cache_size_bounds_the_accepted_tokens_kept(backend: Backend) -> None:
    auth = authenticator(backend, "--token-review-cache-size", "1")
    for token in ("agent-token", "other-agent", "agent-token"):  # the second pushes the first out
        assert (await auth.authenticate(md(token))).node == "node1"
    assert backend.calls == 3
    assert (await auth.authenticate(md("agent-token"))).node == "node1"  # the one kept
    assert backend.calls == 3


async def test_failure_cache_flags(backend: Backend) -> None:
    kept = authenticator(backend)
    for _ in range(2):
        await refusal(kept, "nonsense")
    assert backend.calls == 1
    unkept = authenticator(backend, "--token-review-failure-cache-seconds", "0")
    for _ in range(2):
        await refusal(unkept, "nonsense")
    assert backend.calls == 3
    small = authenticator(backend, "--token-review-failure-cache-size", "1")
    for token in ("nonsense", "garbage", "nonsense"):
        await refusal(small, token)
    assert backend.calls == 6
