"""Target ports of workloads selected by a service, against istiod's constructServices and
constructServicesFromWorkloadEntry: a WorkloadEntry's `ports` map a service port *name* to its own port (for a
Kubernetes Service too), and a ServiceEntry port name is matched against a selected pod's container port names."""

from __future__ import annotations

from api.istio.workload import workload_pb2 as wl
from controller.translate import Translator
from controller.validation import parse_yaml_text

NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n"
SERVICE = """apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}, {name: admin, port: 9000}]
"""


def vm(ports: str) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: vm, namespace: demo}}
spec: {{address: 192.0.2.20, labels: {{app: web}}, ports: {ports}}}
"""


def ports_of(uid: str, service: str, *texts: str) -> dict[int, int]:
    result = parse_yaml_text("t.yaml", "---\n".join(texts))
    assert result.errors == []
    t = Translator()
    t.apply(result.objects)
    workload = t.addresses()[uid].workload
    return {p.service_port: p.target_port for p in workload.services[service].ports}


VM_UID = "Kubernetes/networking.istio.io/WorkloadEntry/demo/vm"
WEB = "demo/web.demo.svc.cluster.local"


def test_workload_entry_port_named_like_the_service_port_is_its_target() -> None:
    # It was ignored: traffic for the VM went to the Service's targetPort 8080, where the VM serves nothing.
    assert ports_of(VM_UID, WEB, NS, SERVICE, vm("{http: 9080}")) == {80: 9080, 9000: 9000}


def test_workload_entry_without_such_a_port_keeps_the_service_target() -> None:
    assert ports_of(VM_UID, WEB, NS, SERVICE, vm("{other: 1234}")) == {80: 8080, 9000: 9000}


def test_service_entry_port_name_picks_the_selected_pods_container_port() -> None:
    pod = """apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: demo, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: app, ports: [{name: https, containerPort: 8443}]}]}
status: {podIP: 10.1.0.5}
"""
    entry = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: demo}
spec:
  hosts: [api.internal]
  addresses: [10.97.0.1]
  ports: [{number: 443, name: https}, {number: 80, name: http}]
  resolution: STATIC
  workloadSelector: {labels: {app: web}}
"""
    # 443 went to the pod's port 443, where nothing listens.
    got = ports_of("Kubernetes//Pod/demo/web-0", "demo/api.internal", NS, pod, entry)
    assert got == {443: 8443, 80: 80}


def test_workload_entry_labelled_as_speaking_hbone_gets_it() -> None:
    # istiod's SupportsTunnel: networking.istio.io/tunnel=http marks a native HBONE endpoint. It was sent
    # plaintext, which such a VM's tunnel endpoint does not serve (and which bypasses its policy).
    entry = """apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: demo, labels: {networking.istio.io/tunnel: http}}
spec: {address: 192.0.2.20}
"""
    result = parse_yaml_text("t.yaml", entry)
    t = Translator()
    t.apply(result.objects)
    workload = t.addresses()[VM_UID].workload
    assert (workload.tunnel_protocol, workload.native_tunnel) == (wl.HBONE, True)
    plain = parse_yaml_text("t.yaml", entry.replace("labels: {networking.istio.io/tunnel: http}", "labels: {}"))
    t.apply(plain.objects)
    assert t.addresses()[VM_UID].workload.tunnel_protocol == wl.NONE
