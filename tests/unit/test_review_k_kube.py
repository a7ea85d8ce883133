"""The kube source against client-go's reflector on what a busy or unhealthy API server does: watches it ends at
once or cuts in the middle of an event, events for objects never announced, 429s and 5xx with Retry-After, lists
too large for one response (limit/continue, an expired continue token), and retries and watch timeouts of many
controllers that must not stay in step (jitter)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import configuration as kube_configuration

from controller.monitoring import ControllerMetrics
from controller.sources import kube
from controller.sources.kube import KubeSource, api_client
from controller.store import ConfigStore
from controller.translate import Translator
from controller.validation import parse_documents
from tests.support.fake_kube import FakeKube, namespace, pod, serve
from tests.support.xds_controller import wait_for

PODS = "/api/v1/pods"


def workloads(store: ConfigStore) -> set[str]:
    return {a.workload.name for a in store.translator.addresses().values() if a.HasField("workload")}


def requests(fake: FakeKube, path: str, watch: bool) -> list[tuple[float, dict[str, str]]]:
    """(arrival time, query) of each list or watch request of ``path``."""
    with fake.cond:
        timed = list(zip(fake.request_times, fake.requests, strict=True))
    return [(t, q) for t, (_, p, q) in timed if p == path and (q.get("watch") == "true") == watch]


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with serve() as f:
        f.upsert(namespace("demo"))
        for i in range(5):
            f.upsert(pod(f"web-{i}", f"10.1.0.{i + 1}"))
        yield f


def new_source(fake: FakeKube, tmp_path: Path, **kwargs: Any) -> KubeSource:
    store = ConfigStore(Translator(), ControllerMetrics())
    return KubeSource(store, api_client(str(fake.write_kubeconfig(tmp_path / "kubeconfig"))), **kwargs)


@pytest.fixture
async def started(fake: FakeKube, tmp_path: Path) -> AsyncIterator[KubeSource]:
    src = new_source(fake, tmp_path, backoff_initial=0.1)
    await asyncio.wait_for(src.start(), 20)
    try:
        yield src
    finally:
        src.stop()


async def test_a_watch_the_server_ends_at_once_is_retried_after_a_backoff(fake: FakeKube, started: KubeSource) -> None:
    """An API server going away (or a proxy in front of it) may answer each watch with an empty stream it ends
    at once. client-go's reflector counts a watch shorter than a second without an event as an error and backs off
    (tools/cache/reflector.go watchHandler: "very short watch"); resuming at once is a tight loop of requests."""
    await wait_for(lambda: fake.open_watches(PODS) == 1, what="pod watch open")
    fake.short_watches[PODS] = 3
    fake.drop_watches()
    await wait_for(lambda: fake.short_watches[PODS] == 0 and fake.open_watches(PODS) == 1, what="watch back")
    times = [t for t, _ in requests(fake, PODS, watch=True)][-4:]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.1 for gap in gaps[1:]), gaps  # each short watch waited for the backoff (or more)
    fake.upsert(pod("web-9", "10.1.0.9"))
    await wait_for(lambda: "web-9" in workloads(started.store), what="events after the short watches")
    assert len(requests(fake, PODS, watch=False)) == 1  # resumed from the version, never listed again


@pytest.mark.parametrize("ended", [False, True], ids=["connection-lost", "body-ended"])
async def test_a_watch_cut_in_the_middle_of_an_event_resumes_from_the_last_version(
    fake: FakeKube, started: KubeSource, ended: bool
) -> None:
    """A watch cut in the middle of an event's line: the half line is no event and no reason to list again
    (client-go's StreamWatcher ends the watch on the unexpected EOF; the reflector resumes from the version of the
    last whole event), and the cut event comes again on the resumed watch. With the connection lost this passed
    before (urllib3 raises on the cut chunk); a body ended properly after half a line (a proxy relaying a lost
    upstream) was read as a malformed event and cost a full list of the resource."""
    fake.end_mid_event = ended
    await wait_for(lambda: fake.open_watches(PODS) == 1, what="pod watch open")
    fake.upsert(pod("web-7", "10.1.0.7"))
    version = str(fake.resource_version)
    await wait_for(lambda: "web-7" in workloads(started.store), what="whole event")
    fake.cut_next_event.add(PODS)
    fake.upsert(pod("web-8", "10.1.0.8"))
    await wait_for(lambda: "web-8" in workloads(started.store), what="the cut event, again after the resume")
    assert PODS not in fake.cut_next_event  # it was cut
    assert len(requests(fake, PODS, watch=False)) == 1
    assert requests(fake, PODS, watch=True)[-1][1]["resourceVersion"] == version


async def test_a_modified_never_seen_is_an_add_and_a_deleted_takes_its_last_state(
    fake: FakeKube, started: KubeSource
) -> None:
    """A watch may deliver MODIFIED for an object it never announced (its ADDED compacted away before a resume) and
    DELETED carries the object's last state, not the one we hold: the first is an add (client-go's store.Update
    adds what it lacks), the second removes by name whatever the state. Passes before: a guard."""
    coll = fake.collection("Pod")
    with fake.cond:
        coll.items[("demo", "web-6")] = fake._record(coll, "MODIFIED", pod("web-6", "10.1.0.6"))
    await wait_for(lambda: "web-6" in workloads(started.store), what="MODIFIED of an object never seen")
    last = pod("web-6", "10.1.0.66")
    last["metadata"]["labels"] = {"app": "renamed"}
    with fake.cond:
        del coll.items[("demo", "web-6")]
        fake._record(coll, "DELETED", last)
    await wait_for(lambda: "web-6" not in workloads(started.store), what="DELETED with a newer last state")
    assert len(requests(fake, PODS, watch=False)) == 1


@pytest.mark.parametrize("status", [429, 500])
async def test_retry_after_is_waited_for(fake: FakeKube, tmp_path: Path, status: int) -> None:
    """Priority and fairness rejects with 429 and Retry-After, an API server in trouble answers 5xx with it;
    client-go's REST client waits that long before the retry (rest/with_retry.go checkWait: 429 or any 5xx with
    Retry-After). urllib3's default Retry already did for 429 (and 503); a 500 was retried after our own 20 ms."""
    fake.fail_lists = 1
    fake.fail_list_status = status
    fake.fail_list_retry_after = "1"
    src = new_source(fake, tmp_path, backoff_initial=0.02)
    try:
        await asyncio.wait_for(src.start(), 20)
    finally:
        src.stop()
    assert workloads(src.store) == {f"web-{i}" for i in range(5)}
    lists = [t for path in {r.path for r in src.resources} for t, _ in requests(fake, path, watch=False)]
    # The rejected list and its retry: the only path with two lists.
    retried = [r.path for r in src.resources if len(requests(fake, r.path, watch=False)) == 2]
    assert len(retried) == 1 and len(lists) == len(src.resources) + 1
    (first, _), (second, _) = requests(fake, retried[0], watch=False)
    assert second - first >= 1.0


def test_retries_are_jittered() -> None:
    """Every resource of every controller replica fails together when the API server restarts; client-go spreads
    their retries (wait.NewExponentialBackoffManager(800ms, 30s, 2m, 2.0, jitter 1.0) in NewReflectorWithOptions):
    each wait is between the backoff and twice it. Without jitter they all come back in the same instant."""
    store = ConfigStore(Translator(), ControllerMetrics())
    src = KubeSource(store, api=None, backoff_initial=0.2, backoff_max=30.0)
    waits: list[float] = []
    watchers = src._watchers
    for w in watchers:
        w.stopped.wait = lambda timeout=None: bool(waits.append(timeout or 0.0))  # type: ignore[method-assign,func-returns-value]
        w._failed("HTTP 503: Service Unavailable")
    assert all(0.2 <= t <= 0.4 for t in waits), waits
    assert len(set(waits)) > 1, waits
    # The backoff doubles up to backoff_max; the jitter adds up to as much again (client-go's stop at [30, 60) s).
    for _ in range(12):
        watchers[0]._failed("HTTP 503: Service Unavailable")
    assert 30.0 <= waits[-1] < 60.0 and max(waits) < 60.0, waits[-3:]


def test_watch_timeouts_are_spread() -> None:
    """client-go asks for a watch timeout between 5 and 10 minutes at random (reflector.go watch: minWatchTimeout *
    (rand + 1)), so that the watches of all resources and replicas do not all end and reconnect in the same second."""
    store = ConfigStore(Translator(), ControllerMetrics())
    src = KubeSource(store, api=None)
    timeouts = {src._watchers[0].watch_timeout() for _ in range(20)}
    assert all(300 <= t < 600 for t in timeouts) and len(timeouts) > 1, timeouts


async def test_lists_are_paginated(fake: FakeKube, tmp_path: Path) -> None:
    """client-go lists in pages of 500 (tools/pager/pager.go defaultPageSize): one unbounded list of every pod of a
    large cluster is one huge response the API server must build within its request timeout (60 s) and hold in
    memory, and that this client parses in one piece."""
    src = new_source(fake, tmp_path, backoff_initial=0.02, page_size=2)
    try:
        await asyncio.wait_for(src.start(), 20)
        assert workloads(src.store) == {f"web-{i}" for i in range(5)}
        pages = [q for _, q in requests(fake, PODS, watch=False)]
        assert [q.get("limit") for q in pages] == ["2", "2", "2"]
        assert [bool(q.get("continue")) for q in pages] == [False, True, True]
        await wait_for(lambda: requests(fake, PODS, watch=True), what="pod watch")
        watch = requests(fake, PODS, watch=True)[0][1]
        assert watch["resourceVersion"] == str(fake.resource_version)  # the version of the list's snapshot
    finally:
        src.stop()


async def test_an_expired_continue_token_falls_back_to_a_full_list(fake: FakeKube, tmp_path: Path) -> None:
    """A continue token outlives etcd's compaction (5 minutes) when paging is slow; the server answers 410 Expired.
    client-go's pager then lists everything in one request (pager.go FullListIfExpired): starting over in pages could
    expire again and again. The pages already read must not count as the whole list."""
    fake.expire_continues = 1
    src = new_source(fake, tmp_path, backoff_initial=0.02, page_size=2)
    try:
        await asyncio.wait_for(src.start(), 20)
        assert workloads(src.store) == {f"web-{i}" for i in range(5)}
        pages = [q for _, q in requests(fake, PODS, watch=False)]
        assert [(q.get("limit"), bool(q.get("continue"))) for q in pages] == [("2", False), ("2", True), (None, False)]
        fake.delete("Pod", "demo", "web-0")
        await wait_for(lambda: "web-0" not in workloads(src.store), what="watch after the full list")
    finally:
        src.stop()


async def test_objects_are_validated_off_the_event_loop(
    fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validating a list takes CPU in proportion to it (0.66 s per 10,000 pods measured here); done on the event
    loop, a relist of every pod of a large cluster (after a 410, after an API server upgrade) stalled xDS pushes,
    the CA and the readiness probe for seconds. The watch threads validate; the loop only applies the result."""
    threads: list[threading.Thread] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return parse_documents(*args, **kwargs)

    monkeypatch.setattr(kube, "parse_documents", recording)
    src = new_source(fake, tmp_path, backoff_initial=0.05)
    try:
        await asyncio.wait_for(src.start(), 20)
        fake.upsert(pod("web-9", "10.1.0.9"))
        await wait_for(lambda: "web-9" in workloads(src.store), what="event")
    finally:
        src.stop()
    assert len(threads) >= 7 and threading.current_thread() not in threads  # 6 listed objects, 1 event


async def test_an_object_validation_fails_on_keeps_the_store_and_the_watch(
    fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation raising (a bug, never an invalid object: those are reported as errors) on an object of a list
    keeps the store as it was and still completes start(), as before; on an event it loses that event only: the
    watch goes on (resuming would bring the same event and the same failure forever)."""

    def failing(source: str, docs: list[Any], **kwargs: Any) -> Any:
        if docs[0]["metadata"]["name"] in ("web-3", "web-8"):
            raise RuntimeError("validation bug")
        return parse_documents(source, docs, **kwargs)

    monkeypatch.setattr(kube, "parse_documents", failing)
    src = new_source(fake, tmp_path, backoff_initial=0.05)
    try:
        await asyncio.wait_for(src.start(), 20)
        assert workloads(src.store) == set()  # the list holding web-3 was not applied
        fake.upsert(pod("web-8", "10.1.0.8"))
        fake.upsert(pod("web-9", "10.1.0.9"))
        await wait_for(lambda: "web-9" in workloads(src.store), what="the event after the failing one")
        assert "web-8" not in workloads(src.store)
    finally:
        src.stop()


async def test_every_watch_keeps_its_connection_in_the_pool(
    fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every resource holds a connection for its watch (client-go multiplexes them on one HTTP/2 connection). The
    client's pool keeps cpu_count * 5 connections: on a one-CPU node 5, fewer than the watches, so urllib3 closed
    the surplus at the end of each watch ("Connection pool is full, discarding connection") and the next request
    of that resource paid a new TCP (and TLS) handshake."""
    monkeypatch.setattr(kube_configuration.multiprocessing, "cpu_count", lambda: 1)
    src = new_source(fake, tmp_path, backoff_initial=0.05)
    try:
        await asyncio.wait_for(src.start(), 20)
        paths = [r.path for r in src.resources]
        await wait_for(lambda: all(fake.open_watches(p) == 1 for p in paths), what="every watch open")
        fake.drop_watches()
        fake.upsert(pod("web-9", "10.1.0.9"))
        await wait_for(lambda: "web-9" in workloads(src.store), what="watches back")
    finally:
        src.stop()
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


async def test_a_watch_refused_with_410_lists_again_and_removes_what_vanished(
    fake: FakeKube, started: KubeSource
) -> None:
    """A watch refused outright with HTTP 410 (not an ERROR event on an open stream): the version is gone, so the
    resource is listed again and what disappeared meanwhile is deleted (client-go: isExpiredError, relist).
    Passes before: a guard."""
    await wait_for(lambda: fake.open_watches(PODS) == 1, what="pod watch open")
    with fake.cond:  # a deletion the watch never delivers
        del fake.collection("Pod").items[("demo", "web-0")]
        fake.resource_version += 1
    fake.refuse_watches[PODS] = 410
    fake.drop_watches()
    await wait_for(lambda: "web-0" not in workloads(started.store), what="the relist's deletion")
    assert len(requests(fake, PODS, watch=False)) == 2
    assert workloads(started.store) == {f"web-{i}" for i in range(1, 5)}
