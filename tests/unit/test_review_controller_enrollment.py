"""Which pods the controller enrolls (tunnel_protocol HBONE), against istio-cni's default enablement selectors:
pod label `ambient`, or namespace label `ambient` and pod label NotIn [none]; never hostNetwork or sidecar pods."""

from __future__ import annotations

import pytest

from api.istio.workload import workload_pb2 as wl
from controller.translate import Translator
from controller.validation import parse_yaml_text

NAMESPACES = """apiVersion: v1
kind: Namespace
metadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
"""


def tunnel(ns: str, labels: str, annotations: str = "{}") -> int:
    pod = f"""apiVersion: v1
kind: Pod
metadata: {{name: p, namespace: {ns}, labels: {labels}, annotations: {annotations}}}
spec: {{nodeName: node-a}}
status: {{podIP: 10.1.0.5}}
"""
    result = parse_yaml_text("t.yaml", NAMESPACES + "---\n" + pod)
    assert result.errors == []
    translator = Translator()
    translator.apply(result.objects)
    return translator.addresses()[f"Kubernetes//Pod/{ns}/p"].workload.tunnel_protocol


SIDECAR = '{sidecar.istio.io/status: \'{"containers":["istio-proxy"]}\'}'


@pytest.mark.parametrize(
    ("ns", "labels", "annotations", "want"),
    [
        ("amb", "{}", "{}", wl.HBONE),
        ("amb", "{istio.io/dataplane-mode: none}", "{}", wl.NONE),
        ("plain", "{istio.io/dataplane-mode: ambient}", "{}", wl.HBONE),
        # A value other than none does not opt the pod out of an ambient namespace (NotIn [none]).
        ("amb", "{istio.io/dataplane-mode: sidecar}", "{}", wl.HBONE),
        ("amb", "{istio.io/dataplane-mode: ''}", "{}", wl.HBONE),
        ("plain", "{istio.io/dataplane-mode: sidecar}", "{}", wl.NONE),
        # A pod with an injected sidecar is never captured, whatever the labels say.
        ("amb", "{}", SIDECAR, wl.NONE),
        ("plain", "{istio.io/dataplane-mode: ambient}", SIDECAR, wl.NONE),
    ],
)
def test_enrollment_follows_istio_cni(ns: str, labels: str, annotations: str, want: int) -> None:
    assert tunnel(ns, labels, annotations) == want
