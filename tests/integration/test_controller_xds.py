"""A real ambit-controller process serving real delta xDS clients (agent.xds.XdsClient) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from agent.state import ADDRESS_TYPE, WorkloadStore
from agent.xds import Backoff, XdsClient
from tests.support.xds_controller import ControllerProc, running, wait_for

NAMESPACES = """apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
"""
SERVICES = """apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


def pod(name: str, ip: str, app: str = "web") -> str:
    return f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: demo, labels: {{app: {app}}}}}
spec: {{nodeName: node1, serviceAccountName: {name}}}
status: {{podIP: {ip}}}
"""


def pods_yaml(*ips: str) -> str:
    return "---\n".join(pod(f"web-{i}", ip) for i, ip in enumerate(ips))


def ip_of(store: WorkloadStore, name: str) -> str | None:
    for wl in store.all_workloads():
        if wl.name == name:
            return socket.inet_ntoa(wl.addresses[0])
    return None


class RecordingClient(XdsClient):
    """Keeps every response it handled, so tests can look at what the server sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.responses: list[discovery_pb2.DeltaDiscoveryResponse] = []

    def handle_response(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> discovery_pb2.DeltaDiscoveryRequest:
        self.responses.append(resp)
        return super().handle_response(resp)


class CorruptingClient(RecordingClient):
    """Receives one workload's bytes damaged, as if a peer sent garbage: it must NACK and keep the rest."""

    victim = "web-1"

    def handle_response(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> discovery_pb2.DeltaDiscoveryRequest:
        for res in resp.resources:
            if res.name.endswith(f"/{self.victim}"):
                res.resource.value = b"\x0a\xff\xff\xff"
        return super().handle_response(resp)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    d = tmp_path / "config"
    d.mkdir()
    (d / "namespaces.yaml").write_text(NAMESPACES)
    (d / "services.yaml").write_text(SERVICES)
    (d / "pods.yaml").write_text(pods_yaml("10.1.0.1", "10.1.0.2"))
    return d


@pytest.fixture
async def controller(tmp_path: Path, config_dir: Path) -> AsyncIterator[ControllerProc]:
    proc = ControllerProc(tmp_path, ["--config-dir", str(config_dir)])
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


async def test_initial_sync_file_change_and_deletion(
    controller: ControllerProc, config_dir: Path, tmp_path: Path
) -> None:
    store = WorkloadStore()
    async with running(XdsClient(store, controller.address, "node1", state_dir=tmp_path / "agent")) as client:
        await asyncio.wait_for(client.ready.wait(), 20)
        assert ip_of(store, "web-0") == "10.1.0.1" and ip_of(store, "web-1") == "10.1.0.2"
        svc = store.service_by_vip("10.96.0.10")
        assert svc is not None and svc.hostname == "web.demo.svc.cluster.local"
        assert sorted(w.name for w, _ in store.endpoints(svc, 80)) == ["web-0", "web-1"]
        assert {t for _, t in store.endpoints(svc, 80)} == {8080}

        (config_dir / "pods.yaml").write_text(pods_yaml("10.1.0.1", "10.1.0.9"))
        await wait_for(lambda: ip_of(store, "web-1") == "10.1.0.9", what="changed pod IP at the client")
        assert ip_of(store, "web-0") == "10.1.0.1"

        (config_dir / "services.yaml").unlink()
        await wait_for(lambda: store.service_by_vip("10.96.0.10") is None, what="service removal at the client")
        assert all(not w.services for w in store.all_workloads())

        conns = controller.json("/debug/connections")
        assert len(conns) == 1 and conns[0]["node"] == "node1" and conns[0]["nacks"] == 0
        assert controller.metric("pilot_xds") == 1
        assert controller.metric("pilot_xds_pushes_total", type="address") >= 3
        dump = controller.json("/debug/config_dump")
        names = {r["resource"]["workload"]["name"] for r in dump["resources"]["address"] if "workload" in r["resource"]}
        assert names == {"web-0", "web-1"}


async def test_invalid_file_reported_and_old_state_kept(controller: ControllerProc, config_dir: Path) -> None:
    store = WorkloadStore()
    async with running(XdsClient(store, controller.address, "node1")) as client:
        await asyncio.wait_for(client.ready.wait(), 20)
        pods = config_dir / "pods.yaml"
        # web-1 gets an invalid IP; a YAML syntax error follows in the same file.
        pods.write_text(pods_yaml("10.1.0.1", "10.1.0.999") + "---\nkind: Pod\nmetadata: [oops\n")
        status = await wait_for(
            lambda: (s := controller.json("/debug/config_status"))["errors"] and s, what="config error in status"
        )
        web1 = status["objects"]["Pod/demo/web-1"]
        assert web1["status"] == "rejected" and web1["serving"] == "last valid version"
        assert any(e.startswith(f"{pods}:Pod/demo/web-1: status.podIP") for e in web1["errors"]), web1
        assert any("invalid YAML" in e and e.startswith(str(pods)) for e in status["errors"]), status["errors"]
        assert controller.metric("ambit_config_rejected") >= 2
        assert controller.metric("ambit_config_errors_total") >= 2
        logged = [x for x in controller.log_lines() if x.get("msg") == "config rejected"]
        assert any("status.podIP" in x["error"] for x in logged)
        await asyncio.sleep(0.5)  # give a (wrong) push time to arrive
        assert ip_of(store, "web-1") == "10.1.0.2"
        assert ip_of(store, "web-0") == "10.1.0.1"
        # Fixing the file clears the errors and applies the new version.
        pods.write_text(pods_yaml("10.1.0.1", "10.1.0.3"))
        await wait_for(lambda: ip_of(store, "web-1") == "10.1.0.3", what="fixed pod at the client")
        await wait_for(lambda: not controller.json("/debug/config_status")["errors"], what="errors cleared")
        assert controller.metric("ambit_config_rejected") == 0


async def test_nack_is_logged_counted_and_valid_resources_apply(controller: ControllerProc) -> None:
    store = WorkloadStore()
    client = CorruptingClient(store, controller.address, "node1")
    async with running(client):
        await wait_for(lambda: client.stats["responses"] >= 2, what="a response of each type")
        # The Address response was NACKed, so that type is not synced: not ready (ztunnel counts ACKs only).
        assert not client.ready.is_set() and "web-1: cannot decode" in client.not_ready_reason()
        assert ip_of(store, "web-0") == "10.1.0.1"
        assert ip_of(store, "web-1") is None
        assert store.service_by_vip("10.96.0.10") is not None
        assert client.stats["nacks"] == 1
        assert client.stats["last_nack"].startswith("Kubernetes//Pod/demo/web-1: cannot decode")
        await wait_for(
            lambda: controller.metric("pilot_total_xds_rejects_total", type="address") == 1, what="NACK count"
        )
        conn = controller.json("/debug/connections")[0]
        assert conn["nacks"] == 1 and conn["last_nack"] == client.stats["last_nack"]
        assert any(x.get("msg") == "xds NACK" and "web-1" in x["error"] for x in controller.log_lines())
        # No re-push after a NACK: the server sent one response per type.
        await asyncio.sleep(0.5)
        assert [r.type_url for r in client.responses].count(ADDRESS_TYPE) == 1


async def test_reconnect_resumes_without_resending_unchanged(
    controller: ControllerProc, config_dir: Path, tmp_path: Path
) -> None:
    store = WorkloadStore()
    client = RecordingClient(store, controller.address, "node1", backoff=Backoff(0.01, 0.5))
    async with running(client):
        await asyncio.wait_for(client.ready.wait(), 20)
        first = next(r for r in client.responses if r.type_url == ADDRESS_TYPE)
        assert len(first.resources) == 3  # two pods and the service
        await controller.stop()
        (config_dir / "pods.yaml").write_text(pods_yaml("10.1.0.1", "10.1.0.7"))
        client.responses.clear()
        await controller.start()
        await wait_for(lambda: ip_of(store, "web-1") == "10.1.0.7", limit=30, what="resumed client update")
        resumed = [r for r in client.responses if r.type_url == ADDRESS_TYPE]
        # Only the changed workload came back; the unchanged pod and service were skipped by version.
        assert [res.name for res in resumed[0].resources] == ["Kubernetes//Pod/demo/web-1"]
        assert list(resumed[0].removed_resources) == []
        assert ip_of(store, "web-0") == "10.1.0.1" and store.service_by_vip("10.96.0.10") is not None
        assert client.stats["connects"] == 2
        # Counted once gRPC took the write, which may be after the client applied it (seen 0 once in CI)
        await wait_for(
            lambda: controller.json("/debug/connections")[0]["resources_sent"] == 1, what="the resend counted"
        )
        assert controller.json("/debug/connections")[0]["resources_sent"] == 1, "one resource resent, no more"


async def test_agent_starts_from_disk_while_controller_down(controller: ControllerProc, tmp_path: Path) -> None:
    state_dir = tmp_path / "agent-state"
    first = XdsClient(WorkloadStore(), controller.address, "node1", state_dir=state_dir)
    async with running(first):
        await asyncio.wait_for(first.ready.wait(), 20)
        await wait_for(lambda: (state_dir / "xds-state.pb").exists(), what="state file")
        await asyncio.sleep(0.3)  # let the coalesced save finish
    await controller.stop()
    store = WorkloadStore()
    second = XdsClient(store, controller.address, "node1", state_dir=state_dir, backoff=Backoff(0.01, 0.2))
    async with running(second):
        await wait_for(lambda: second.restored, what="state restored from disk")
        assert ip_of(store, "web-0") == "10.1.0.1" and ip_of(store, "web-1") == "10.1.0.2"
        assert store.service_by_vip("10.96.0.10") is not None
        assert not second.ready.is_set()
        assert second.stats["last_error"].startswith("UNAVAILABLE")
        # When the controller comes back the client resumes: nothing changed, so nothing is resent.
        await controller.start()
        await asyncio.wait_for(second.ready.wait(), 30)
        assert controller.json("/debug/connections")[0]["resources_sent"] == 0


async def test_stdlib_event_loop_and_sigterm(tmp_path: Path, config_dir: Path) -> None:
    proc = ControllerProc(tmp_path, ["--config-dir", str(config_dir)], event_loop="asyncio")
    await proc.start()
    try:
        store = WorkloadStore()
        async with running(XdsClient(store, proc.address, "node1")) as client:
            await asyncio.wait_for(client.ready.wait(), 20)
            assert ip_of(store, "web-0") == "10.1.0.1"
        assert proc.proc is not None
        proc.proc.terminate()
        assert await asyncio.wait_for(proc.proc.wait(), 10) == 0
        assert any(x.get("msg") == "stopping" for x in proc.log_lines())
    finally:
        await proc.stop()


async def test_tls_port_with_node_tokens(tmp_path: Path, config_dir: Path) -> None:
    tokens = tmp_path / "node-tokens.json"
    tokens.write_text('{"node1": "secret-1"}')
    (tmp_path / "good.token").write_text("secret-1\n")
    (tmp_path / "bad.token").write_text("nope\n")
    ca_dir = tmp_path / "ca"
    args = ["--config-dir", str(config_dir), "--ca-dir", str(ca_dir), "--node-tokens", str(tokens)]
    proc = ControllerProc(tmp_path, args, tls=True)
    await proc.start()
    try:
        root = ca_dir / "root-cert.pem"
        store = WorkloadStore()
        good = XdsClient(
            store, f"127.0.0.1:{proc.tls_port}", "node1", root_cert=root, token_file=tmp_path / "good.token"
        )
        async with running(good):
            await asyncio.wait_for(good.ready.wait(), 20)
            assert ip_of(store, "web-0") == "10.1.0.1"
            conn = proc.json("/debug/connections")[0]
            assert conn["identity"] == "node1"
        bad = XdsClient(
            WorkloadStore(),
            f"127.0.0.1:{proc.tls_port}",
            "node1",
            root_cert=root,
            token_file=tmp_path / "bad.token",
            backoff=Backoff(0.05, 0.2),
        )
        async with running(bad):
            await wait_for(lambda: bad.stats["last_error"].startswith("UNAUTHENTICATED"), what="token rejected")
            assert not bad.ready.is_set()
    finally:
        await proc.stop()
