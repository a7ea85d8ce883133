"""How a Service's endpoints are picked (its LoadBalancing), where review found the controller wanting: Kubernetes
1.33's trafficDistribution values, which istiod's GetTrafficDistribution maps and the controller ignored, and
Services without a selector."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from agent.outbound import RouteKind, route
from agent.state import WorkloadStore
from api.istio.workload import workload_pb2 as wl
from controller.translate import Translator
from controller.validation import parse_yaml_text
from tests.support.config_files import demo_client

CLOSE = "routing_preference: [NETWORK, REGION, ZONE, SUBZONE] mode: FAILOVER"


def service_lb(spec: str, annotations: str = "{}") -> wl.LoadBalancing | None:
    text = f"""apiVersion: v1
kind: Service
metadata: {{name: web, namespace: demo, annotations: {annotations}}}
spec: {{selector: {{app: web}}, clusterIP: 10.96.0.10, ports: [{{port: 80}}], {spec}}}
"""
    result = parse_yaml_text("t.yaml", text)
    assert result.errors == []
    t = Translator()
    t.apply(result.objects)
    service = t.addresses()["demo/web.demo.svc.cluster.local"].service
    return service.load_balancing if service.HasField("load_balancing") else None


@pytest.mark.parametrize(
    ("spec", "annotations", "want"),
    [
        ("trafficDistribution: PreferSameZone", "{}", CLOSE),
        (
            "trafficDistribution: PreferSameNode",
            "{}",
            "routing_preference: [NETWORK, REGION, ZONE, SUBZONE, NODE] mode: FAILOVER",
        ),
        (
            "type: ClusterIP",
            "{networking.istio.io/traffic-distribution: PreferSameNode}",
            "routing_preference: [NETWORK, REGION, ZONE, SUBZONE, NODE] mode: FAILOVER",
        ),
        ("type: ClusterIP", "{networking.istio.io/traffic-distribution: prefersamezone}", CLOSE),
        ("trafficDistribution: preferclose", "{}", None),  # the field's values are case-sensitive
    ],
)
def test_traffic_distribution_values(spec: str, annotations: str, want: str | None) -> None:
    got = service_lb(spec, annotations)
    assert got == (None if want is None else text_format.Parse(want, wl.LoadBalancing()))


def test_service_without_selector_is_passed_through_to_its_vip() -> None:
    # With no EndpointSlice read for it the agent had no endpoints and refused every connection from an enrolled
    # pod (no_healthy_upstream); kube-proxy routes the VIP when it is passed through. (With slices it is balanced:
    # tests/unit/test_controller_endpointslices.py.)
    text = (
        demo_client("n1")
        + """---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: demo}
spec: {clusterIP: 10.96.0.50, ports: [{port: 5432}]}
"""
    )
    result = parse_yaml_text("t.yaml", text)
    assert result.errors == []
    t = Translator()
    t.apply(result.objects)
    store = WorkloadStore()
    store.put(list(t.addresses().values()))
    r = route(store, "n1", t.addresses()["Kubernetes//Pod/demo/client"].workload, ("10.96.0.50", 5432))
    assert (r.kind, r.target) == (RouteKind.PASSTHROUGH, ("10.96.0.50", 5432))
    assert service_lb("type: ClusterIP") is None  # a selected service still picks its endpoints
