"""The kube source against answers of a shape the API server should never send: the watch must survive them."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path
from typing import Any

from controller.monitoring import ControllerMetrics
from controller.sources.kube import KubeSource, api_client
from controller.store import ConfigStore
from controller.translate import Translator
from tests.support.fake_kube import FakeKube, namespace, pod, serve
from tests.support.xds_controller import wait_for


def workloads(store: ConfigStore) -> dict[str, str]:
    return {
        a.workload.name: socket.inet_ntoa(a.workload.addresses[0])
        for a in store.translator.addresses().values()
        if a.HasField("workload")
    }


def new_source(fake: FakeKube, tmp_path: Path) -> KubeSource:
    store = ConfigStore(Translator(), ControllerMetrics())
    return KubeSource(store, api_client(str(fake.write_kubeconfig(tmp_path / "kubeconfig"))), backoff_initial=0.05)


async def test_a_malformed_watch_event_is_followed_by_a_relist_not_the_end_of_the_watch(tmp_path: Path) -> None:
    # An event whose object was not a JSON object raised AttributeError in the watch thread, which was not caught:
    # the thread ended and the controller never saw another change of that kind.
    with serve() as fake:
        fake.upsert(namespace("demo"))
        fake.upsert(pod("web-0", "10.1.0.1"))
        source = new_source(fake, tmp_path)
        await asyncio.wait_for(source.start(), 20)
        try:
            lists = source.lists
            coll = fake.collection("Pod")
            with fake.cond:
                fake.resource_version += 1
                malformed: Any = 5  # the fake's history is typed for objects; this one is the point
                coll.history.append((fake.resource_version, "ADDED", malformed))
                fake.cond.notify_all()
            fake.upsert(pod("web-1", "10.1.0.2"))
            await wait_for(lambda: workloads(source.store).get("web-1") == "10.1.0.2", what="pod after bad event")
            assert source.lists > lists  # recovered by listing again, not by replaying the same event
            fake.upsert(pod("web-2", "10.1.0.3"))
            await wait_for(lambda: "web-2" in workloads(source.store), what="the watch goes on")
        finally:
            source.stop()


async def test_a_malformed_list_is_retried_and_start_completes(tmp_path: Path) -> None:
    # A list whose items were not objects killed the thread before the first list was applied: start() waited
    # for the Pod resource forever.
    with serve() as fake:
        fake.upsert(namespace("demo"))
        fake.upsert(pod("web-0", "10.1.0.1"))

        def malformed_once(match: re.Match[str], body: Any) -> tuple[int, Any]:
            fake.routes.clear()  # later requests get the real list and watch
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": [5]}

        fake.add_route("GET", "/api/v1/pods", malformed_once)
        source = new_source(fake, tmp_path)
        try:
            await asyncio.wait_for(source.start(), 20)
            assert workloads(source.store) == {"web-0": "10.1.0.1"}
            assert fake.count("GET", "/api/v1/pods", watch=False) == 2
        finally:
            source.stop()
