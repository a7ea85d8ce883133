"""A synthetic cluster config at a chosen scale, as raw documents, for the translator's scale test and benchmarks.

Documents are plain dicts in the shape the file source reads, so a benchmark can time validation
(controller.validation.parse_documents) and translation separately.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

ROOT_NAMESPACE = "istio-system"


@dataclass(frozen=True, slots=True)
class Scale:
    workloads: int = 10_000
    services: int = 1_000
    policies: int = 1_000
    namespaces: int = 50
    nodes: int = 20


def documents(scale: Scale) -> list[dict[str, Any]]:
    """Namespaces (all ambient), nodes, pods spread evenly over services, services, policies and a STRICT mesh."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ROOT_NAMESPACE}},
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": ROOT_NAMESPACE},
            "spec": {"mtls": {"mode": "STRICT"}},
        },
    ]
    for n in range(scale.namespaces):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": f"ns-{n}", "labels": {"istio.io/dataplane-mode": "ambient"}},
            }
        )
    for n in range(scale.nodes):
        docs.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"node-{n}"}, "spec": {}})
    pod_net = ipaddress.ip_network("10.0.0.0/8")
    vip_net = ipaddress.ip_network("172.16.0.0/12")
    for s in range(scale.services):
        ns = f"ns-{s % scale.namespaces}"
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"svc-{s}", "namespace": ns},
                "spec": {
                    "selector": {"app": f"svc-{s}"},
                    "clusterIP": str(vip_net[s + 1]),
                    "ports": [
                        {"name": "http", "port": 80, "targetPort": "http"},
                        {"name": "metrics", "port": 9090, "targetPort": 9090},
                    ],
                },
            }
        )
    for w in range(scale.workloads):
        s = w % max(scale.services, 1)
        ns = f"ns-{s % scale.namespaces}"
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"pod-{w}", "namespace": ns, "labels": {"app": f"svc-{s}", "version": "v1"}},
                "spec": {
                    "nodeName": f"node-{w % scale.nodes}",
                    "serviceAccountName": f"sa-{s}",
                    "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}],
                },
                "status": {"podIP": str(pod_net[w + 1]), "phase": "Running"},
            }
        )
    for p in range(scale.policies):
        s = p % max(scale.services, 1)
        ns = f"ns-{s % scale.namespaces}"
        if p % 10 == 9:
            spec: dict[str, Any] = {
                "action": "DENY",
                "rules": [{"from": [{"source": {"ipBlocks": [f"192.168.{p % 250}.0/24"]}}]}],
            }
        else:
            caller = (s + 1) % max(scale.services, 1)
            spec = {
                "selector": {"matchLabels": {"app": f"svc-{s}"}},
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [
                            {
                                "source": {
                                    "principals": [f"cluster.local/ns/ns-{caller % scale.namespaces}/sa/sa-{caller}"]
                                }
                            }
                        ],
                        "to": [{"operation": {"ports": ["8080"]}}],
                    }
                ],
            }
        docs.append(
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": f"policy-{p}", "namespace": ns},
                "spec": spec,
            }
        )
    return docs
