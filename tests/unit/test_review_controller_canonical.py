"""`Service.canonical`, as istiod's selectWorkloadServices sets it: a Kubernetes Service is always canonical for its
hostname; otherwise the oldest ServiceEntry among the namespaces sharing the hostname is. ztunnel (and the agent)
use it to pick, for a client of a third namespace, between services of several namespaces on one VIP."""

from __future__ import annotations

from agent.state import WorkloadStore
from api.istio.workload import workload_pb2 as wl
from controller.model import KObject, ObjectKey
from controller.translate import Translator
from controller.validation import parse_yaml_text

HOST = "web.demo.svc.cluster.local"
SERVICE = """apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {selector: {app: web}, clusterIP: 10.96.0.10, ports: [{port: 80}]}
"""


def entry(ns: str, created: str, host: str = HOST) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: override, namespace: {ns}, creationTimestamp: '{created}'}}
spec: {{hosts: [{host}], addresses: [10.96.0.10], ports: [{{number: 80, name: http}}], resolution: STATIC}}
"""


def objects(*texts: str) -> list[KObject]:
    result = parse_yaml_text("t.yaml", "---\n".join(texts))
    assert result.errors == []
    return list(result.objects)


def canonical(translator: Translator) -> dict[str, bool]:
    return {n: a.service.canonical for n, a in translator.addresses().items() if a.HasField("service")}


def test_kubernetes_service_is_canonical_over_entries_of_other_namespaces() -> None:
    t = Translator()
    t.apply(objects(SERVICE, entry("other", "2020-01-01T00:00:00Z")))
    assert canonical(t) == {f"demo/{HOST}": True, f"other/{HOST}": False}


def test_oldest_entry_is_canonical_and_the_next_takes_over_when_it_goes() -> None:
    t = Translator()
    t.apply(
        objects(
            entry("b", "2024-01-01T00:00:00Z", "api.example.com"), entry("a", "2025-01-01T00:00:00Z", "api.example.com")
        )
    )
    assert canonical(t) == {"a/api.example.com": False, "b/api.example.com": True}
    delta = t.apply([], [ObjectKey("ServiceEntry", "b", "override")])
    # The survivor's resource changes too, though nothing of its own did.
    assert delta.addresses["b/api.example.com"] is None
    survivor = delta.addresses["a/api.example.com"]
    assert survivor is not None and survivor.service.canonical


def test_client_of_a_third_namespace_reaches_the_kubernetes_service_whatever_arrived_first() -> None:
    # Without `canonical` the agent took the first service to arrive for the shared VIP: here the ServiceEntry.
    t = Translator()
    t.apply(objects(SERVICE, entry("other", "2020-01-01T00:00:00Z")))
    store = WorkloadStore()
    store.put([t.addresses()[f"other/{HOST}"], t.addresses()[f"demo/{HOST}"]])
    found = store.service_by_vip("10.96.0.10", "third")
    assert isinstance(found, wl.Service) and (found.namespace, found.name) == ("demo", "web")
