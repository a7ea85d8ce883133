# ruff: noqa: E501  (the table holds full error strings verbatim; wrapping them would hide the exact text)
"""Validation of config documents: each error shape, the error string, and that one bad object spares the rest."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from controller.model import (
    AuthorizationPolicy,
    ContainerPort,
    Namespace,
    Node,
    ObjectKey,
    OpaqueObject,
    PeerAuthentication,
    Pod,
    Service,
    ServiceEntry,
    ServicePort,
    WorkloadEntry,
)
from controller.validation import ConfigError, parse_documents, parse_yaml_text

BASE: dict[str, dict[str, Any]] = {
    "Namespace": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}},
    "Node": {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}, "spec": {"podCIDR": "10.1.0.0/24"}},
    "Pod": {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "demo", "labels": {"app": "web"}},
        "spec": {
            "nodeName": "node-a",
            "serviceAccountName": "web",
            "containers": [{"name": "app", "image": "x", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {"podIP": "10.1.0.5"},
    },
    "Service": {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "demo"},
        "spec": {
            "selector": {"app": "web"},
            "clusterIP": "10.96.0.10",
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}, {"name": "m", "port": 9090}],
        },
    },
    "ServiceEntry": {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "ext", "namespace": "demo"},
        "spec": {
            "hosts": ["api.example.com"],
            "addresses": ["192.0.2.10"],
            "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
            "resolution": "STATIC",
            "endpoints": [{"address": "192.0.2.11"}],
        },
    },
    "WorkloadEntry": {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "WorkloadEntry",
        "metadata": {"name": "vm-1", "namespace": "demo"},
        "spec": {"address": "192.0.2.20", "labels": {"app": "vm"}, "ports": {"http": 8080}},
    },
    "AuthorizationPolicy": {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-client", "namespace": "demo"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "action": "ALLOW",
            "rules": [
                {
                    "from": [
                        {"source": {"principals": ["cluster.local/ns/demo/sa/client"], "ipBlocks": ["10.0.0.0/8"]}}
                    ],
                    "to": [{"operation": {"ports": ["8080"]}}],
                    "when": [{"key": "source.namespace", "values": ["demo"]}],
                }
            ],
        },
    },
    "PeerAuthentication": {
        "apiVersion": "security.istio.io/v1beta1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "demo"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {9090: {"mode": "PERMISSIVE"}},
        },
    },
}


def _doc(base: str, /, **changes: Any) -> dict[str, Any]:
    """BASE[kind] with dotted-path changes applied (value None deletes the key)."""
    doc = copy.deepcopy(BASE[base])
    for dotted, value in changes.items():
        target: Any = doc
        parts = dotted.split("__")
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last: Any = int(parts[-1]) if isinstance(target, list) else parts[-1]
        if value is None:
            del target[last]
        else:
            target[last] = value
    return doc


@pytest.mark.parametrize("kind", sorted(BASE))
def test_base_documents_are_valid(kind: str) -> None:
    result = parse_documents("f.yaml", [BASE[kind]])
    assert result.errors == []
    assert [o.key.kind for o in result.objects] == [kind]


ERROR_CASES = [
    # (document, expected error string) — the full user-facing text, so the format itself is under test.
    (_doc("Pod", metadata__name=None), "f.yaml:Pod/demo/#1: metadata.name: required field is missing"),
    (_doc("Pod", metadata=None), "f.yaml:Pod//#1: metadata: required field is missing"),
    (
        _doc("Namespace", metadata__name="Demo_1"),
        "f.yaml:Namespace//Demo_1: metadata.name: 'Demo_1' is not a DNS label (lowercase alphanumerics and '-', max 63)",
    ),
    (_doc("Pod", kind=None), "f.yaml:?/demo/web-0: kind: required field is missing"),
    (
        _doc("Pod", kind="Deployment"),
        "f.yaml:Deployment/demo/web-0: kind: unknown kind 'Deployment' in document #1 (known: AuthorizationPolicy, "
        "EndpointSlice, Gateway, HTTPRoute, Namespace, Node, PeerAuthentication, Pod, RequestAuthentication, Service, ServiceEntry, WorkloadEntry)",
    ),
    (
        _doc("Pod", apiVersion="apps/v1"),
        "f.yaml:Pod/demo/web-0: apiVersion: 'apps/v1' does not serve kind Pod (use v1)",
    ),
    (
        _doc("AuthorizationPolicy", apiVersion="networking.istio.io/v1"),
        "f.yaml:AuthorizationPolicy/demo/allow-client: apiVersion: 'networking.istio.io/v1' does not serve kind "
        "AuthorizationPolicy (use security.istio.io/v1 or security.istio.io/v1beta1)",
    ),
    (_doc("Pod", apiVersion=None), "f.yaml:Pod/demo/web-0: apiVersion: required field is missing"),
    (_doc("Pod", spec__nodeNmae="x"), "f.yaml:Pod/demo/web-0: spec.nodeNmae: unknown field"),
    (_doc("Pod", extra=1), "f.yaml:Pod/demo/web-0: extra: unknown field"),
    (_doc("Pod", metadata__lables={}), "f.yaml:Pod/demo/web-0: metadata.lables: unknown field"),
    (
        _doc("Pod", spec__containers__0__ports__0__containerPort=0),
        "f.yaml:Pod/demo/web-0: spec.containers[0].ports[0].containerPort: 0 is out of range (1-65535)",
    ),
    (
        _doc("Pod", status__podIP="10.1.0.300"),
        "f.yaml:Pod/demo/web-0: status.podIP: '10.1.0.300' is not a valid IP address",
    ),
    (_doc("Pod", spec__hostNetwork="yes"), "f.yaml:Pod/demo/web-0: spec.hostNetwork: must be a boolean, got a string"),
    (
        _doc("Pod", metadata__labels={"app": True}),
        "f.yaml:Pod/demo/web-0: metadata.labels[app]: value must be a string (quote it), got a boolean",
    ),
    (
        _doc("Pod", metadata__labels={"bad key!": "x"}),
        "f.yaml:Pod/demo/web-0: metadata.labels[bad key!]: label key 'bad key!': name must be 1-63 alphanumerics, "
        "'-', '_' or '.', starting and ending alphanumeric",
    ),
    (
        _doc("Service", spec__selector={"app": "a b"}),
        "f.yaml:Service/demo/web: spec.selector[app]: label value 'a b': at most 63 alphanumerics, '-', '_' or '.', "
        "starting and ending alphanumeric",
    ),
    (
        _doc("Service", spec__ports__0__port=70000),
        "f.yaml:Service/demo/web: spec.ports[0].port: 70000 is out of range (1-65535)",
    ),
    (
        _doc("Service", spec__ports__0__port="80"),
        "f.yaml:Service/demo/web: spec.ports[0].port: must be an integer, got a string",
    ),
    (
        _doc("Service", spec__ports__0__targetPort="HTTP_PORT"),
        "f.yaml:Service/demo/web: spec.ports[0].targetPort: 'HTTP_PORT' is not a valid port name "
        "(1-15 lowercase alphanumerics or '-', with a letter, no '--')",
    ),
    (
        _doc("Service", spec__ports__0__targetPort=0),
        "f.yaml:Service/demo/web: spec.ports[0].targetPort: 0 is out of range (1-65535)",
    ),
    (
        _doc("Service", spec__ports__1__name=None),
        "f.yaml:Service/demo/web: spec.ports[1].name: required when the service has more than one port",
    ),
    (_doc("Service", spec__ports__1__port=80), "f.yaml:Service/demo/web: spec.ports[1].port: duplicate port 80/TCP"),
    (
        _doc("Service", spec__clusterIP="10.96.0"),
        "f.yaml:Service/demo/web: spec.clusterIP: '10.96.0' is not a valid IP address",
    ),
    (_doc("Service", spec=None), "f.yaml:Service/demo/web: spec: required field is missing"),
    (
        _doc("Service", spec__internalTrafficPolicy="Node"),
        "f.yaml:Service/demo/web: spec.internalTrafficPolicy: unknown value 'Node' (valid: Cluster, Local)",
    ),
    (
        _doc("Service", spec__ipFamilies=["IPv5"]),
        "f.yaml:Service/demo/web: spec.ipFamilies[0]: 'IPv5' is not IPv4 or IPv6",
    ),
    (
        _doc("Service", spec__publishNotReadyAddresses="yes"),
        "f.yaml:Service/demo/web: spec.publishNotReadyAddresses: must be a boolean, got a string",
    ),
    (
        _doc("Node", spec__podCIDR="10.1.0.1/24"),
        "f.yaml:Node//node-a: spec.podCIDR: '10.1.0.1/24' is not a valid CIDR: 10.1.0.1/24 has host bits set",
    ),
    (
        _doc("Node", spec__podCIDR="10.1.0.0"),
        "f.yaml:Node//node-a: spec.podCIDR: '10.1.0.0' is not a CIDR (address/prefix-length)",
    ),
    (_doc("ServiceEntry", spec__hosts=None), "f.yaml:ServiceEntry/demo/ext: spec.hosts: required field is missing"),
    (
        _doc("ServiceEntry", spec__addresses=["300.0.0.0/8"]),
        "f.yaml:ServiceEntry/demo/ext: spec.addresses[0]: '300.0.0.0/8' is not a valid IP address or CIDR",
    ),
    (
        _doc("ServiceEntry", spec__endpoints__0__address="vm.example.com"),
        "f.yaml:ServiceEntry/demo/ext: spec.endpoints[0].address: 'vm.example.com' must be an IP address with resolution STATIC",
    ),
    (
        _doc("ServiceEntry", spec__resolution="MAGIC"),
        "f.yaml:ServiceEntry/demo/ext: spec.resolution: unknown value 'MAGIC' (valid: NONE, STATIC, DNS, DNS_ROUND_ROBIN)",
    ),
    (
        _doc("WorkloadEntry", spec__ports={"http": 0}),
        "f.yaml:WorkloadEntry/demo/vm-1: spec.ports[http]: 0 is out of range (1-65535)",
    ),
    (
        _doc("WorkloadEntry", spec__address=None),
        "f.yaml:WorkloadEntry/demo/vm-1: spec.address: required field is missing",
    ),
    (
        _doc("AuthorizationPolicy", spec__action="LOG"),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.action: unknown value 'LOG' (valid: ALLOW, DENY, AUDIT, CUSTOM)",
    ),
    (
        _doc("AuthorizationPolicy", spec__action="CUSTOM"),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.provider: required with action CUSTOM",
    ),
    (
        _doc("AuthorizationPolicy", spec__selector={"labels": {"app": "web"}}),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.selector.labels: unknown field",
    ),
    (
        _doc("AuthorizationPolicy", spec__selector={"matchLabels": {"app": 5}}),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.selector.matchLabels[app]: value must be a string (quote it), got an integer",
    ),
    (
        _doc("AuthorizationPolicy", spec__rules__0__from__0__source__principals=["spiffe://cluster.local/ns/a/sa/b"]),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.rules[0].from[0].source.principals[0]: "
        "'spiffe://cluster.local/ns/a/sa/b': write principals without the spiffe:// scheme (<trust-domain>/ns/<namespace>/sa/<account>)",
    ),
    (
        _doc("AuthorizationPolicy", spec__rules__0__from__0__source__principals=["cluster.local/*/sa/b"]),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.rules[0].from[0].source.principals[0]: "
        "'cluster.local/*/sa/b': '*' is only supported alone, as a prefix or as a suffix",
    ),
    (
        _doc("AuthorizationPolicy", spec__rules__0__from__0__source__principals=[""]),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.rules[0].from[0].source.principals[0]: must not be empty",
    ),
    (
        _doc("AuthorizationPolicy", spec__rules__0__from__0__source__ipBlocks=["10.0.0.0/33"]),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.rules[0].from[0].source.ipBlocks[0]: '10.0.0.0/33' is not a valid IP address or CIDR",
    ),
    (
        _doc("AuthorizationPolicy", spec__rules__0__from__0__source__namespaces=["Bad_NS"]),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.rules[0].from[0].source.namespaces[0]: 'Bad_NS' is not a valid namespace name",
    ),
    (
        _doc("AuthorizationPolicy", spec__rules__0__from__0__source={}),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.rules[0].from[0].source: at least one field must be set",
    ),
    (
        _doc("AuthorizationPolicy", spec__rules__0__to__0__operation__ports=["80a"]),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.rules[0].to[0].operation.ports[0]: '80a' is not a port number (1-65535)",
    ),
    (
        _doc("AuthorizationPolicy", spec__rules__0__to__0__operation__ports=[65536]),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.rules[0].to[0].operation.ports[0]: 65536 is not a port number (1-65535)",
    ),
    (
        _doc("AuthorizationPolicy", spec__rules__0__when__0__key="source.color"),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.rules[0].when[0].key: unknown attribute 'source.color'",
    ),
    (
        _doc("AuthorizationPolicy", spec__rules__0__when__0__values=None),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.rules[0].when[0]: values or notValues must be set",
    ),
    (
        _doc("AuthorizationPolicy", spec__rules__0__from__0__source__serviceAccounts=["a/b/c"]),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.rules[0].from[0].source.serviceAccounts[0]: 'a/b/c' must be <account> or <namespace>/<account>",
    ),
    (
        _doc("AuthorizationPolicy", spec__targetRefs=[{"kind": "Service", "name": "web"}]),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.selector: cannot be combined with targetRef/targetRefs",
    ),
    (
        _doc("PeerAuthentication", spec__mtls={"mode": "ON"}),
        "f.yaml:PeerAuthentication/demo/strict: spec.mtls.mode: unknown value 'ON' (valid: UNSET, DISABLE, PERMISSIVE, STRICT)",
    ),
    (
        _doc("PeerAuthentication", spec__portLevelMtls={70000: {"mode": "STRICT"}}),
        "f.yaml:PeerAuthentication/demo/strict: spec.portLevelMtls[70000]: 70000 is out of range (1-65535)",
    ),
    (
        _doc("PeerAuthentication", spec__portLevelMtls={9090: {"mode": "LOOSE"}}),
        "f.yaml:PeerAuthentication/demo/strict: spec.portLevelMtls[9090].mode: unknown value 'LOOSE' (valid: UNSET, DISABLE, PERMISSIVE, STRICT)",
    ),
    (
        _doc("PeerAuthentication", spec__selector=None),
        "f.yaml:PeerAuthentication/demo/strict: spec.portLevelMtls: requires a workload selector (spec.selector.matchLabels)",
    ),
    ("just a string", "f.yaml:?//#1: (document): must be a mapping with apiVersion, kind and metadata, got a string"),
    # Values of the wrong shape used to raise out of validation (TypeError, ValueError) instead of becoming errors.
    (
        {**BASE["Pod"], "kind": ["Pod"]},
        "f.yaml:?/demo/web-0: kind: must be a string, got a list",
    ),
    (
        {**BASE["Pod"], "apiVersion": 1},
        "f.yaml:Pod/demo/web-0: apiVersion: must be a string, got an integer",
    ),
    # "None" beside an address reached the translator as an address, which raised on it.
    (
        _doc("Service", spec__clusterIPs=["10.96.0.10", "None"]),
        "f.yaml:Service/demo/web: spec.clusterIPs: 'None' (headless) must be the only entry",
    ),
    # A trailing newline (YAML `key: |`) passed every name check: "$" matches before it.
    (
        _doc("Pod", spec__serviceAccountName="web\n"),
        "f.yaml:Pod/demo/web-0: spec.serviceAccountName: 'web\\n' is not a valid service account name",
    ),
    (
        _doc("Pod", metadata__labels={"app": "web\n"}),
        "f.yaml:Pod/demo/web-0: metadata.labels[app]: label value 'web\\n': at most 63 alphanumerics, '-', '_' "
        "or '.', starting and ending alphanumeric",
    ),
    (
        _doc("WorkloadEntry", spec__address="vm.example.com\n"),
        "f.yaml:WorkloadEntry/demo/vm-1: spec.address: 'vm.example.com\\n' is not an IP address or hostname",
    ),
    # ipaddress accepts a zone; the translator's inet_pton raised on it, and every later change raised again.
    (
        _doc("ServiceEntry", spec__addresses=["fe80::1%eth0"]),
        "f.yaml:ServiceEntry/demo/ext: spec.addresses[0]: 'fe80::1%eth0': an IPv6 zone (%...) has no meaning in "
        "the mesh",
    ),
    # str.isdigit() takes '²' (int() then raised ValueError out of validation) and '٣' (int() read it as 3).
    (
        _doc("AuthorizationPolicy", spec__rules__0__to=[{"operation": {"ports": ["²"]}}]),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.rules[0].to[0].operation.ports[0]: "
        "'²' is not a port number (1-65535)",
    ),
    (
        _doc("AuthorizationPolicy", spec__rules__0__when=[{"key": "destination.port", "values": ["٣"]}]),
        "f.yaml:AuthorizationPolicy/demo/allow-client: spec.rules[0].when[0].values[0]: "
        "'٣' is not a port number (1-65535)",
    ),
    (
        _doc("Service", spec__ports__0__targetPort="²"),
        "f.yaml:Service/demo/web: spec.ports[0].targetPort: '²' is not a valid port name (1-15 lowercase "
        "alphanumerics or '-', with a letter, no '--')",
    ),
    (
        _doc("PeerAuthentication", spec__portLevelMtls={"²": {"mode": "STRICT"}}),
        "f.yaml:PeerAuthentication/demo/strict: spec.portLevelMtls[²]: must be an integer, got a string",
    ),
    (
        _doc("Pod", status__podIP="10.0.0.1\0"),
        "f.yaml:Pod/demo/web-0: status.podIP: '10.0.0.1\\x00' is not a valid IP address",
    ),
]


@pytest.mark.parametrize(
    ("doc", "expected"), ERROR_CASES, ids=[e.split(": ", 1)[0] + ":" + e.split(": ")[1] for _, e in ERROR_CASES]
)
def test_each_error_shape(doc: Any, expected: str) -> None:
    result = parse_documents("f.yaml", [doc])
    assert [str(e) for e in result.errors] == [expected]
    assert result.objects == []


def test_config_error_fields_and_format() -> None:
    err = ConfigError("dir/a.yaml", "Namespace", "", "demo", "metadata.labels", "bad")
    assert str(err) == "dir/a.yaml:Namespace//demo: metadata.labels: bad"
    assert (err.source, err.kind, err.namespace, err.name, err.field, err.reason) == (
        "dir/a.yaml",
        "Namespace",
        "",
        "demo",
        "metadata.labels",
        "bad",
    )
    assert isinstance(err, Exception)


def test_one_object_can_report_several_fields() -> None:
    doc = _doc("Service", spec__ports__0__port=0, spec__clusterIP="nope", spec__bogus=1)
    fields = sorted(e.field for e in parse_documents("f.yaml", [doc]).errors)
    assert fields == ["spec.bogus", "spec.clusterIP", "spec.ports[0].port"]


def test_bad_object_does_not_stop_the_others() -> None:
    docs = [BASE["Namespace"], _doc("Pod", status__podIP="x"), BASE["Service"], None, BASE["AuthorizationPolicy"]]
    result = parse_documents("f.yaml", docs)
    assert [o.key for o in result.objects] == [
        ObjectKey("Namespace", "", "demo"),
        ObjectKey("Service", "demo", "web"),
        ObjectKey("AuthorizationPolicy", "demo", "allow-client"),
    ]
    assert [str(e) for e in result.errors] == ["f.yaml:Pod/demo/web-0: status.podIP: 'x' is not a valid IP address"]


def test_duplicate_object_in_one_source() -> None:
    result = parse_documents("f.yaml", [BASE["Namespace"], BASE["Namespace"]])
    assert len(result.objects) == 1
    assert [str(e) for e in result.errors] == [
        "f.yaml:Namespace//demo: metadata.name: duplicate object (first defined in document #1)"
    ]


YAML_TEXT = """\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: demo
---
# a comment-only document is ignored
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: demo
  creationTimestamp: 2024-05-01T10:00:00Z
spec:
  nodeName: node-a
status:
  podIP: 10.1.0.5
  phase: Running
  conditions:
  - type: Ready
    status: "False"
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: other}
"""


def test_yaml_multi_document_with_a_syntax_error() -> None:
    result = parse_yaml_text("cfg/demo.yaml", YAML_TEXT)
    assert [o.key for o in result.objects] == [
        ObjectKey("Namespace", "", "demo"),
        ObjectKey("Pod", "demo", "web-0"),
        ObjectKey("Namespace", "", "other"),
    ]
    assert len(result.errors) == 1
    assert str(result.errors[0]).startswith("cfg/demo.yaml:?//#2: line 11: invalid YAML: ")
    pod = result.objects[1]
    assert isinstance(pod, Pod)
    assert (pod.ips, pod.phase, pod.ready, pod.service_account) == (("10.1.0.5",), "Running", "False", "default")
    assert pod.meta.creation_timestamp == "2024-05-01T10:00:00.000000Z"


def test_typed_objects() -> None:
    result = parse_documents("f.yaml", [BASE[k] for k in sorted(BASE)])
    by_kind = {o.key.kind: o for o in result.objects}
    pod, svc, node = by_kind["Pod"], by_kind["Service"], by_kind["Node"]
    assert isinstance(pod, Pod) and isinstance(svc, Service) and isinstance(node, Node)
    assert pod.container_ports == (ContainerPort(8080, "http", "TCP"),)
    assert (pod.node_name, pod.service_account, pod.ips, pod.host_network) == ("node-a", "web", ("10.1.0.5",), False)
    assert svc.ports == (ServicePort(80, "http", "TCP", "http"), ServicePort(9090, "m", "TCP", None))
    assert (dict(svc.selector or {}), svc.cluster_ips, svc.headless) == ({"app": "web"}, ("10.96.0.10",), False)
    assert node.pod_cidrs == ("10.1.0.0/24",)
    assert isinstance(by_kind["Namespace"], Namespace)
    se, we = by_kind["ServiceEntry"], by_kind["WorkloadEntry"]
    assert isinstance(se, ServiceEntry) and isinstance(we, WorkloadEntry)
    assert se.endpoints[0].address == "192.0.2.11" and se.ports[0].number == 443
    assert dict(we.spec.ports) == {"http": 8080}
    ap, pa = by_kind["AuthorizationPolicy"], by_kind["PeerAuthentication"]
    assert isinstance(ap, AuthorizationPolicy) and isinstance(pa, PeerAuthentication)
    assert ap.rules[0].to[0].ports == (8080,)
    assert ap.rules[0].from_[0].ip_blocks == ("10.0.0.0/8",)
    assert (pa.mode, dict(pa.port_level)) == ("STRICT", {9090: "PERMISSIVE"})


@pytest.mark.parametrize(
    ("kind", "api_version"),
    [
        ("RequestAuthentication", "security.istio.io/v1"),
        ("Gateway", "gateway.networking.k8s.io/v1"),
        ("HTTPRoute", "gateway.networking.k8s.io/v1beta1"),
    ],
)
def test_opaque_kinds_are_stored(kind: str, api_version: str) -> None:
    doc = {"apiVersion": api_version, "kind": kind, "metadata": {"name": "x", "namespace": "demo"}, "spec": {"a": 1}}
    result = parse_documents("f.yaml", [doc])
    assert result.errors == []
    obj = result.objects[0]
    assert isinstance(obj, OpaqueObject)
    assert (obj.key, dict(obj.spec)) == (ObjectKey(kind, "demo", "x"), {"a": 1})


def test_defaults_and_v1beta1() -> None:
    doc = {
        "apiVersion": "security.istio.io/v1beta1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-all", "annotations": {"istio.io/dry-run": "true"}},
        "spec": {},
    }
    (policy,) = parse_documents("f.yaml", [doc]).objects
    assert isinstance(policy, AuthorizationPolicy)
    assert (policy.key.namespace, policy.action, policy.selector, policy.rules, policy.dry_run) == (
        "default",
        "ALLOW",
        None,
        (),
        True,
    )


def test_real_kubernetes_pod_fields_are_accepted() -> None:
    doc = _doc(
        "Pod",
        metadata__ownerReferences=[
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-6d8f", "uid": "u", "controller": True}
        ],
        metadata__resourceVersion="42",
        metadata__generateName="web-6d8f-",
        spec__volumes=[{"name": "v"}],
        spec__tolerations=[],
        status__podIPs=[{"ip": "10.1.0.5"}, {"ip": "fd00::5"}],
        status__hostIP="192.168.0.1",
    )
    result = parse_documents("api", [doc])
    assert result.errors == []
    pod = result.objects[0]
    assert isinstance(pod, Pod)
    assert pod.ips == ("10.1.0.5", "fd00::5")
    assert (pod.meta.owner_kind, pod.meta.owner_name) == ("ReplicaSet", "web-6d8f")


def test_non_strict_accepts_unknown_fields_but_checks_the_rest() -> None:
    newer = _doc("Pod", spec__someFutureField={"x": 1}, metadata__futureMeta="y")
    assert parse_documents("kube", [newer]).errors != []
    lenient = parse_documents("kube", [newer], strict=False)
    assert lenient.errors == [] and [o.key for o in lenient.objects] == [ObjectKey("Pod", "demo", "web-0")]
    bad = parse_documents("kube", [_doc("Pod", spec__someFutureField=1, status__podIP="nope")], strict=False)
    assert [str(e) for e in bad.errors] == ["kube:Pod/demo/web-0: status.podIP: 'nope' is not a valid IP address"]


NS_DEMO = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n"
NS_OTHER = "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n"


def _alias_bomb(levels: int) -> str:
    """An HTTPRoute (kept as-is by the controller) whose spec nests `levels` lists, each naming the one below ten
    times: 10**levels values once expanded, a few hundred bytes of YAML."""

    def level(i: int) -> str:
        if i == 0:
            return "&l0 [lol, lol]"
        return f"&l{i} [" + ", ".join([level(i - 1)] + [f"*l{i - 1}"] * 9) + "]"

    meta = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: bomb, namespace: demo}\n"
    return meta + f"spec: {{rules: {level(levels)}}}\n"


def test_yaml_whose_aliases_expand_without_bound_is_refused_and_the_file_still_applies() -> None:
    text = NS_DEMO + "---\n" + _alias_bomb(6) + "---\n" + NS_OTHER
    result = parse_yaml_text("cfg/bomb.yaml", text)
    assert [o.key for o in result.objects] == [ObjectKey("Namespace", "", "demo"), ObjectKey("Namespace", "", "other")]
    [error] = result.errors
    assert str(error) == "cfg/bomb.yaml:?//#2: document: invalid YAML: its aliases expand to more than 100000 values"


def test_yaml_aliases_within_bounds_are_ordinary_yaml() -> None:
    text = NS_DEMO + "---\n" + _alias_bomb(3) + "---\n" + NS_OTHER  # 2,000 values: a big but honest document
    result = parse_yaml_text("cfg/anchors.yaml", text)
    assert not result.errors
    assert ObjectKey("HTTPRoute", "demo", "bomb") in [o.key for o in result.objects]


@pytest.mark.parametrize(
    ("generate_name", "controller", "owner"),
    [("web-6d8f-", True, ("ReplicaSet", "web-6d8f")), ("", True, ("", "")), ("web-6d8f-", None, ("", ""))],
    ids=["generated, controller", "named explicitly", "owner that is not the controller"],
)
def test_pod_owner_is_its_controller_when_its_name_was_generated(
    generate_name: str, controller: bool | None, owner: tuple[str, str]
) -> None:
    """As istiod's GetDeployMetaFromPod: otherwise the pod is its own workload (controller/translate.py)."""
    reference: dict[str, Any] = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-6d8f", "uid": "u"}
    if controller is not None:
        reference["controller"] = controller
    doc = _doc("Pod", metadata__ownerReferences=[reference])
    if generate_name:
        doc["metadata"]["generateName"] = generate_name
    result = parse_documents("api", [doc])
    assert result.errors == []
    pod = result.objects[0]
    assert isinstance(pod, Pod)
    assert (pod.meta.owner_kind, pod.meta.owner_name) == owner
