"""The pod `Workload` protobuf the proxy tests feed their stores, built in one place (unit tests must not import the
integration mesh harness to get it)."""

from __future__ import annotations

import ipaddress
from typing import Any

from api.istio.workload import workload_pb2 as wpb


def pod_workload(
    name: str,
    ns: str,
    ip: str,
    *,
    sa: str = "",
    node: str = "",
    hbone: bool = True,
    deployment: str | None = None,
    **extra: Any,
) -> wpb.Workload:
    """The uid/name/namespace/address/tunnel every proxy test's pod needs; `deployment` adds telemetry labels."""
    if deployment is not None:
        extra.update(
            workload_name=deployment,
            canonical_name=deployment,
            canonical_revision="v1",
            cluster_id="Kubernetes",
        )
    return wpb.Workload(
        uid=f"Kubernetes//Pod/{ns}/{name}",
        name=name,
        namespace=ns,
        service_account=sa,
        addresses=[ipaddress.ip_address(ip).packed],
        node=node,
        tunnel_protocol=wpb.HBONE if hbone else wpb.NONE,
        **extra,
    )
