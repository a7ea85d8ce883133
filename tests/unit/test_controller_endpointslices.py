"""EndpointSlices (discovery.k8s.io/v1): a Service without a selector is balanced over the endpoints another
controller keeps in its slices, as istiod's EndpointSlice workloads make it, instead of being passed through."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path
from typing import Any

import pytest

from agent.outbound import RouteKind, route
from agent.state import WorkloadStore
from api.istio.workload import workload_pb2 as wl
from controller.model import KObject, ObjectKey
from controller.monitoring import ControllerMetrics
from controller.sources.kube import KubeSource, api_client
from controller.store import ConfigStore
from controller.translate import Translator
from controller.validation import parse_documents, parse_yaml_text
from tests.support.config_files import demo_client
from tests.support.fake_kube import namespace, serve
from tests.support.xds_controller import wait_for

DB = "demo/db.demo.svc.cluster.local"
SLICE_UID = "Kubernetes/discovery.k8s.io/EndpointSlice/demo/db-abc/"

BASE = (
    demo_client("n1")
    + """---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec: {clusterIP: 10.96.0.50, ports: [{name: pg, port: 5432, targetPort: 6432}, {name: metrics, port: 9187}]}
"""
)

SLICE = """apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-abc, namespace: demo, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
endpoints:
- addresses: [192.168.10.1]
  conditions: {ready: true, serving: true, terminating: false}
  nodeName: n1
  zone: z1
- addresses: [192.168.10.2]
- addresses: [192.168.10.3]
  conditions: {ready: false, serving: false, terminating: true}
ports: [{name: pg, port: 7432, protocol: TCP}, {name: metrics, port: 9187}, {name: dns, port: 53, protocol: UDP}]
"""


def parse(text: str) -> list[KObject]:
    result = parse_yaml_text("t.yaml", text)
    assert result.errors == []
    return result.objects


def translated(text: str) -> Translator:
    t = Translator()
    t.apply(parse(text))
    return t


def slice_workloads(t: Translator) -> dict[str, wl.Workload]:
    return {
        name.removeprefix(SLICE_UID): a.workload
        for name, a in t.addresses().items()
        if a.HasField("workload") and name.startswith(SLICE_UID)
    }


def ports_of(workload: wl.Workload, service: str = DB) -> list[tuple[int, int]]:
    return [(p.service_port, p.target_port) for p in workload.services[service].ports]


def test_selectorless_service_endpoints_become_workloads_and_are_balanced() -> None:
    t = translated(BASE + "---\n" + SLICE)
    workloads = slice_workloads(t)
    assert sorted(workloads) == ["192.168.10.1", "192.168.10.2", "192.168.10.3"]
    health = {ip: w.status for ip, w in workloads.items()}
    # Ready unset is unknown, which Kubernetes reads as ready; serving and terminating are not read (istiod).
    assert health == {"192.168.10.1": wl.HEALTHY, "192.168.10.2": wl.HEALTHY, "192.168.10.3": wl.UNHEALTHY}
    first = workloads["192.168.10.1"]
    assert (first.name, first.namespace, first.cluster_id) == ("db-abc", "demo", "Kubernetes")
    assert socket.inet_ntoa(first.addresses[0]) == "192.168.10.1"
    assert first.tunnel_protocol == wl.NONE  # not in the mesh: nothing says who it is
    assert first.network_mode == wl.HOST_NETWORK
    assert (first.service_account, first.node, first.HasField("locality")) == ("", "", False)
    assert list(first.authorization_policies) == []
    # The slice's port of each name serves the Service port of that name; the UDP port maps nothing.
    assert ports_of(first) == [(5432, 7432), (9187, 9187)]
    service = t.addresses()[DB].service
    assert service.load_balancing.mode != wl.LoadBalancing.PASSTHROUGH

    store = WorkloadStore()
    store.put(list(t.addresses().values()))
    client = t.addresses()["Kubernetes//Pod/demo/client"].workload
    rng = random.Random(7)
    targets = {route(store, "n1", client, ("10.96.0.50", 5432), rng=rng).target for _ in range(60)}
    # Never the endpoint that is not ready, never the VIP itself (as a pass-through would).
    assert targets == {("192.168.10.1", 7432), ("192.168.10.2", 7432)}
    r = route(store, "n1", client, ("10.96.0.50", 9187), rng=rng)
    assert r.kind is RouteKind.PASSTHROUGH and r.target is not None and r.target[1] == 9187  # plain TCP, no tunnel


def test_service_without_slices_is_still_passed_through() -> None:
    t = translated(BASE)
    assert t.addresses()[DB].service.load_balancing.mode == wl.LoadBalancing.PASSTHROUGH
    assert slice_workloads(t) == {}


def test_slice_changes_reach_the_workloads_and_the_service() -> None:
    t = Translator()
    t.apply(parse(SLICE))
    assert slice_workloads(t) == {}  # no Service of that name yet: the slice serves nothing
    t.apply(parse(BASE))
    assert len(slice_workloads(t)) == 3
    assert t.addresses()[DB].service.load_balancing.mode != wl.LoadBalancing.PASSTHROUGH

    delta = t.apply(
        parse(SLICE.replace("conditions: {ready: true, serving: true", "conditions: {ready: false, serving: true"))
    )
    changed = delta.addresses[SLICE_UID + "192.168.10.1"]
    assert changed is not None and changed.workload.status == wl.UNHEALTHY
    assert set(delta.addresses) == {SLICE_UID + "192.168.10.1"}

    edited = SLICE.replace("{name: pg, port: 7432", "{name: pg, port: 8432").replace("192.168.10.2", "192.168.10.9")
    delta = t.apply(parse(edited))
    assert delta.addresses[SLICE_UID + "192.168.10.2"] is None
    assert ports_of(slice_workloads(t)["192.168.10.9"]) == [(5432, 8432), (9187, 9187)]

    # The Service's ports are what the slice's port names map to.
    delta = t.apply(parse(BASE.replace("port: 5432, targetPort: 6432", "port: 15432, targetPort: 6432")))
    assert ports_of(slice_workloads(t)["192.168.10.9"]) == [(15432, 8432), (9187, 9187)]

    delta = t.apply([], [ObjectKey("EndpointSlice", "demo", "db-abc")])
    assert slice_workloads(t) == {}
    assert delta.addresses[DB] is not None  # back to passing through, pushed
    assert t.addresses()[DB].service.load_balancing.mode == wl.LoadBalancing.PASSTHROUGH


def test_service_deleted_takes_its_slice_workloads() -> None:
    t = translated(BASE + "---\n" + SLICE)
    t.apply([], [ObjectKey("Service", "demo", "db")])
    assert slice_workloads(t) == {}


KUBE_SLICE_OF_SELECTED = """apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x7k2p
  namespace: demo
  labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}
addressType: IPv4
endpoints:
- addresses: [10.1.0.7]
  conditions: {ready: true}
  targetRef: {kind: Pod, namespace: demo, name: web-0, uid: u-web-0}
  nodeName: n1
ports: [{name: "", port: 8080, protocol: TCP}]
"""
SELECTED = """apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {selector: {app: web}, clusterIP: 10.96.0.60, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: demo, uid: u-web-0, labels: {app: web}}
spec: {nodeName: n1}
status: {podIP: 10.1.0.7}
"""


def test_kubernetes_slice_of_a_selected_service_changes_nothing() -> None:
    without = translated(BASE + "---\n" + SELECTED).addresses()
    t = translated(BASE + "---\n" + SELECTED)
    delta = t.apply(parse(KUBE_SLICE_OF_SELECTED))
    assert not delta
    assert t.addresses() == without


def test_pod_named_by_a_slice_joins_the_selectorless_service() -> None:
    # istiod's matchingServicesWithoutSelectors: the pod keeps its own (richer) workload, which carries the
    # Service; the endpoint is no workload of its own.
    pod = SELECTED.split("---\n")[1].replace("labels: {app: web}", "labels: {app: other}")
    slice_text = KUBE_SLICE_OF_SELECTED.replace("service-name: web", "service-name: db").replace('name: ""', "name: pg")
    t = translated(BASE + "---\n" + pod)
    assert DB not in t.addresses()["Kubernetes//Pod/demo/web-0"].workload.services
    delta = t.apply(parse(slice_text))
    web = t.addresses()["Kubernetes//Pod/demo/web-0"].workload
    assert delta.addresses["Kubernetes//Pod/demo/web-0"] is not None
    assert ports_of(web) == [(5432, 6432), (9187, 9187)]  # the Service's target ports, resolved on the pod
    assert [name for name in t.addresses() if "EndpointSlice" in name] == []
    # Another pod of the same name (a new uid) is not the one the slice names.
    t.apply(parse(pod.replace("uid: u-web-0", "uid: u-web-0-new")))
    assert DB not in t.addresses()["Kubernetes//Pod/demo/web-0"].workload.services
    t.apply(parse(slice_text.replace("uid: u-web-0}", "uid: u-web-0-new}")))
    assert DB in t.addresses()["Kubernetes//Pod/demo/web-0"].workload.services


def test_fqdn_slice_is_accepted_and_ignored() -> None:
    fqdn = SLICE.replace("addressType: IPv4", "addressType: FQDN")
    for ip in ("192.168.10.1", "192.168.10.2", "192.168.10.3"):
        fqdn = fqdn.replace(ip, f"db{ip[-1]}.example.com")
    t = translated(BASE + "---\n" + fqdn)
    assert slice_workloads(t) == {}
    assert t.addresses()[DB].service.load_balancing.mode == wl.LoadBalancing.PASSTHROUGH


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("addressType: IPv4\n", "", "addressType: required field is missing"),
        ("addressType: IPv4", "addressType: IPv5", "addressType: unknown value 'IPv5'"),
        ("[192.168.10.2]", "[fd00::2]", "endpoints[1].addresses[0]: 'fd00::2' is not an IPv4 address"),
        ("[192.168.10.2]", "[192.168.10.256]", "endpoints[1].addresses[0]: '192.168.10.256' is not a valid IP"),
        ("- addresses: [192.168.10.2]", "- addresses: []", "endpoints[1].addresses: must not be empty"),
        ("{ready: false,", "{ready: 'no',", "endpoints[2].conditions.ready: must be a boolean"),
        ("nodeName: n1", "nodeName: N_1", "endpoints[0].nodeName: 'N_1' is not a valid node name"),
        ("zone: z1", "zone: z1\n  weight: 3", "endpoints[0].weight: unknown field"),
        ("port: 9187}", "port: 0}", "ports[1].port: 0 is out of range (1-65535)"),
        ("name: metrics, port", "name: pg, port", "ports[1].name: duplicate port name 'pg'"),
        ("protocol: UDP", "protocol: QUIC", "ports[2].protocol: unknown value 'QUIC'"),
        ("service-name: db", "service-name: Db_1", "metadata.labels[kubernetes.io/service-name]: 'Db_1' cannot"),
        ("ports: [", "spec: {}\nports: [", "spec: unknown field"),
    ],
)
def test_bad_slices_are_rejected_naming_the_field(old: str, new: str, error: str) -> None:
    assert old in SLICE
    result = parse_yaml_text("db.yaml", SLICE.replace(old, new, 1))
    assert result.objects == []
    assert any(str(e).startswith(f"db.yaml:EndpointSlice/demo/db-abc: {error}") for e in result.errors), result.errors


def test_the_api_servers_defaults_apply_to_ports() -> None:
    # The API server writes name "" and protocol TCP when omitted; a file's slice must read the same.
    slc = parse(SLICE.replace("{name: metrics, port: 9187}", "{port: 9187}"))[0]
    assert [(p.name, p.protocol) for p in slc.ports][1] == ("", "TCP")  # type: ignore[union-attr]


def _kube_slice(ready: bool) -> dict[str, Any]:
    """An EndpointSlice as the API server serves it."""
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": "db-abc",
            "namespace": "demo",
            "uid": "3f1c",
            "generateName": "db-",
            "labels": {"kubernetes.io/service-name": "db"},
            "managedFields": [],
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["192.168.10.1"], "conditions": {"ready": ready, "serving": ready, "terminating": False}},
        ],
        "ports": [{"name": "pg", "port": 7432, "protocol": "TCP"}],
    }


async def test_kube_source_lists_and_watches_endpointslices(tmp_path: Path) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "db", "namespace": "demo", "uid": "s1"},
        "spec": {"clusterIP": "10.96.0.50", "clusterIPs": ["10.96.0.50"], "ports": [{"name": "pg", "port": 5432}]},
    }
    with serve() as fake:
        fake.upsert(namespace("demo"))
        fake.upsert(service)
        fake.upsert(_kube_slice(ready=True))
        store = ConfigStore(Translator(), ControllerMetrics())
        source = KubeSource(store, api_client(str(fake.write_kubeconfig(tmp_path / "kubeconfig"))))
        await asyncio.wait_for(source.start(), 20)
        try:

            def status() -> Any:
                found = store.translator.addresses().get(SLICE_UID + "192.168.10.1")
                return found.workload.status if found is not None else None

            assert status() == wl.HEALTHY  # from the list (items without kind, as the API server sends them)
            assert fake.count("GET", "/apis/discovery.k8s.io/v1/endpointslices", watch=False) == 1
            fake.upsert(_kube_slice(ready=False))
            await wait_for(lambda: status() == wl.UNHEALTHY, what="slice change through the watch")
            assert fake.count("GET", "/apis/discovery.k8s.io/v1/endpointslices", watch=True) >= 1
            fake.delete("EndpointSlice", "demo", "db-abc")
            await wait_for(lambda: status() is None, what="slice deletion")
        finally:
            source.stop()


def test_slice_turning_from_names_to_addresses_brings_its_pods_in() -> None:
    pod = SELECTED.split("---\n")[1].replace("labels: {app: web}", "labels: {app: other}")
    slice_text = KUBE_SLICE_OF_SELECTED.replace("service-name: web", "service-name: db")
    t = translated(BASE + "---\n" + pod + "---\n" + slice_text.replace("addressType: IPv4", "addressType: FQDN"))
    assert DB not in t.addresses()["Kubernetes//Pod/demo/web-0"].workload.services  # istiod skips FQDN slices
    t.apply(parse(slice_text))
    assert DB in t.addresses()["Kubernetes//Pod/demo/web-0"].workload.services


def test_a_slice_the_api_server_labels_for_no_service_is_accepted_and_unused() -> None:
    # Another controller's bag of addresses: nothing to reject (the API server took it), nothing to serve.
    doc = _kube_slice(ready=True)
    doc["metadata"]["labels"] = {"kubernetes.io/service-name": "Not_A_Service"}
    result = parse_documents("kube", [doc], strict=False)
    assert result.errors == [] and len(result.objects) == 1
    t = translated(BASE)
    assert not t.apply(result.objects)
