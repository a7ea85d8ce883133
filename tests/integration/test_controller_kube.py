"""ambit-controller --kube against the fake API server, served to a real xDS client."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from agent.state import WorkloadStore
from agent.xds import XdsClient
from tests.support.fake_kube import deny_policy, namespace, pod, serve
from tests.support.xds_controller import ControllerProc, running, wait_for


def ips(store: WorkloadStore) -> dict[str, str]:
    return {w.name: socket.inet_ntoa(w.addresses[0]) for w in store.all_workloads()}


async def test_kube_source_end_to_end(tmp_path: Path) -> None:
    with serve() as fake:
        fake.upsert(namespace("demo"))
        fake.upsert(pod("web-0", "10.1.0.1"))
        fake.upsert(deny_policy("no-evil"))
        kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
        proc = ControllerProc(tmp_path, ["--kube", "--kubeconfig", str(kubeconfig)])
        await proc.start()
        store = WorkloadStore()
        try:
            async with running(XdsClient(store, proc.address, "node1")):
                await wait_for(lambda: ips(store) == {"web-0": "10.1.0.1"}, what="initial list at the client")
                assert [p.name for p in store.all_policies()] == ["no-evil"]
                fake.upsert(pod("web-1", "10.1.0.2"))
                await wait_for(lambda: ips(store).get("web-1") == "10.1.0.2", what="watched pod at the client")
                fake.drop_watches()
                fake.delete("AuthorizationPolicy", "demo", "no-evil")
                await wait_for(lambda: not store.all_policies(), what="policy deletion after a dropped watch")
                # A change lost to compaction shows up through the re-list that 410 triggers.
                with fake.cond:
                    fake.collections["/api/v1/pods"].items.pop(("demo", "web-0"))
                fake.expire("Pod")
                await wait_for(lambda: ips(store) == {"web-1": "10.1.0.2"}, what="re-list after 410 at the client")
                assert fake.count("GET", "/api/v1/pods", watch=False) == 2
                status = proc.json("/debug/config_status")
                assert status["objects"]["Pod/demo/web-1"]["source"] == "kube:Pod/demo/web-1"
        finally:
            await proc.stop()


async def test_unreachable_api_server_not_ready_and_sigterm_still_stops(tmp_path: Path) -> None:
    with serve() as fake:
        kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
    # The API server is gone: lists fail and are retried; the controller is not ready and opens no xDS port.
    proc = ControllerProc(tmp_path, ["--kube", "--kubeconfig", str(kubeconfig)])
    await proc.launch()
    try:
        await wait_for(lambda: "kube list/watch failed" in proc.log.read_text(), what="list retries in the log")
        assert not proc.ready()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", proc.xds_port), timeout=2).close()
        assert proc.proc is not None
        proc.proc.terminate()
        assert await asyncio.wait_for(proc.proc.wait(), 10) == 0
    finally:
        await proc.stop()
