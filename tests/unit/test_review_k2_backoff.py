"""The kube source paces its retries as client-go's reflector does: wait.NewExponentialBackoffManager(800ms, 30s,
2m, 2.0, jitter 1.0) (tools/cache/reflector.go NewReflectorWithOptions), and a watch that ends in 410 Gone is
listed again only after that backoff (the reflector's Run is wait.BackoffUntil around ListAndWatch, which returns
on an expired watch)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.monitoring import ControllerMetrics
from controller.sources import kube
from controller.sources.kube import KubeSource, api_client
from controller.store import ConfigStore
from controller.translate import Translator
from tests.support.fake_kube import FakeKube, namespace, pod, serve
from tests.support.xds_controller import wait_for

PODS = "/api/v1/pods"


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with serve() as f:
        f.upsert(namespace("demo"))
        for i in range(3):
            f.upsert(pod(f"web-{i}", f"10.1.0.{i + 1}"))
        yield f


def test_the_backoff_is_client_gos(monkeypatch: pytest.MonkeyPatch) -> None:
    """0.8 s, doubling, capped at 30 s; the jitter adds up to as much again; reset after 2 minutes without a wait
    (apimachinery wait.exponentialBackoffManagerImpl.getNextBackoff). Fails before: the first wait was 0.2 s and
    there was no time-based reset (every successful watch reset it instead)."""
    now = [1000.0]
    monkeypatch.setattr(kube.random, "random", lambda: 0.0)
    backoff = kube.Backoff(clock=lambda: now[0])
    steps = [backoff.next() for _ in range(9)]
    assert steps == [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0]
    now[0] += 119.0  # not long enough: still at the cap
    assert backoff.next() == 30.0
    now[0] += 121.0  # more than two minutes since the last wait began
    assert backoff.next() == 0.8
    monkeypatch.setattr(kube.random, "random", lambda: 0.999)
    assert 3.19 < backoff.next() < 3.2
    src = KubeSource(ConfigStore(Translator(), ControllerMetrics()), api=None)
    assert {(w.backoff.initial, w.backoff.cap, w.backoff.reset_after) for w in src._watchers} == {(0.8, 30.0, 120.0)}


async def test_a_watch_expired_with_410_is_listed_again_after_the_backoff(fake: FakeKube, tmp_path: Path) -> None:
    """A compaction expires the watches of every resource of every replica together; client-go waits the backoff
    before the list (the relist is a full list). Fails before: the list came at once."""
    store = ConfigStore(Translator(), ControllerMetrics())
    src = KubeSource(store, api_client(str(fake.write_kubeconfig(tmp_path / "kc"))), backoff_initial=0.5)
    await asyncio.wait_for(src.start(), 20)
    try:
        await wait_for(lambda: fake.open_watches(PODS) == 1, what="pod watch open")
        with fake.cond:  # a deletion the watch never delivers: only the relist shows it
            del fake.collection("Pod").items[("demo", "web-0")]
        expired_at = time.monotonic()
        fake.expire("Pod")
        await wait_for(lambda: fake.count("GET", PODS, watch=False) == 2, what="the list after the 410")
        with fake.cond:
            listed_at = [t for t, (_, p, q) in zip(fake.request_times, fake.requests, strict=True) if p == PODS][-1]
        assert listed_at - expired_at >= 0.5  # the backoff's first step, jittered upwards only
        await wait_for(lambda: ("Pod", "demo", "web-0") not in store.translator.objects(), what="the relist's deletion")
    finally:
        src.stop()


async def test_a_watch_broken_after_it_ran_is_resumed_at_once(fake: FakeKube, tmp_path: Path) -> None:
    """A watch stream that breaks after it ran (the connection lost or reset) is watched again at once from the
    last version, as client-go's reflector does (its StreamWatcher ends the watch, handleWatch returns no error
    unless the watch was very short); only a failed request is backed off. The backoff is 30 s here: fails before
    (every broken stream waited the backoff, now 0.8-1.6 s, before this series 0.2-0.4 s)."""
    store = ConfigStore(Translator(), ControllerMetrics())
    src = KubeSource(store, api_client(str(fake.write_kubeconfig(tmp_path / "kc"))), backoff_initial=30.0)
    await asyncio.wait_for(src.start(), 20)
    try:
        await wait_for(lambda: fake.open_watches(PODS) == 1, what="pod watch open")
        fake.upsert(pod("web-7", "10.1.0.7"))
        version = str(fake.resource_version)
        await wait_for(lambda: ("Pod", "demo", "web-7") in store.translator.objects(), what="an event")
        fake.drop_watches()
        fake.upsert(pod("web-8", "10.1.0.8"))
        await wait_for(lambda: ("Pod", "demo", "web-8") in store.translator.objects(), limit=10, what="resumed")
        assert fake.count("GET", PODS, watch=False) == 1  # resumed, not listed again
        with fake.cond:
            watches = [q for (_, p, q) in fake.requests if p == PODS and q.get("watch") == "true"]
        assert watches[-1]["resourceVersion"] == version
    finally:
        src.stop()
