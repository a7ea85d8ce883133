"""AuthorizationPolicy translation found wanting in review. First: rules from the API server carrying fields of a
newer Istio than this code knows.

The kube source validates with strict=False so such objects still load. Inside a policy rule that must not mean
"ignore the field": a `trustDomains` restriction ignored makes an ALLOW rule admit every trust domain. Like
istiod does for attributes ztunnel cannot evaluate, the rule is treated as needing them: an ALLOW rule is dropped
(the policy denies more), a DENY rule keeps its L4 part (it denies more)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from api.istio.security import authorization_pb2 as pb
from controller.model import AuthorizationPolicy
from controller.monitoring import ControllerMetrics
from controller.store import ConfigStore
from controller.translate import Translator
from controller.translate_policy import convert_authorization_policy
from controller.validation import parse_documents
from tests.support.config_files import authorization_policy


def from_kube(doc: dict[str, Any]) -> tuple[pb.Authorization, str]:
    result = parse_documents("kube", [doc], strict=False)
    assert result.errors == []
    (obj,) = result.objects
    assert isinstance(obj, AuthorizationPolicy)
    converted = convert_authorization_policy(obj, "istio-system")
    assert converted.authorization is not None
    return converted.authorization, converted.warning


NS_A = {"from": [{"source": {"namespaces": ["a"]}}]}
NS_B = {"from": [{"source": {"namespaces": ["b"]}}]}


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ({"from": [{"source": {"namespaces": ["a"], "trustDomains": ["other.td"]}}]}, "trustDomains"),
        ({"from": [{"source": {"trustDomains": ["other.td"]}}]}, "trustDomains"),
        ({"to": [{"operation": {"ports": ["80"], "newMatch": ["x"]}}]}, "newMatch"),
        ({**NS_A, "newRuleField": {"x": 1}}, "newRuleField"),
        ({**NS_A, "when": [{"key": "source.serviceAccount", "values": ["a/b"]}]}, "source.serviceAccount"),
    ],
)
def test_allow_rule_with_a_field_this_code_does_not_know_is_dropped_not_widened(
    rule: dict[str, Any], field: str
) -> None:
    # Before: the unknown field was ignored (namespace a from any trust domain was allowed), or the unknown
    # `when` key or an otherwise empty source rejected the whole policy (no ALLOW policy: everything allowed).
    authz, warning = from_kube(authorization_policy("ALLOW", rule, NS_B))
    assert [g.rules[0].matches[0].namespaces[0].exact for g in authz.groups] == ["b"]
    assert field in warning


def test_deny_rule_keeps_its_l4_part() -> None:
    rule = {"from": [{"source": {"namespaces": ["a"], "notTrustDomains": ["cluster.local"]}}]}
    authz, warning = from_kube(authorization_policy("DENY", rule))
    assert authz.groups[0].rules[0].matches[0].namespaces[0].exact == "a"
    assert "notTrustDomains" in warning


def test_files_still_refuse_unknown_fields() -> None:
    rule = {"from": [{"source": {"namespaces": ["a"], "trustDomains": ["other.td"]}}]}
    result = parse_documents("f.yaml", [authorization_policy("ALLOW", rule)])
    assert result.objects == []
    assert [str(e) for e in result.errors] == [
        "f.yaml:AuthorizationPolicy/demo/p: spec.rules[0].from[0].source.trustDomains: unknown field"
    ]


def test_deny_without_rules_is_sent_but_warned_about() -> None:
    # It was accepted silently: it reads like "deny everything" and denies nothing (Istio's webhook refuses it).
    result = parse_documents("f.yaml", [authorization_policy("DENY")])
    (obj,) = result.objects
    assert isinstance(obj, AuthorizationPolicy)
    converted = convert_authorization_policy(obj, "istio-system")
    assert converted.authorization is not None and not converted.authorization.groups
    assert "without rules never matches" in converted.warning
    with_rule = parse_documents("f.yaml", [authorization_policy("DENY", {})]).objects[0]
    assert isinstance(with_rule, AuthorizationPolicy)
    assert convert_authorization_policy(with_rule, "istio-system").warning == ""


def test_a_caveat_is_logged_once_when_it_appears(caplog: pytest.LogCaptureFixture) -> None:
    # Warnings were only visible in /debug/config_status: a CUSTOM policy silently enforced nothing.
    store = ConfigStore(Translator(), ControllerMetrics())
    custom = authorization_policy("CUSTOM", NS_A)
    custom["spec"]["provider"] = {"name": "ext-authz"}
    caplog.set_level(logging.WARNING, logger="ambit.controller.config")
    store.update({"f.yaml": parse_documents("f.yaml", [custom])})
    store.update(
        {"g.yaml": parse_documents("g.yaml", [authorization_policy("ALLOW", NS_B) | {"metadata": {"name": "q"}}])}
    )
    caveats = [r for r in caplog.records if r.getMessage() == "config accepted with a caveat"]
    assert len(caveats) == 1
    fields = caveats[0].fields  # type: ignore[attr-defined]
    assert fields["object"] == "AuthorizationPolicy/demo/p"
    assert "action CUSTOM is not supported" in fields["warning"]


def test_waypoint_bound_policy_says_it_is_not_enforced() -> None:
    # Accepted silently: an L7 policy written for a waypoint (targetRefs) was enforced by nothing.
    doc = authorization_policy("DENY", NS_A)
    doc["spec"]["targetRefs"] = [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}]
    (obj,) = parse_documents("f.yaml", [doc]).objects
    assert isinstance(obj, AuthorizationPolicy)
    converted = convert_authorization_policy(obj, "istio-system")
    assert converted.authorization is None
    assert "no effect" in converted.warning
