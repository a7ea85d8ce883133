"""Kubernetes 1.33's trafficDistribution values (PreferSameZone, PreferSameNode), which istiod's
GetTrafficDistribution maps and the controller ignored: the service then spread to any endpoint."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from api.istio.workload import workload_pb2 as wl
from controller.translate import Translator
from controller.validation import parse_yaml_text

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
