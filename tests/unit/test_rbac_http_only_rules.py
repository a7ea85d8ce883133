"""AuthorizationPolicy with HTTP-only attributes, end to end through the controller's translation and the
agent's evaluation, pinned to Istio's observable behaviour (reference §4.4, istiod
`handleRule` + ztunnel `Authorization::matches`, which skips an empty Match):

- an ALLOW whose only rule needs HTTP attributes loses that rule, so the policy exists and matches nothing:
  every connection to the workload is denied;
- a DENY whose rule is HTTP-only is left with empty matches, which never match: it has no effect (istiod
  says so in its status since istio/istio#61126), it does NOT deny everything;
- a DENY mixing L4 and HTTP fields is enforced on its L4 part alone (broader than asked).
"""

from __future__ import annotations

import pytest

from agent import rbac
from api.istio.security import authorization_pb2 as pb
from common.spiffe import Identity
from controller.model import AuthorizationPolicy, Condition, Meta, Operation, Rule, Source
from controller.translate_policy import convert_authorization_policy

SLEEP = Identity("cluster.local", "client", "sleep")
CONN = rbac.Connection("10.1.0.5", "10.2.0.7", 8080, SLEEP, 40000)


def decide(action: str, rule: Rule) -> rbac.Decision:
    converted = convert_authorization_policy(
        AuthorizationPolicy(Meta("p", "server"), action=action, rules=(rule,)), "istio-system"
    )
    assert converted.authorization is not None and converted.warning
    return rbac.evaluate([converted.authorization], CONN)


HTTP_ONLY_RULES = [
    Rule(to=(Operation(methods=("GET",)),)),
    Rule(to=(Operation(paths=("/admin",)),)),
    Rule(to=(Operation(hosts=("echo",)),)),
    Rule(from_=(Source(request_principals=("*",)),)),
    Rule(from_=(Source(remote_ip_blocks=("10.0.0.0/8",)),)),
    Rule(when=(Condition("request.headers[x-user]", ("bob",)),)),
]


@pytest.mark.parametrize("rule", HTTP_ONLY_RULES)
def test_allow_with_http_only_rule_denies(rule: Rule) -> None:
    assert decide("ALLOW", rule).outcome is rbac.Outcome.NOT_ALLOWED


@pytest.mark.parametrize("rule", HTTP_ONLY_RULES)
def test_deny_with_http_only_rule_has_no_effect(rule: Rule) -> None:
    assert decide("DENY", rule).outcome is rbac.Outcome.NO_POLICIES


def test_deny_mixing_l4_and_http_enforces_the_l4_part() -> None:
    rule = Rule(from_=(Source(namespaces=("client",)),), to=(Operation(ports=(8080,), methods=("POST",)),))
    assert decide("DENY", rule).outcome is rbac.Outcome.EXPLICITLY_DENIED


def test_dry_run_allow_that_matches_nothing_reports_would_deny() -> None:
    """The point of a dry-run ALLOW is to learn which connections it would deny: ztunnel logs
    "dry-run: no allow policies match" when no enforced ALLOW exists and no dry-run ALLOW matched
    (src/state.rs assert_rbac); the connection itself is still allowed."""
    only_port_1 = pb.Authorization(
        name="allow-port-1",
        namespace="server",
        action=pb.ALLOW,
        dry_run=True,
        groups=[pb.Group(rules=[pb.Rules(matches=[pb.Match(destination_ports=[1])])])],
    )
    d = rbac.evaluate([only_port_1], CONN)
    assert d.allowed
    assert any("no allow policies match" in note for note in d.dry_run), d.dry_run
    # a dry-run ALLOW that matches reports that, and no would-deny
    port_8080 = pb.Authorization()
    port_8080.CopyFrom(only_port_1)
    port_8080.groups[0].rules[0].matches[0].destination_ports[:] = [8080]
    d = rbac.evaluate([only_port_1, port_8080], CONN)
    assert not any("no allow policies match" in note for note in d.dry_run), d.dry_run
