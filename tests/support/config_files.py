"""Config-directory test data shared by the file source's tests: an enrolled namespace, a pod, and a rewrite that
filesystems with coarse modification times cannot hide."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from controller.store import ConfigStore

NS = """apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {istio.io/dataplane-mode: ambient}
"""


def pod_yaml(name: str, ip: str) -> str:
    return f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: demo, uid: uid-{name}}}
spec: {{nodeName: node-a, serviceAccountName: sa-{name}}}
status: {{podIP: {ip}}}
"""


def bump_mtime(path: Path) -> None:
    """Coarse-mtime filesystems could hide a rewrite; make each write visible as a new signature."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def write(path: Path, text: str) -> None:
    """Rewrite a config file so that the source sees a new version, however coarse the filesystem's mtimes."""
    path.write_text(text)
    bump_mtime(path)


def served(store: ConfigStore) -> set[str]:
    """The keys (``Kind/namespace/name``) of the objects the store serves."""
    return {str(key) for key in store.translator.objects()}


def authorization_policy(action: str, *rules: dict[str, Any]) -> dict[str, Any]:
    """AuthorizationPolicy ``demo/p`` (no selector: namespace-wide) as a parsed document."""
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "demo"},
        "spec": {"action": action, "rules": list(rules)},
    }


def demo_client(node: str) -> str:
    """YAML: namespace ``demo`` enrolled in ambient and its pod ``client`` (10.1.0.5) on ``node``, as the first
    documents of a config the tests add Services and endpoints to."""
    return f"""apiVersion: v1
kind: Namespace
metadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: demo}}
spec: {{nodeName: {node}}}
status: {{podIP: 10.1.0.5}}
"""
