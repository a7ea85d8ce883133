"""Pods, services, ServiceEntries and WorkloadEntries to istio.workload Addresses (YAML in, protobuf out)."""

from __future__ import annotations

import socket

import pytest
from google.protobuf import text_format

from api.istio.workload import workload_pb2 as wl
from controller.model import ObjectKey
from controller.translate import Translator, TranslatorConfig
from controller.validation import parse_yaml_text

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels: {topology.kubernetes.io/region: eu, topology.kubernetes.io/zone: eu-1}
spec: {podCIDR: 10.1.0.0/24}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: admin, port: 9000}
  - {name: grpc, port: 9090, targetPort: 19090, appProtocol: grpc}
  - {name: dns, port: 53, protocol: UDP}
"""


def ip(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


def translate(*texts: str, config: TranslatorConfig | None = None) -> Translator:
    translator = Translator(config)
    objects = []
    for i, text in enumerate(texts):
        result = parse_yaml_text(f"t{i}.yaml", text)
        assert result.errors == []
        objects += result.objects
    translator.apply(objects, [])
    return translator


def pod(name: str, ns: str = "demo", labels: str = "{app: web}", extra_spec: str = "", status: str = "") -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {labels}}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}]}}]
  {extra_spec}
status: {{podIP: 10.1.0.5 {status}}}
"""


def workload(translator: Translator, uid: str) -> wl.Workload:
    address = translator.addresses()[uid]
    assert address.WhichOneof("type") == "workload"
    return address.workload


def expect(textproto: str) -> wl.Workload:
    return text_format.Parse(textproto, wl.Workload())


def test_enrolled_pod_full_workload() -> None:
    t = translate(CLUSTER, pod("web-0"))
    got = workload(t, "Kubernetes//Pod/demo/web-0")
    want = expect(
        """
        uid: "Kubernetes//Pod/demo/web-0" name: "web-0" namespace: "demo"
        tunnel_protocol: HBONE service_account: "web" node: "node-a"
        canonical_name: "web" canonical_revision: "latest" workload_type: POD workload_name: "web-0"
        cluster_id: "Kubernetes" status: HEALTHY network_mode: STANDARD
        locality { region: "eu" zone: "eu-1" }
        services {
          key: "demo/web.demo.svc.cluster.local"
          value {
            ports { service_port: 80 target_port: 8080 }
            ports { service_port: 9000 target_port: 9000 }
            ports { service_port: 9090 target_port: 19090 }
          }
        }
        """
    )
    want.addresses.append(ip("10.1.0.5"))
    assert got == want


def test_service_resource() -> None:
    t = translate(CLUSTER)
    address = t.addresses()["demo/web.demo.svc.cluster.local"]
    want = text_format.Parse(
        """
        name: "web" namespace: "demo" hostname: "web.demo.svc.cluster.local"
        ports { service_port: 80 target_port: 0 }
        ports { service_port: 9000 target_port: 9000 }
        ports { service_port: 9090 target_port: 19090 app_protocol: GRPC }
        canonical: true
        """,
        wl.Service(),
    )
    want.addresses.add(address=ip("10.96.0.10"))
    assert address.service == want


@pytest.mark.parametrize(
    ("extra_spec", "annotations", "want_lb", "want_families"),
    [
        ("", "{}", None, wl.AUTOMATIC),
        ("internalTrafficPolicy: Local", "{}", "routing_preference: NODE mode: STRICT", wl.AUTOMATIC),
        (
            "trafficDistribution: PreferClose",
            "{}",
            "routing_preference: [NETWORK, REGION, ZONE, SUBZONE] mode: FAILOVER",
            wl.AUTOMATIC,
        ),
        (  # the annotation predates the field; the field, when set, decides
            "",
            "{networking.istio.io/traffic-distribution: PreferClose}",
            "routing_preference: [NETWORK, REGION, ZONE, SUBZONE] mode: FAILOVER",
            wl.AUTOMATIC,
        ),
        ("trafficDistribution: Other", "{networking.istio.io/traffic-distribution: PreferClose}", None, wl.AUTOMATIC),
        (  # Local wins over PreferClose
            "{internalTrafficPolicy: Local, trafficDistribution: PreferClose}",
            "{}",
            "routing_preference: NODE mode: STRICT",
            wl.AUTOMATIC,
        ),
        ("publishNotReadyAddresses: true", "{}", "health_policy: ALLOW_ALL", wl.AUTOMATIC),
        ("ipFamilies: [IPv6]", "{}", None, wl.IPV6_ONLY),
        ("ipFamilies: [IPv4, IPv6]", "{}", None, wl.DUAL),
    ],
)
def test_service_load_balancing_and_families_as_istiod_sets_them(
    extra_spec: str, annotations: str, want_lb: str | None, want_families: int
) -> None:
    spec = extra_spec if extra_spec.startswith("{") else "{" + extra_spec + "}"
    svc = f"""
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: demo, annotations: {annotations}}}
spec:
  selector: {{app: web}}
  clusterIP: 10.96.0.20
  ports: [{{port: 80}}]
  <<: {spec}
"""
    service = translate(CLUSTER, svc).addresses()["demo/lb.demo.svc.cluster.local"].service
    assert service.ip_families == want_families
    if want_lb is None:
        assert not service.HasField("load_balancing")
    else:
        assert service.load_balancing == text_format.Parse(want_lb, wl.LoadBalancing())


@pytest.mark.parametrize(
    ("ns", "labels", "extra_spec", "tunnel", "mode"),
    [
        ("demo", "{app: web}", "", wl.HBONE, wl.STANDARD),  # namespace enrolled
        ("demo", "{app: web, istio.io/dataplane-mode: none}", "", wl.NONE, wl.STANDARD),  # pod opts out
        ("demo", "{app: web}", "hostNetwork: true", wl.NONE, wl.HOST_NETWORK),  # never hostNetwork
        ("legacy", "{app: web}", "", wl.NONE, wl.STANDARD),  # namespace not enrolled
        ("legacy", "{app: web, istio.io/dataplane-mode: ambient}", "", wl.HBONE, wl.STANDARD),  # pod opts in
        ("nowhere", "{app: web}", "", wl.NONE, wl.STANDARD),  # unknown namespace
    ],
)
def test_enrollment(ns: str, labels: str, extra_spec: str, tunnel: int, mode: int) -> None:
    t = translate(CLUSTER, pod("p", ns=ns, labels=labels, extra_spec=extra_spec))
    got = workload(t, f"Kubernetes//Pod/{ns}/p")
    assert (got.tunnel_protocol, got.network_mode) == (tunnel, mode)


@pytest.mark.parametrize(
    ("status", "present", "health"),
    [
        ("", True, wl.HEALTHY),
        (", phase: Running", True, wl.HEALTHY),
        (", phase: Pending", True, wl.UNHEALTHY),
        (", phase: Running, conditions: [{type: Ready, status: 'False'}]", True, wl.UNHEALTHY),
        (", phase: Running, conditions: [{type: Ready, status: 'True'}]", True, wl.HEALTHY),
        (", phase: Failed", False, None),
        (", phase: Succeeded", False, None),
    ],
)
def test_pod_status(status: str, present: bool, health: int | None) -> None:
    t = translate(CLUSTER, pod("p", status=status))
    uid = "Kubernetes//Pod/demo/p"
    assert (uid in t.addresses()) == present
    if present:
        assert workload(t, uid).status == health


def test_pod_without_ip_has_no_workload_but_counts_for_node_identity() -> None:
    text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\nspec: {nodeName: node-b}\n"
    t = translate(CLUSTER, text)
    assert "Kubernetes//Pod/demo/p" not in t.addresses()
    assert t.has_pod("node-b", "demo", "default")
    assert t.pod_identities_on_node("node-b") == {("demo", "default")}
    assert not t.has_pod("node-a", "demo", "default")


def test_named_target_port_missing_on_pod_excludes_that_port() -> None:
    text = """
apiVersion: v1
kind: Pod
metadata: {name: bare, namespace: demo, labels: {app: web}}
spec: {nodeName: node-a}
status: {podIP: 10.1.0.9}
"""
    t = translate(CLUSTER, text)
    ports = workload(t, "Kubernetes//Pod/demo/bare").services["demo/web.demo.svc.cluster.local"].ports
    assert [(p.service_port, p.target_port) for p in ports] == [(9000, 9000), (9090, 19090)]


def test_default_service_account_and_trust_domain_are_elided() -> None:
    text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: demo}\n"
    text += "spec: {nodeName: n}\nstatus: {podIP: fd00::7}\n"
    got = workload(translate(CLUSTER, text), "Kubernetes//Pod/demo/p")
    assert (got.service_account, got.trust_domain, list(got.addresses)) == ("", "", [ip("fd00::7")])
    other = workload(
        translate(CLUSTER, text, config=TranslatorConfig(trust_domain="corp.example", cluster_id="c1")),
        "c1//Pod/demo/p",
    )
    assert (other.trust_domain, other.cluster_id) == ("corp.example", "c1")


def test_workload_name_from_owner() -> None:
    text = """
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f-abcde
  generateName: web-7d9f-
  namespace: demo
  labels: {app: web, pod-template-hash: 7d9f, version: v2}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f, uid: u, controller: true}]
spec: {nodeName: node-a}
status: {podIP: 10.1.0.6}
"""
    got = workload(translate(CLUSTER, text), "Kubernetes//Pod/demo/web-7d9f-abcde")
    assert (got.workload_name, got.workload_type, got.canonical_name, got.canonical_revision) == (
        "web",
        wl.POD,  # istiod sends POD for every pod since Istio 1.25 (#55032)
        "web",
        "v2",
    )


SERVICE_ENTRY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: demo}
spec:
  hosts: [api.example.com]
  addresses: [192.0.2.10, 198.51.100.0/24]
  ports: [{number: 443, name: tls, protocol: TLS, targetPort: 8443}]
  resolution: STATIC
  endpoints:
  - {address: 192.0.2.11, ports: {tls: 9443}, serviceAccount: ext-sa, locality: eu/eu-1}
  - {address: 192.0.2.12, weight: 3}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: demo}
spec:
  hosts: [vms.demo.internal]
  ports: [{number: 80, name: http}]
  workloadSelector: {labels: {app: vm}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: demo, annotations: {ambient.istio.io/redirection: enabled}}
spec: {address: 192.0.2.20, labels: {app: vm}, ports: {http: 8080}, serviceAccount: vm}
"""


def test_service_entry_and_workload_entry() -> None:
    t = translate(CLUSTER, SERVICE_ENTRY)
    service = t.addresses()["demo/api.example.com"].service
    assert (service.name, service.hostname, [(p.service_port, p.target_port) for p in service.ports]) == (
        "ext",
        "api.example.com",
        [(443, 8443)],
    )
    assert [(a.address, a.HasField("length"), a.length) for a in service.addresses] == [
        (ip("192.0.2.10"), False, 0),
        (ip("198.51.100.0"), True, 24),
    ]
    first = workload(t, "Kubernetes/networking.istio.io/ServiceEntry/demo/ext/192.0.2.11")
    assert (first.service_account, first.tunnel_protocol, first.locality.zone) == ("ext-sa", wl.NONE, "eu-1")
    assert [(p.service_port, p.target_port) for p in first.services["demo/api.example.com"].ports] == [(443, 9443)]
    second = workload(t, "Kubernetes/networking.istio.io/ServiceEntry/demo/ext/192.0.2.12")
    assert (second.capacity.value, second.services["demo/api.example.com"].ports[0].target_port) == (3, 8443)
    vm = workload(t, "Kubernetes/networking.istio.io/WorkloadEntry/demo/vm-1")
    assert (vm.tunnel_protocol, vm.service_account, list(vm.addresses)) == (wl.HBONE, "vm", [ip("192.0.2.20")])
    assert [(p.service_port, p.target_port) for p in vm.services["demo/vms.demo.internal"].ports] == [(80, 8080)]
    assert "demo/vms.demo.internal" in t.addresses()


def test_kubernetes_service_wins_a_hostname_claimed_by_a_service_entry() -> None:
    clash = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shadow, namespace: demo}
spec: {hosts: [web.demo.svc.cluster.local], ports: [{number: 1, name: x}]}
"""
    t = translate(CLUSTER, clash)
    assert t.addresses()["demo/web.demo.svc.cluster.local"].service.name == "web"
    t.apply([], [ObjectKey("Service", "demo", "web")])
    assert t.addresses()["demo/web.demo.svc.cluster.local"].service.name == "shadow"
