"""A real ambit-controller restarted while a config file holds a bad document, with a real xDS client connected
throughout: the client must never see the file's last good objects removed."""

from __future__ import annotations

from pathlib import Path

from agent.state import StoreChange, WorkloadStore, policy_key
from agent.xds import Backoff, XdsClient
from tests.support.xds_controller import ControllerProc, running, wait_for

CONFIG = """apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: demo}
spec: {nodeName: node1, serviceAccountName: web}
status: {podIP: 10.1.0.1}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-evil, namespace: demo}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}
"""


async def test_a_restart_with_a_bad_document_removes_nothing_from_agents(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.mkdir()
    policy_file = config / "demo.yaml"
    policy_file.write_text(CONFIG)
    controller = ControllerProc(tmp_path, ["--config-dir", str(config)])
    store = WorkloadStore()
    seen: list[StoreChange] = []
    client = XdsClient(store, controller.address, "node1", backoff=Backoff(0.01, 0.2))

    await controller.start()
    try:
        async with running(client):
            await wait_for(lambda: [policy_key(p) for p in store.all_policies()] == ["demo/deny-evil"], what="policy")
            await controller.stop()
            policy_file.write_text(CONFIG.replace("kind: AuthorizationPolicy", "kind: AuthorizationPolicyy"))
            store.subscribe(seen.append)
            await controller.start()
            await wait_for(controller.client_resumed, what="the client to resume both types")
            status = controller.json("/debug/config_status")
            assert status["objects"]["AuthorizationPolicy/demo/deny-evil"]["status"] == "stale"
            assert status["errors"] == [
                f"{policy_file}:AuthorizationPolicyy/demo/deny-evil: kind: unknown kind 'AuthorizationPolicyy' in "
                "document #3 (did you mean AuthorizationPolicy?)"
            ]
            assert controller.metric("ambit_config_rejected") == 1
            assert [policy_key(p) for p in store.all_policies()] == ["demo/deny-evil"]
            assert not any("demo/deny-evil" in change.policies for change in seen), "the DENY was removed"
            assert (tmp_path / ".config.ambit-state").is_dir()  # the default state directory
    finally:
        await controller.stop()
