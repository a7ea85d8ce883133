"""The kube source when the API server's store went back in time (etcd restored from a backup, or a lagging API
server behind a load balancer): a watch resuming from a resource version the server has not reached is refused
with "Too large resource version" (504, cause ResourceVersionTooLarge), never with 410. client-go's reflector
lists afresh on it; resuming with the same version would be refused forever and no change would arrive again."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from controller.monitoring import ControllerMetrics
from controller.sources.kube import KubeSource, api_client, too_large_version
from controller.store import ConfigStore
from controller.translate import Translator
from tests.support.fake_kube import Collection, FakeKube, deny_policy, namespace, pod, serve, status_object
from tests.support.xds_controller import wait_for


def too_large(since: int, current: int) -> dict[str, Any]:
    """The Status the API server's watch cache answers with (apiserver storage.NewTooLargeResourceVersionError)."""
    status = status_object(504, "Timeout", f"Timeout: Too large resource version: {since}, current: {current}")
    status["details"] = {
        "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
        "retryAfterSeconds": 1,
    }
    return status


class RestoredKube(FakeKube):
    """Refuses watches from a version past its own, as the real API server does (the base fake would wait)."""

    def watch_events(self, coll: Collection, since: int, bookmarks: bool, stop: threading.Event) -> Iterator[Any]:
        with self.cond:
            current = self.resource_version
        if since > current:
            yield {"type": "ERROR", "object": too_large(since, current)}
            return
        yield from super().watch_events(coll, since, bookmarks, stop)


def workloads(store: ConfigStore) -> dict[str, str]:
    return {
        a.workload.name: socket.inet_ntoa(a.workload.addresses[0])
        for a in store.translator.addresses().values()
        if a.HasField("workload")
    }


async def test_a_store_restored_behind_the_watch_version_is_listed_again(tmp_path: Path) -> None:
    with serve(RestoredKube()) as fake:
        fake.resource_version = 5000
        fake.upsert(namespace("demo"))
        fake.upsert(pod("web-0", "10.1.0.1"))
        store = ConfigStore(Translator(), ControllerMetrics())
        src = KubeSource(store, api_client(str(fake.write_kubeconfig(tmp_path / "kc"))), backoff_initial=0.05)
        await asyncio.wait_for(src.start(), 20)
        try:
            await wait_for(lambda: fake.open_watches("/api/v1/pods") == 1, what="pod watch open")
            # etcd restored from an older backup: versions go back, web-0 never existed there, web-7 did.
            with fake.cond:
                fake.resource_version = 200
                coll = fake.collection("Pod")
                coll.items.clear()
                coll.history.clear()
            fake.upsert(pod("web-7", "10.1.0.7"))
            fake.drop_watches()
            await wait_for(lambda: workloads(store) == {"web-7": "10.1.0.7"}, what="state of the restored store")
            fake.upsert(pod("web-8", "10.1.0.8"))  # and the watch goes on from the restored versions
            await wait_for(lambda: "web-8" in workloads(store), what="event after the relist")
        finally:
            src.stop()


def test_too_large_versions_are_recognised() -> None:
    assert not too_large_version(status_object(410, "Expired", "too old resource version: 1 (5)"))  # its own path
    assert too_large_version(too_large(9, 5))
    # Older API servers sent the message without the cause.
    assert too_large_version(status_object(504, "Timeout", "Timeout: Too large resource version: 9, current: 5"))
    assert not too_large_version(status_object(504, "Timeout", "the server was unable to return a response in time"))
    assert not too_large_version(status_object(500, "InternalError", "etcdserver: leader changed"))
    assert not too_large_version("not a status")


async def test_too_large_as_an_http_error_is_listed_again(tmp_path: Path) -> None:
    """API servers that refuse the watch request itself (an error response instead of an ERROR event)."""
    with serve() as fake:
        fake.upsert(namespace("demo"))
        fake.upsert(pod("web-0", "10.1.0.1"))
        store = ConfigStore(Translator(), ControllerMetrics())
        src = KubeSource(store, api_client(str(fake.write_kubeconfig(tmp_path / "kc"))), backoff_initial=0.05)
        await asyncio.wait_for(src.start(), 20)
        try:
            await wait_for(lambda: fake.open_watches("/api/v1/pods") == 1, what="pod watch open")
            lists = fake.count("GET", "/api/v1/pods", watch=False)
            refused: list[int] = []

            def refuse(match: Any, body: Any) -> tuple[int, Any]:
                refused.append(1)
                return 504, too_large(9999, fake.resource_version)

            fake.add_route("GET", "/api/v1/pods", refuse)
            fake.drop_watches()
            await wait_for(lambda: len(refused) >= 2, what="refused requests")
            fake.routes.clear()
            await wait_for(lambda: fake.count("GET", "/api/v1/pods", watch=False) > lists, what="a list again")
            fake.upsert(pod("web-1", "10.1.0.2"))
            await wait_for(lambda: "web-1" in workloads(store), what="events after the relist")
            assert workloads(store)["web-0"] == "10.1.0.1"
        finally:
            src.stop()


async def test_a_kind_installed_after_start_is_found_at_its_preferred_version(tmp_path: Path) -> None:
    """Istio's CRDs absent at start: v1, then the older v1beta1, were both 404 and the watcher stayed on v1beta1 for
    good. CRDs installed later that serve v1 only (a future Istio, a hand-made CRD) were never seen, so their
    AuthorizationPolicies or PeerAuthentications were silently never enforced. Each retry now asks for v1 first."""
    with serve() as fake:
        fake.upsert(namespace("demo"))
        path = "/apis/security.istio.io/v1/peerauthentications"
        coll = fake.collections.pop(path)  # CRD not installed: 404 at every version
        store = ConfigStore(Translator(), ControllerMetrics())
        src = KubeSource(
            store, api_client(str(fake.write_kubeconfig(tmp_path / "kc"))), backoff_initial=0.02, backoff_max=0.2
        )
        await asyncio.wait_for(src.start(), 20)
        try:
            watcher = next(w for w in src._watchers if w.resource.kind == "PeerAuthentication")
            await wait_for(lambda: watcher.missing, what="resource missing")
            fake.collections[path] = coll  # installed, serving v1 only
            fake.upsert(
                {
                    "apiVersion": "security.istio.io/v1",
                    "kind": "PeerAuthentication",
                    "metadata": {"name": "default", "namespace": "istio-system"},
                    "spec": {"mtls": {"mode": "STRICT"}},
                }
            )
            key = ("PeerAuthentication", "istio-system", "default")
            await wait_for(lambda: key in store.translator.objects(), what="PeerAuthentication from the new CRD")
            assert watcher.resource.version == "v1" and not watcher.missing
        finally:
            src.stop()


async def test_an_older_version_that_stops_being_served_moves_back_to_the_preferred_one(tmp_path: Path) -> None:
    """Watching the older version (v1 was not served at start): an upgrade of the CRDs that drops it answered every
    resumed watch with 404, retried from the same version forever, and no change of that kind arrived again."""
    with serve() as fake:
        fake.upsert(namespace("demo"))
        fake.serve_version("PeerAuthentication", "v1beta1")
        store = ConfigStore(Translator(), ControllerMetrics())
        src = KubeSource(
            store, api_client(str(fake.write_kubeconfig(tmp_path / "kc"))), backoff_initial=0.02, backoff_max=0.2
        )
        await asyncio.wait_for(src.start(), 20)
        try:
            watcher = next(w for w in src._watchers if w.resource.kind == "PeerAuthentication")
            assert watcher.resource.version == "v1beta1"
            old_path = "/apis/security.istio.io/v1beta1/peerauthentications"
            await wait_for(lambda: fake.open_watches(old_path) == 1, what="watch on v1beta1")
            fake.serve_version("PeerAuthentication", "v1")  # the upgrade: v1 only from now on
            fake.drop_watches()
            fake.upsert(
                {
                    "apiVersion": "security.istio.io/v1",
                    "kind": "PeerAuthentication",
                    "metadata": {"name": "default", "namespace": "istio-system"},
                    "spec": {"mtls": {"mode": "STRICT"}},
                }
            )
            key = ("PeerAuthentication", "istio-system", "default")
            await wait_for(lambda: key in store.translator.objects(), what="PeerAuthentication after the upgrade")
            assert watcher.resource.version == "v1"
        finally:
            src.stop()


async def test_a_kind_that_stops_being_served_keeps_its_objects(tmp_path: Path) -> None:
    """A 404 at every version for a kind that was served (an API server answering before its CRD handlers are up):
    its policies stay with the agents rather than all being withdrawn; they are checked again and resume."""
    with serve() as fake:
        fake.upsert(namespace("demo"))
        fake.upsert(deny_policy("no-evil"))
        path = "/apis/security.istio.io/v1/authorizationpolicies"
        store = ConfigStore(Translator(), ControllerMetrics())
        src = KubeSource(
            store, api_client(str(fake.write_kubeconfig(tmp_path / "kc"))), backoff_initial=0.02, backoff_max=0.2
        )
        await asyncio.wait_for(src.start(), 20)
        try:
            watcher = next(w for w in src._watchers if w.resource.kind == "AuthorizationPolicy")
            await wait_for(lambda: fake.open_watches(path) == 1, what="policy watch open")
            coll = fake.collections.pop(path)
            fake.drop_watches()
            await wait_for(lambda: watcher.missing, what="404 at every version")
            await asyncio.sleep(0.5)  # a few more rounds of retries
            assert "demo/no-evil" in store.translator.authorizations()
            fake.collections[path] = coll
            fake.delete("AuthorizationPolicy", "demo", "no-evil")  # deleted while it was not served
            await wait_for(lambda: "demo/no-evil" not in store.translator.authorizations(), what="relist")
            assert not watcher.missing
        finally:
            src.stop()


def test_api_connections_keep_alive(tmp_path: Path) -> None:
    """A watch whose API server vanished without a FIN was noticed only by its 5.5 min read timeout."""
    with serve() as fake:
        api = api_client(str(fake.write_kubeconfig(tmp_path / "kc")))
        options = api.rest_client.pool_manager.connection_pool_kw["socket_options"]
        assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in options
        assert (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30) in options
        assert (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) in options  # urllib3's default kept
        # The options reach the socket the watch reads from.
        conn = api.rest_client.pool_manager.connection_from_url(fake.url)._new_conn()
        conn.connect()
        try:
            assert conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        finally:
            conn.close()
