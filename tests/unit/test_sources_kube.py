"""The Kubernetes source with the official client against the fake API server (real list/watch wire format)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.monitoring import ControllerMetrics
from controller.sources.kube import KubeSource, api_client, iter_lines
from controller.store import ConfigStore
from controller.translate import Translator
from tests.support.fake_kube import FakeKube, deny_policy, namespace, pod, serve
from tests.support.xds_controller import wait_for


def workloads(store: ConfigStore) -> dict[str, str]:
    return {
        a.workload.name: socket.inet_ntoa(a.workload.addresses[0])
        for a in store.translator.addresses().values()
        if a.HasField("workload")
    }


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with serve() as f:
        f.upsert(namespace("demo"))
        f.upsert(pod("web-0", "10.1.0.1"))
        f.upsert(deny_policy("no-evil"))
        yield f


@pytest.fixture
async def source(fake: FakeKube, tmp_path: Path) -> AsyncIterator[KubeSource]:
    store = ConfigStore(Translator(), ControllerMetrics())
    src = KubeSource(store, api_client(str(fake.write_kubeconfig(tmp_path / "kubeconfig"))), backoff_initial=0.05)
    await asyncio.wait_for(src.start(), 20)
    try:
        yield src
    finally:
        src.stop()


def test_iter_lines_joins_chunks() -> None:
    chunks = [b'{"a":', b'1}\n{"b"', b":2}\n\n", b'{"c":3}']
    assert list(iter_lines(iter(chunks))) == [b'{"a":1}', b'{"b":2}', b'{"c":3}']


async def test_initial_list_then_added_modified_deleted(fake: FakeKube, source: KubeSource) -> None:
    store = source.store
    assert workloads(store) == {"web-0": "10.1.0.1"}
    assert "demo/no-evil" in store.translator.authorizations()
    fake.upsert(pod("web-1", "10.1.0.2"))
    await wait_for(lambda: workloads(store).get("web-1") == "10.1.0.2", what="ADDED pod")
    fake.upsert(pod("web-1", "10.1.0.3"))
    await wait_for(lambda: workloads(store).get("web-1") == "10.1.0.3", what="MODIFIED pod")
    fake.delete("AuthorizationPolicy", "demo", "no-evil")
    await wait_for(lambda: "demo/no-evil" not in store.translator.authorizations(), what="DELETED policy")
    fake.delete("Pod", "demo", "web-0")
    await wait_for(lambda: "web-0" not in workloads(store), what="DELETED pod")
    assert source.lists == len(source.resources)  # no re-list was needed


async def test_invalid_object_reported_with_kube_source_name(fake: FakeKube, source: KubeSource) -> None:
    fake.upsert(pod("web-0", "999.1.1.1"))
    await wait_for(lambda: source.store.errors(), what="validation error")
    assert source.store.errors()[0].startswith("kube:Pod/demo/web-0: status.podIP")
    assert workloads(source.store)["web-0"] == "10.1.0.1"  # last valid version keeps serving


async def test_bookmark_advances_version_without_changes(fake: FakeKube, source: KubeSource) -> None:
    generation = source.store.generation
    fake.bookmark("Pod")
    watcher = next(w for w in source._watchers if w.resource.kind == "Pod")
    await wait_for(lambda: watcher.resource_version == str(fake.resource_version), what="bookmark version")
    assert source.store.generation == generation
    # The next drop resumes from the bookmark's version, not from the list's.
    fake.drop_watches()
    fake.upsert(pod("web-2", "10.1.0.4"))
    await wait_for(lambda: "web-2" in workloads(source.store), what="event after resume")
    watches = [q for m, p, q in fake.requests if p == "/api/v1/pods" and q.get("watch") == "true"]
    assert int(watches[-1]["resourceVersion"]) >= int(watches[0]["resourceVersion"]) + 1
    assert fake.count("GET", "/api/v1/pods", watch=False) == 1


async def test_dropped_watch_resumes_without_relist(fake: FakeKube, source: KubeSource) -> None:
    await wait_for(lambda: fake.open_watches("/api/v1/pods") == 1, what="pod watch open")
    fake.drop_watches()
    fake.upsert(pod("web-1", "10.1.0.2"))  # happens while no watch is open, or just as it reopens
    await wait_for(lambda: "web-1" in workloads(source.store), what="event after a dropped watch")
    assert fake.count("GET", "/api/v1/pods", watch=False) == 1
    assert fake.count("GET", "/api/v1/pods", watch=True) >= 2


async def test_expired_watch_relists_and_removes_what_vanished(fake: FakeKube, source: KubeSource) -> None:
    # Changes the watch never delivers (history compacted): only a re-list can reveal them.
    with fake.cond:
        fake.collections["/api/v1/pods"].items.pop(("demo", "web-0"))
        fake.resource_version += 1
    fake.upsert(pod("web-5", "10.1.0.5"))
    fake.expire("Pod")
    await wait_for(lambda: fake.count("GET", "/api/v1/pods", watch=False) == 2, what="re-list after 410")
    await wait_for(lambda: workloads(source.store) == {"web-5": "10.1.0.5"}, what="state after re-list")


async def test_list_errors_back_off_and_retry(fake: FakeKube, tmp_path: Path) -> None:
    fake.fail_lists = 3
    store = ConfigStore(Translator(), ControllerMetrics())
    src = KubeSource(store, api_client(str(fake.write_kubeconfig(tmp_path / "kc"))), backoff_initial=0.02)
    try:
        await asyncio.wait_for(src.start(), 20)
        assert workloads(store) == {"web-0": "10.1.0.1"}
        assert sum(fake.count("GET", r.path, watch=False) for r in src.resources) == len(src.resources) + 3
    finally:
        src.stop()


async def test_resource_the_api_does_not_serve_counts_as_empty(fake: FakeKube, tmp_path: Path) -> None:
    del fake.collections["/apis/security.istio.io/v1/peerauthentications"]  # CRD not installed: 404
    store = ConfigStore(Translator(), ControllerMetrics())
    src = KubeSource(store, api_client(str(fake.write_kubeconfig(tmp_path / "kc"))), backoff_initial=0.02)
    try:
        await asyncio.wait_for(src.start(), 20)
        assert workloads(store) == {"web-0": "10.1.0.1"}
        assert next(w for w in src._watchers if w.resource.kind == "PeerAuthentication").missing
    finally:
        src.stop()


async def test_fields_newer_than_this_code_are_accepted_from_the_api(fake: FakeKube, source: KubeSource) -> None:
    newer = pod("web-9", "10.1.0.9")
    newer["spec"]["someFutureField"] = {"enabled": True}
    fake.upsert(newer)
    await wait_for(lambda: "web-9" in workloads(source.store), what="pod with an unknown field")
    assert source.store.errors() == []


async def test_older_istio_crd_version_is_used_when_v1_is_not_served(fake: FakeKube, tmp_path: Path) -> None:
    fake.serve_version("PeerAuthentication", "v1beta1")
    fake.upsert(
        {
            "apiVersion": "security.istio.io/v1beta1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "istio-system"},
            "spec": {"mtls": {"mode": "STRICT"}},
        }
    )
    store = ConfigStore(Translator(), ControllerMetrics())
    src = KubeSource(store, api_client(str(fake.write_kubeconfig(tmp_path / "kc"))), backoff_initial=0.02)
    try:
        await asyncio.wait_for(src.start(), 20)
        assert ("PeerAuthentication", "istio-system", "default") in store.translator.objects()
        assert store.errors() == []
        watcher = next(w for w in src._watchers if w.resource.kind == "PeerAuthentication")
        assert watcher.resource.version == "v1beta1" and not watcher.missing
    finally:
        src.stop()


async def test_a_list_the_store_fails_on_still_counts_as_synced(
    fake: FakeKube, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that raises on the first list must not leave start() waiting for that resource forever."""

    class FailingStore(ConfigStore):
        def update(self, changes: dict[str, object]) -> None:  # type: ignore[override]
            raise RuntimeError("translator bug")

    src = KubeSource(
        FailingStore(Translator(), ControllerMetrics()),
        api_client(str(fake.write_kubeconfig(tmp_path / "kc"))),
        backoff_initial=0.02,
    )
    try:
        await asyncio.wait_for(src.start(), 20)
    finally:
        src.stop()
    assert any("applying a kube list failed" in r.getMessage() for r in caplog.records)
