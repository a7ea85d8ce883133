"""ServiceEntries with `resolution: DNS` to the workload API as istiod builds them for ztunnel
(pilot/pkg/serviceregistry/kube/controller/ambient/serviceentries.go): each endpoint whose address is no IP is a
workload with `hostname` and no address; with no endpoints, each host is its own endpoint (serving only that host);
the service keeps its VIPs. Then the agent routes to them by name."""

from __future__ import annotations

import ipaddress

from agent.outbound import OutboundConfig, RouteKind, resolved, route
from agent.state import WorkloadStore
from api.istio.workload import workload_pb2 as wl
from controller.translate import Translator
from controller.validation import parse_yaml_text
from tests.support.workloads import pod_workload

UID = "Kubernetes/networking.istio.io/ServiceEntry/demo/ext/"


def entry(spec: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext, namespace: demo}}
spec:
{spec}"""


def translate(text: str) -> Translator:
    parsed = parse_yaml_text("se.yaml", text)
    assert parsed.errors == []
    t = Translator()
    t.apply(parsed.objects, [])
    return t


def ports(w: wl.Workload, key: str) -> list[tuple[int, int]]:
    return [(p.service_port, p.target_port) for p in w.services[key].ports]


IMPLICIT = entry("""\
  hosts: [api.example.com, auth.example.com]
  addresses: [240.240.0.10]
  ports: [{number: 443, name: tls, protocol: TLS}, {number: 80, name: http, targetPort: 8080}]
  resolution: DNS
""")


def test_without_endpoints_each_host_is_an_endpoint_resolved_by_name() -> None:
    addrs = translate(IMPLICIT).addresses()
    workloads = {name: a.workload for name, a in addrs.items() if a.HasField("workload")}
    assert sorted(workloads) == [UID + "api.example.com", UID + "auth.example.com"]
    api = workloads[UID + "api.example.com"]
    assert (api.hostname, list(api.addresses), api.tunnel_protocol, api.status) == (
        "api.example.com",
        [],
        wl.NONE,
        wl.HEALTHY,
    )
    assert list(api.services) == ["demo/api.example.com"]  # only the host it came from
    assert ports(api, "demo/api.example.com") == [(443, 443), (80, 8080)]
    assert list(workloads[UID + "auth.example.com"].services) == ["demo/auth.example.com"]
    svc = addrs["demo/api.example.com"].service
    assert [bytes(a.address) for a in svc.addresses] == [ipaddress.ip_address("240.240.0.10").packed]


def test_hostname_endpoints_serve_every_host_and_ip_endpoints_keep_their_address() -> None:
    text = entry("""\
  hosts: [api.example.com, auth.example.com]
  addresses: [240.240.0.10]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS_ROUND_ROBIN
  endpoints:
  - {address: eu.api.example.com, ports: {tls: 8443}, weight: 2}
  - {address: 192.0.2.5}
""")
    addrs = translate(text).addresses()
    by_name = addrs[UID + "eu.api.example.com"].workload
    assert (by_name.hostname, list(by_name.addresses), by_name.capacity.value) == ("eu.api.example.com", [], 2)
    assert sorted(by_name.services) == ["demo/api.example.com", "demo/auth.example.com"]
    assert ports(by_name, "demo/api.example.com") == [(443, 8443)]
    by_ip = addrs[UID + "192.0.2.5"].workload
    assert (by_ip.hostname, list(by_ip.addresses)) == ("", [ipaddress.ip_address("192.0.2.5").packed])
    assert f"{UID}api.example.com" not in addrs  # explicit endpoints: no implicit one per host


def test_no_implicit_endpoints_for_static_resolution_or_a_workload_selector() -> None:
    static = entry("""\
  hosts: [api.example.com]
  addresses: [240.240.0.10]
  ports: [{number: 443, name: tls}]
  resolution: STATIC
""")
    selected = entry("""\
  hosts: [api.example.com]
  ports: [{number: 443, name: tls}]
  resolution: DNS
  workloadSelector: {labels: {app: vm}}
""")
    for text in (static, selected):
        assert not [a for a in translate(text).addresses().values() if a.HasField("workload")]


def test_a_wildcard_host_without_endpoints_is_rejected_as_istio_does() -> None:
    text = entry("""\
  hosts: ["*.example.com"]
  ports: [{number: 443, name: tls}]
  resolution: DNS
""")
    [error] = parse_yaml_text("se.yaml", text).errors
    assert (error.field, "hosts must be FQDN" in error.reason) == ("spec.hosts", True)
    with_endpoint = text + "  endpoints: [{address: api.example.com}]\n"
    assert parse_yaml_text("se.yaml", with_endpoint).errors == []


def test_the_agent_routes_the_translated_entry_by_name() -> None:
    store = WorkloadStore()
    client = pod_workload("sleep-1", "demo", "10.1.0.5", node="n1")
    single = entry("""\
  hosts: [api.example.com]
  addresses: [240.240.0.10]
  ports: [{number: 80, name: http, targetPort: 8080}]
  resolution: DNS
""")
    store.put([client, *translate(single).addresses().values()])
    config = OutboundConfig(is_node_address=lambda ip: False)
    r = route(store, "n1", client, ("240.240.0.10", 80), config)
    assert (r.kind, r.hostname, r.target) == (RouteKind.PASSTHROUGH, "api.example.com", ("api.example.com", 8080))
    assert resolved(r, "203.0.113.4", config).target == ("203.0.113.4", 8080)
