"""A real ambit-controller and a real xDS client: a file edit that breaks the DENY policy and deletes a pod's
document delivers the pod's removal while the DENY keeps serving, and so does a restart after another deletion in
the still-broken file (the DENY from the state directory, the deleted pod not). And a writer that pauses mid-file
(the file emptied, then half written) never makes the client see an object removed."""

from __future__ import annotations

import os
from pathlib import Path

from agent.state import StoreChange, WorkloadStore, policy_key
from agent.xds import Backoff, XdsClient
from tests.support.xds_controller import ControllerProc, running, wait_for

NS = """apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
"""
DENY = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-evil, namespace: demo}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}
"""
BROKEN_DENY = DENY.replace("kind: AuthorizationPolicy", "kind: AuthorizationPolicyy")


def pod(name: str, ip: str) -> str:
    return f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: demo}}
spec: {{nodeName: node1, serviceAccountName: web}}
status: {{podIP: {ip}}}
"""


def replace(path: Path, *documents: str) -> None:
    """As a careful writer does: elsewhere, then renamed into place."""
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text("---\n".join(documents))
    os.replace(tmp, path)


async def test_a_deletion_beside_a_broken_document_reaches_the_agent(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    demo = config / "demo.yaml"
    replace(demo, NS, pod("web-0", "10.1.0.1"), pod("web-1", "10.1.0.2"), DENY)
    controller = ControllerProc(tmp_path, ["--config-dir", str(config)])
    store = WorkloadStore()
    seen: list[StoreChange] = []
    client = XdsClient(store, controller.address, "node1", backoff=Backoff(0.01, 0.2))

    def workloads() -> set[str]:
        return {w.name for w in store.all_workloads()}

    def policies() -> list[str]:
        return [policy_key(p) for p in store.all_policies()]

    await controller.start()
    try:
        async with running(client):
            await wait_for(lambda: workloads() == {"web-0", "web-1"} and policies() == ["demo/deny-evil"], what="all")
            store.subscribe(seen.append)
            # web-1 deleted, the DENY broken (not last: a file whose last document is invalid may be cut short)
            replace(demo, NS, BROKEN_DENY, pod("web-0", "10.1.0.1"))
            await wait_for(lambda: workloads() == {"web-0"}, what="web-1's removal")
            status = controller.json("/debug/config_status")
            assert status["errors"] == [
                f"{demo}:AuthorizationPolicyy/demo/deny-evil: kind: unknown kind 'AuthorizationPolicyy' in "
                "document #2 (did you mean AuthorizationPolicy?)"
            ]
            assert status["objects"]["AuthorizationPolicy/demo/deny-evil"]["status"] == "stale"
            assert "Pod/demo/web-1" not in status["objects"]

            await controller.stop()
            replace(demo, BROKEN_DENY, NS)  # web-0 deleted while the controller is down, still broken
            await controller.start()
            await wait_for(controller.client_resumed, what="the client to resume both types")
            await wait_for(lambda: workloads() == set(), what="web-0's removal")
            assert controller.json("/debug/config_status")["objects"]["AuthorizationPolicy/demo/deny-evil"]
            assert policies() == ["demo/deny-evil"]
            assert not any("demo/deny-evil" in change.policies for change in seen), "the DENY was removed"
    finally:
        await controller.stop()


async def test_a_writer_pausing_mid_file_removes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    demo = config / "demo.yaml"
    full = "---\n".join([NS, pod("web-0", "10.1.0.1"), pod("web-1", "10.1.0.2"), DENY])
    demo.write_text(full)
    controller = ControllerProc(tmp_path, ["--config-dir", str(config), "--cut-short-wait", "30"])
    store = WorkloadStore()
    seen: list[tuple[set[str], list[str]]] = []  # the client's workloads and policies after each change
    client = XdsClient(store, controller.address, "node1", backoff=Backoff(0.01, 0.2))

    def cut_short() -> list[dict[str, object]]:
        return [x for x in controller.log_lines() if str(x.get("msg", "")).startswith("config file looks cut short")]

    await controller.start()
    try:
        async with running(client):
            await wait_for(lambda: len(store.all_workloads()) == 2 and store.all_policies(), what="all")
            store.subscribe(
                lambda _: seen.append(
                    ({w.name for w in store.all_workloads()}, [policy_key(p) for p in store.all_policies()])
                )
            )
            with demo.open("w") as writer:  # as `cmd > demo.yaml`: emptied first
                await wait_for(lambda: len(cut_short()) == 1, what="the emptied file to be read")
                writer.write(full[: full.index("10.1.0.2")])  # stops mid-line in web-1's document
                writer.flush()
                await wait_for(lambda: len(cut_short()) == 2, what="the half-written file to be read")
                assert controller.json("/debug/config_status")["errors"]  # web-1's document, cut
                writer.write(full[full.index("10.1.0.2") :])
            await wait_for(lambda: controller.json("/debug/config_status")["errors"] == [], what="the whole file")
            assert ({w.name for w in store.all_workloads()}, [policy_key(p) for p in store.all_policies()]) == (
                {"web-0", "web-1"},
                ["demo/deny-evil"],
            )
            assert all(names == {"web-0", "web-1"} and policies == ["demo/deny-evil"] for names, policies in seen), seen
            assert [x["wait_seconds"] for x in cut_short()] == [30.0, 30.0]
    finally:
        await controller.stop()
