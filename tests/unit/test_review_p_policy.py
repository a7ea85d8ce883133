"""AuthorizationPolicy input compared with istiod's ambient translation and Istio's webhook, case by case.

Sources: istio/istio pkg/config/validation/validation.go `ValidateAuthorizationPolicy`, pkg/config/security
security.go `ValidateAttribute`, pilot/pkg/serviceregistry/ambient/authorization.go `handleRule`.
"""

from __future__ import annotations

from typing import Any

import pytest

from agent import rbac
from api.istio.security import authorization_pb2 as pb
from common.spiffe import Identity
from controller.model import AuthorizationPolicy
from controller.translate_policy import convert_authorization_policy
from controller.validation import parse_documents
from tests.support.config_files import authorization_policy
from tests.unit.test_translate_policy import WORKLOADS, _plaintext_denied, attached, peer_auth, translate

PEER_A = "cluster.local/ns/a/sa/client"


def errors(doc: dict[str, Any], strict: bool = True) -> list[str]:
    return [str(e) for e in parse_documents("f.yaml", [doc], strict=strict).errors]


def converted(doc: dict[str, Any], strict: bool = True) -> tuple[pb.Authorization, str]:
    result = parse_documents("f.yaml", [doc], strict=strict)
    assert [str(e) for e in result.errors] == []
    (obj,) = result.objects
    assert isinstance(obj, AuthorizationPolicy)
    out = convert_authorization_policy(obj, "istio-system")
    assert out.authorization is not None
    return out.authorization, out.warning


def admits(authz: pb.Authorization, identity: str | None, port: int = 8080) -> bool:
    """The agent's decision for this one policy (an ALLOW must match, a DENY must not)."""
    peer = Identity.parse(f"spiffe://{identity}") if identity else None
    conn = rbac.Connection("10.9.0.1", "10.1.0.5", port, peer)
    return rbac.matches(authz, conn) == (authz.action == pb.ALLOW)


# --- `from: []` / `to: []` --------------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("field", ["from", "to"])
def test_an_empty_from_or_to_list_is_refused_not_read_as_absent(field: str, strict: bool) -> None:
    # Istio's webhook: "`from` must not be empty" / "`to` must not be empty". Read as absent, the rule had no
    # clause and matched every connection: ALLOW `rules: [{from: []}]` (a source list a template left empty,
    # meaning "nobody") admitted every caller, mesh or plaintext.
    doc = authorization_policy("ALLOW", {field: []})
    assert errors(doc, strict) == [f"f.yaml:AuthorizationPolicy/demo/p: spec.rules[0].{field}: must not be empty"]


def test_an_absent_or_null_from_still_matches_everything() -> None:
    # `from:` with no value is YAML null: Go's nil slice, absent for istiod too (rule `{}` = match all).
    authz, _ = converted(authorization_policy("ALLOW", {"from": None, "to": [{"operation": {"ports": ["8080"]}}]}))
    assert admits(authz, None, 8080)
    assert not admits(authz, None, 9090)


# --- when keys Istio knows that are not L4 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"), [("source.serviceAccount", "a/client"), ("source.trustDomain", "cluster.local")]
)
def test_istio_when_keys_beyond_l4_load_from_files_and_are_handled_as_istiod_does(key: str, value: str) -> None:
    # Both are valid Istio (ValidateAttribute) and not among istiod's l4WhenAttributes: an ALLOW rule holding
    # one is dropped, a DENY rule keeps an empty match that never fires. Files refused the whole policy instead
    # ("unknown attribute"), so a DENY written for Istio was not enforced at all.
    when = {"key": key, "values": [value]}
    allow, warning = converted(
        authorization_policy("ALLOW", {"when": [when]}, {"from": [{"source": {"namespaces": ["b"]}}]})
    )
    assert len(allow.groups) == 1
    assert not admits(allow, PEER_A)
    assert admits(allow, "cluster.local/ns/b/sa/x")
    assert key in warning
    deny, warning = converted(
        authorization_policy("DENY", {"from": [{"source": {"namespaces": ["a"]}}], "when": [when]})
    )
    assert len(deny.groups) == 1
    assert admits(deny, PEER_A)
    assert "no effect" in warning


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("source.serviceAccount", "a/*", "wildcards are not supported for service accounts"),
        ("source.serviceAccount", "a/b/c", "must be <account> or <namespace>/<account>"),
        ("source.trustDomain", "*.local*", "'*' is only supported alone, as a prefix or as a suffix"),
    ],
)
def test_their_values_are_checked_as_istio_does(key: str, value: str, reason: str) -> None:
    (error,) = errors(authorization_policy("DENY", {"when": [{"key": key, "values": [value]}]}))
    assert error.startswith("f.yaml:AuthorizationPolicy/demo/p: spec.rules[0].when[0].values[0]: ")
    assert reason in error


@pytest.mark.parametrize(
    "key",
    [
        "request.headers[]",
        "request.auth.claims[]",
        "request.headers[x",
        "request.headers[x]y",
        "experimental.envoy.filters.a",
    ],
)
def test_map_keys_need_a_name_in_brackets(key: str) -> None:
    # ValidateAttribute's validateMapKey: `a[b]` with b non-empty.
    (error,) = errors(authorization_policy("DENY", {"when": [{"key": key, "values": ["v"]}]}))
    assert error.startswith("f.yaml:AuthorizationPolicy/demo/p: spec.rules[0].when[0].key: ")


# --- values Istio accepts and this code's file checks refuse ------------------------------------------------------


ODD_BUT_ISTIO_VALID = [
    pytest.param({"from": [{"source": {"principals": [f"spiffe://{PEER_A}"]}}]}, id="principal-with-scheme"),
    pytest.param({"from": [{"source": {"principals": ["cluster.local/ns/*/sa/client"]}}]}, id="principal-mid-star"),
    pytest.param({"from": [{"source": {"principals": ["*a*"]}}]}, id="principal-both-stars"),
    pytest.param({"from": [{"source": {"namespaces": ["A_b"]}}]}, id="namespace-not-dns"),
    pytest.param({"from": [{"source": {"serviceAccounts": ["A_b/Client"]}}]}, id="service-account-not-dns"),
    pytest.param({"from": [{"source": {"requestPrincipals": ["iss/*sub*"]}}]}, id="request-principal-stars"),
    pytest.param({"to": [{"operation": {"ports": ["0"]}}]}, id="port-zero"),
    pytest.param({"when": [{"key": "source.principal", "values": [f"spiffe://{PEER_A}"]}]}, id="when-principal"),
    pytest.param({"when": [{"key": "source.namespace", "values": ["A_b"]}]}, id="when-namespace"),
    pytest.param({"when": [{"key": "destination.port", "values": ["0"]}]}, id="when-port-zero"),
]


@pytest.mark.parametrize("rule", ODD_BUT_ISTIO_VALID)
def test_from_the_api_an_allow_with_values_that_never_match_still_denies(rule: dict[str, Any]) -> None:
    # Istio's webhook takes these (CheckEmptyValues, CheckServiceAccount, ValidatePorts 0-65535) and istiod
    # compiles them to matches no connection meets (stringToMatch exact, port 0): the ALLOW policy is sent and
    # admits nobody through that rule. Here the API object was refused, so the workload had no ALLOW policy
    # and admitted everyone (a common slip: principals written with spiffe://).
    authz, _ = converted(authorization_policy("ALLOW", rule), strict=False)
    assert authz.action == pb.ALLOW
    assert not admits(authz, PEER_A, 8080)
    assert not admits(authz, None, 8080)


@pytest.mark.parametrize("rule", ODD_BUT_ISTIO_VALID)
def test_files_still_refuse_them_with_the_reason(rule: dict[str, Any]) -> None:
    assert len(errors(authorization_policy("ALLOW", rule))) == 1


@pytest.mark.parametrize(
    "source",
    [
        {"serviceAccounts": ["a/*"]},
        {"serviceAccounts": ["a/b/c"]},
        {"serviceAccounts": ["/b"]},
        {"ipBlocks": ["10.0.0.300"]},
        {"principals": [""]},
    ],
)
def test_from_the_api_what_istio_refuses_is_still_refused(source: dict[str, Any]) -> None:
    assert len(errors(authorization_policy("ALLOW", {"from": [{"source": source}]}), strict=False)) == 1


# --- PeerAuthentication with a selector and no labels ------------------------------------------------------------


@pytest.mark.parametrize("selector", ["{}", "{matchLabels: {}}"])
def test_a_root_policy_with_an_empty_selector_is_not_the_mesh_policy_of_other_namespaces(selector: str) -> None:
    # istiod gives workloads of other namespaces only the root namespace's policies without a selector
    # (pilot/pkg/serviceregistry/ambient/workloads.go fetchPeerAuthentications: Spec.Selector == nil). Here an
    # empty selector read as none: an older PERMISSIVE one with `selector: {}` became the mesh policy and
    # overrode the mesh's STRICT, so plaintext reached every workload (Istio's webhook only warns about it).
    t = translate(
        WORKLOADS,
        peer_auth("default", "istio-system", "  mtls: {mode: STRICT}\n", created="2024-01-02T00:00:00Z"),
        peer_auth("odd", "istio-system", f"  selector: {selector}\n  mtls: {{mode: PERMISSIVE}}\n"),
    )
    assert attached(t, "Kubernetes//Pod/demo/web-0") == ["istio-system/istio_converted_static_strict"]
    assert _plaintext_denied(t, "Kubernetes//Pod/demo/web-0", 8080)


def test_an_empty_selector_still_counts_as_namespace_wide_in_its_namespace() -> None:
    # convertedSelectorPeerAuthentications: no labels is a namespace (in the root namespace: mesh) policy.
    t = translate(
        WORKLOADS,
        peer_auth("default", "istio-system", "  mtls: {mode: PERMISSIVE}\n"),
        peer_auth("ns", "demo", "  selector: {}\n  mtls: {mode: STRICT}\n"),
    )
    assert attached(t, "Kubernetes//Pod/demo/web-0") == ["istio-system/istio_converted_static_strict"]
    assert attached(t, "Kubernetes//Pod/other/web-0") == []


# --- what the warning says about a DENY whose from/to entries are HTTP only ---------------------------------------


def test_a_deny_entry_with_only_http_attributes_is_said_to_match_nothing() -> None:
    # "POST anywhere, or anything to port 22": the POST entry has nothing left at L4 and the agent skips it, so
    # only port 22 is denied. The warning said only "more restrictive than requested" (istiod's
    # httpDenyMixedBoilerplate says the same), hiding that POSTs elsewhere are no longer denied.
    rule = {"to": [{"operation": {"methods": ["POST"]}}, {"operation": {"ports": ["22"]}}]}
    authz, warning = converted(authorization_policy("DENY", rule))
    assert not admits(authz, PEER_A, 22)
    assert admits(authz, PEER_A, 8080)
    assert warning.endswith(
        "The DENY policy is enforced without its HTTP rules, which is more restrictive than requested; its from/to "
        "entries that hold only HTTP attributes match nothing, which is less restrictive."
    )


def test_a_deny_with_both_dead_rules_and_voided_entries_names_both() -> None:
    voided = {"from": [{"source": {"requestPrincipals": ["*"]}}, {"source": {"namespaces": ["a"]}}]}
    dead = {"from": [{"source": {"namespaces": ["b"]}}], "when": [{"key": "request.headers[x]", "values": ["y"]}]}
    authz, warning = converted(authorization_policy("DENY", voided, dead))
    assert not admits(authz, PEER_A)
    assert admits(authz, "cluster.local/ns/b/sa/x")
    assert warning.endswith(
        "more restrictive than requested; its rules that have nothing left to match without them have no effect; "
        "its from/to entries that hold only HTTP attributes match nothing, which is less restrictive."
    )
