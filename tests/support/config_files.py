"""Config-directory test data shared by the file source's tests: an enrolled namespace, a pod, and a rewrite that
filesystems with coarse modification times cannot hide."""

from __future__ import annotations

import os
from pathlib import Path

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
