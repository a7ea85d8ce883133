"""Istio CRDs installed after the controller started are watched as soon as they are Established, as istiod's CRD
watcher starts a kind's informer when its CRD appears (pkg/kube/kclient/crdwatcher.go); before, a missing kind was
looked for again only every 30-60 s. Without the RBAC grant to read CRDs, that poll stays as the fallback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.monitoring import ControllerMetrics
from controller.sources import kube
from controller.sources.kube import KubeSource, api_client
from controller.store import ConfigStore
from controller.translate import Translator
from tests.support.fake_kube import CRD_PATH, FakeKube, deny_policy, namespace, pod, serve
from tests.support.xds_controller import wait_for

POLICIES = "/apis/security.istio.io/v1/authorizationpolicies"
OLD_POLICIES = "/apis/security.istio.io/v1beta1/authorizationpolicies"
POLICY = ("AuthorizationPolicy", "demo", "no-evil")


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with serve() as f:
        f.upsert(namespace("demo"))
        f.upsert(pod("web-0", "10.1.0.1"))
        f.upsert(deny_policy("no-evil"))
        yield f


def lists(fake: FakeKube, path: str) -> int:
    return fake.count("GET", path, watch=False)


async def started(fake: FakeKube, tmp_path: Path, backoff_max: float) -> KubeSource:
    store = ConfigStore(Translator(), ControllerMetrics())
    src = KubeSource(
        store,
        api_client(str(fake.write_kubeconfig(tmp_path / "kc"))),
        backoff_initial=0.05,
        backoff_max=backoff_max,
    )
    await asyncio.wait_for(src.start(), 20)
    return src


async def test_a_crd_installed_after_start_is_watched_once_established(fake: FakeKube, tmp_path: Path) -> None:
    """The policy CRD is missing at start; created, it is not listed before it is Established (it would be 404),
    and listed as soon as it is. The poll is an hour here, so only the CRD watch can find it (fails before: the
    kind was looked for again only after backoff_max)."""
    path, coll = fake.remove_kind("AuthorizationPolicy")
    src = await started(fake, tmp_path, backoff_max=3600.0)
    try:
        watcher = next(w for w in src._watchers if w.resource.kind == "AuthorizationPolicy")
        assert watcher.missing and POLICY not in src.store.translator.objects()
        await wait_for(lambda: fake.open_watches(CRD_PATH) == 1, what="the CRD watch")
        tried = lists(fake, POLICIES), lists(fake, OLD_POLICIES)

        fake.install_kind(path, coll, established=False)
        crds = src.crds
        assert crds is not None
        created = str(fake.resource_version)
        await wait_for(lambda: crds.resource_version == created, what="the CRD watch read the CRD's creation")
        assert crds.served("authorizationpolicies.security.istio.io") == frozenset()
        assert (lists(fake, POLICIES), lists(fake, OLD_POLICIES)) == tried  # not Established: nothing served yet

        fake.install_kind(path, coll)  # Established: served from now on
        await wait_for(lambda: POLICY in src.store.translator.objects(), what="the policy of the new CRD", limit=10)
        assert not watcher.missing and watcher.resource.version == "v1"
        fake.upsert(deny_policy("no-evil-2"))
        key = ("AuthorizationPolicy", "demo", "no-evil-2")
        await wait_for(lambda: key in src.store.translator.objects(), what="watched after the list")
    finally:
        src.stop()


async def test_a_deleted_crd_installed_again_is_watched_again(fake: FakeKube, tmp_path: Path) -> None:
    """A CRD deleted (its kind keeps its objects at the agents, as before) and installed again: the kind is
    listed again once the CRD is back, not at the next poll."""
    src = await started(fake, tmp_path, backoff_max=3600.0)
    try:
        watcher = next(w for w in src._watchers if w.resource.kind == "AuthorizationPolicy")
        await wait_for(lambda: fake.open_watches(POLICIES) == 1, what="policy watch")
        path, coll = fake.remove_kind("AuthorizationPolicy")
        fake.drop_watches()
        await wait_for(lambda: watcher.missing, what="the kind no longer served")
        assert POLICY in src.store.translator.objects()  # kept
        coll.items.pop(("demo", "no-evil"))
        fake.upsert(namespace("other"))  # moves the version on: what the next list returns
        fake.install_kind(path, coll)
        await wait_for(lambda: POLICY not in src.store.translator.objects(), what="listed again", limit=10)
        assert not watcher.missing
    finally:
        src.stop()


async def test_without_the_grant_to_read_crds_the_poll_remains(fake: FakeKube, tmp_path: Path) -> None:
    """RBAC refuses reading CRDs (403): a missing kind is still found, by the poll of backoff_max (short here).
    Passes before too (the poll was all there was): a guard for the fallback."""
    fake.forbidden.add(CRD_PATH)
    path, coll = fake.remove_kind("AuthorizationPolicy")
    src = await started(fake, tmp_path, backoff_max=0.3)
    try:
        assert src.crds is not None
        await wait_for(lambda: lists(fake, CRD_PATH) >= 1, what="the CRD list refused")
        fake.install_kind(path, coll)
        await wait_for(lambda: POLICY in src.store.translator.objects(), what="found by the poll", limit=10)
        assert src.crds.polling
    finally:
        src.stop()


def test_a_crd_counts_only_once_established_and_at_the_versions_it_serves() -> None:
    conditions: list[dict[str, str]] = [{"type": "NamesAccepted", "status": "True"}]
    crd: dict[str, Any] = {
        "metadata": {"name": "authorizationpolicies.security.istio.io"},
        "spec": {"versions": [{"name": "v1", "served": True}, {"name": "v1beta1", "served": False}]},
        "status": {"conditions": conditions},
    }
    assert kube._crd_entry(crd) == ("authorizationpolicies.security.istio.io", frozenset())
    conditions.append({"type": "Established", "status": "True"})
    assert kube._crd_entry(crd) == ("authorizationpolicies.security.istio.io", frozenset({"v1"}))
    assert kube._crd_entry({"metadata": "junk"}) is None
