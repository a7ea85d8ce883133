"""Config that asks for a waypoint: accepted (manifests written for Istio still load), and now said to do nothing.
Gateways, HTTPRoutes, RequestAuthentications and the istio.io/use-waypoint label were silently dropped, so an
operator relying on a waypoint's L7 policy had no sign that none was enforced."""

from __future__ import annotations

from controller.model import ObjectKey
from controller.translate import Translator
from controller.validation import parse_yaml_text

GATEWAY = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec: {gatewayClassName: ambit-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"""


def namespace(label: str) -> str:
    return f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: demo, labels: {{{label}}}}}\n"


def apply(translator: Translator, text: str) -> None:
    result = parse_yaml_text("t.yaml", text)
    assert result.errors == []
    translator.apply(result.objects)


def test_gateway_is_accepted_with_a_caveat_until_removed() -> None:
    t = Translator()
    apply(t, GATEWAY)
    key = ObjectKey("Gateway", "demo", "waypoint")
    assert "not implemented" in t.warnings[key]
    t.apply([], [key])
    assert key not in t.warnings


def test_use_waypoint_label_is_said_to_be_ignored() -> None:
    t = Translator()
    key = ObjectKey("Namespace", "", "demo")
    apply(t, namespace("istio.io/use-waypoint: waypoint"))
    assert t.warnings[key].startswith("label istio.io/use-waypoint=waypoint is ignored")
    apply(t, namespace("istio.io/dataplane-mode: ambient"))
    assert key not in t.warnings
    apply(t, namespace("istio.io/use-waypoint: none"))  # the opt-out asks for nothing
    assert key not in t.warnings
