"""Caller authentication: bearer parsing, the lab's node token file, and TokenReview through the real client."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client as k8s

from controller.node_auth import (
    AuthBackendError,
    AuthenticationError,
    NodeTokenAuthenticator,
    TokenReviewAuthenticator,
    UntrustedCallerError,
    bearer_token,
    for_xds,
)
from tests.support.fake_kube import serve
from tests.support.fake_kube_identity import TokenIdentity, TokenReviews, install, pod


@pytest.mark.parametrize(
    ("md", "token"),
    [
        ([("authorization", "Bearer abc")], "abc"),
        ([("Authorization", "bearer  abc ")], "abc"),
        ([("authorization", b"Bearer abc")], "abc"),
        ([("x-other", "1"), ("authorization", "Bearer t")], "t"),
    ],
)
def test_bearer_token_parsed(md: list[tuple[str, str | bytes]], token: str) -> None:
    assert bearer_token(md) == token


@pytest.mark.parametrize("md", [[], [("authorization", "Basic abc")], [("authorization", "Bearer ")]])
def test_bearer_token_missing(md: list[tuple[str, str]]) -> None:
    with pytest.raises(AuthenticationError) as exc:
        bearer_token(md)
    assert exc.value.reason == "no_credentials"


async def test_token_file_maps_token_to_node(tmp_path: Path) -> None:
    f = tmp_path / "tokens.json"
    f.write_text(json.dumps({"node1": "aaa", "node2": "bbb"}))
    auth = NodeTokenAuthenticator(f)
    assert (await auth.authenticate([("authorization", "Bearer bbb")])).node == "node2"
    for wrong in ("aa", "aaaa", "AAA", "node1"):
        with pytest.raises(AuthenticationError, match="does not match"):
            await auth.authenticate([("authorization", f"Bearer {wrong}")])


async def test_token_file_reloaded_and_bad_edit_keeps_last_good(tmp_path: Path) -> None:
    f = tmp_path / "tokens.json"
    f.write_text(json.dumps({"node1": "aaa"}))
    auth = NodeTokenAuthenticator(f)
    f.write_text(json.dumps({"node1": "aaa", "node3": "ccc"}))
    os.utime(f, ns=(1, 10**18))
    assert (await auth.authenticate([("authorization", "Bearer ccc")])).node == "node3"
    f.write_text("{not json")
    os.utime(f, ns=(1, 2 * 10**18))
    assert (await auth.authenticate([("authorization", "Bearer ccc")])).node == "node3"


@pytest.mark.parametrize("content", ["{bad", '["a"]', '{"node1": ""}', '{"node1": 5}'])
def test_token_file_invalid_at_start_is_an_error(tmp_path: Path, content: str) -> None:
    f = tmp_path / "tokens.json"
    f.write_text(content)
    with pytest.raises(AuthBackendError, match=r"tokens\.json"):
        NodeTokenAuthenticator(f)


@dataclass
class Kube:
    url: str
    table: TokenReviews


@pytest.fixture
def kube() -> Iterator[Kube]:
    with serve() as fake:
        table = install(fake)
        table.tokens["agent-token"] = TokenIdentity("ambit-system", "ambit-agent", "agent-x1", "uid-1")
        table.tokens["ztunnel-token"] = TokenIdentity("istio-system", "ztunnel", "ztunnel-x2", "uid-2")
        table.tokens["app-token"] = TokenIdentity("default", "web", "web-1", "uid-3")
        table.tokens["unbound-token"] = TokenIdentity("ambit-system", "ambit-agent")
        table.tokens["stale-token"] = TokenIdentity("ambit-system", "ambit-agent", "agent-x1", "uid-old")
        table.tokens["gone-token"] = TokenIdentity("ambit-system", "ambit-agent", "agent-gone", "uid-9")
        table.tokens["wrong-aud"] = TokenIdentity("ambit-system", "ambit-agent", "agent-x1", "uid-1", ["kubernetes"])
        fake.upsert(pod("ambit-system", "agent-x1", "uid-1", "ambit-agent", "node1"))
        fake.upsert(pod("istio-system", "ztunnel-x2", "uid-2", "ztunnel", "node2"))
        yield Kube(fake.url, table)


def _authenticator(url: str) -> TokenReviewAuthenticator:
    config = k8s.Configuration()
    config.host = url
    return TokenReviewAuthenticator(k8s.ApiClient(config))


def md(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def test_token_review_gives_callers_node(kube: Kube) -> None:
    auth = _authenticator(kube.url)
    caller = await auth.authenticate(md("agent-token"))
    assert caller.node == "node1"
    assert "ambit-system/ambit-agent" in caller.subject
    assert (await auth.authenticate(md("ztunnel-token"))).node == "node2"
    assert kube.table.reviews[0]["spec"] == {"token": "agent-token", "audiences": ["istio-ca"]}


@pytest.mark.parametrize(
    ("token", "error", "text"),
    [
        ("nonsense", AuthenticationError, "rejected by TokenReview"),
        ("wrong-aud", AuthenticationError, "rejected by TokenReview"),
        ("app-token", UntrustedCallerError, "default/web is not a trusted node agent"),
        ("unbound-token", AuthenticationError, "not bound to a pod"),
        ("stale-token", AuthenticationError, "uid mismatch"),
        ("gone-token", AuthenticationError, "does not exist"),
    ],
)
async def test_token_review_refusals(kube: Kube, token: str, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        await _authenticator(kube.url).authenticate(md(token))


async def test_token_review_api_failure_is_backend_error(kube: Kube) -> None:
    kube.table.fail_with = 500
    with pytest.raises(AuthBackendError, match="HTTP 500"):
        await _authenticator(kube.url).authenticate(md("agent-token"))


async def test_token_review_unreachable_is_backend_error() -> None:
    config = k8s.Configuration()
    config.host = "http://127.0.0.1:9"
    config.retries = 0
    with pytest.raises(AuthBackendError, match="token review failed"):
        await TokenReviewAuthenticator(k8s.ApiClient(config)).authenticate(md("agent-token"))


async def test_for_xds_adapter_returns_node_or_permission_error(tmp_path: Path) -> None:
    f = tmp_path / "tokens.json"
    f.write_text(json.dumps({"node1": "aaa"}))
    check = for_xds(NodeTokenAuthenticator(f))
    assert await check({"authorization": "Bearer aaa"}) == "node1"
    with pytest.raises(PermissionError, match="does not match"):
        await check({"authorization": "Bearer zzz"})
