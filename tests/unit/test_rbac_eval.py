"""Table tests for agent.rbac: every rule shape of Istio's L4 authorization (reference §4)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from google.protobuf import empty_pb2

from agent import rbac
from api.istio.security import authorization_pb2 as pb
from common.spiffe import Identity

SLEEP = Identity("cluster.local", "client", "sleep")
OTHER = Identity("cluster.local", "other", "curl")
FOREIGN = Identity("other.domain", "client", "sleep")


def conn(
    ident: Identity | None = SLEEP, src: str = "10.1.0.5", dst: str = "10.2.0.7", port: int = 8080
) -> rbac.Connection:
    return rbac.Connection(src_ip=src, dst_ip=dst, dst_port=port, src_identity=ident, src_port=40000)


def exact(s: str) -> pb.StringMatch:
    return pb.StringMatch(exact=s)


def prefix(s: str) -> pb.StringMatch:
    return pb.StringMatch(prefix=s)


def suffix(s: str) -> pb.StringMatch:
    return pb.StringMatch(suffix=s)


def presence() -> pb.StringMatch:
    return pb.StringMatch(presence=empty_pb2.Empty())


def cidr(text: str) -> pb.Address:
    net = ipaddress.ip_network(text, strict=False)
    return pb.Address(address=net.network_address.packed, length=net.prefixlen)


def sa(ns: str, name: str) -> pb.ServiceAccountMatch:
    return pb.ServiceAccountMatch(namespace=ns, serviceAccount=name)


def policy(
    *groups: list[list[pb.Match]],
    action: pb.Action = pb.ALLOW,
    name: str = "p",
    ns: str = "server",
    dry_run: bool = False,
) -> pb.Authorization:
    """groups -> rules (clauses) -> matches, as nested lists."""
    return pb.Authorization(
        name=name,
        namespace=ns,
        action=action,
        dry_run=dry_run,
        groups=[pb.Group(rules=[pb.Rules(matches=clause) for clause in g]) for g in groups],
    )


def one(**fields: Any) -> pb.Authorization:
    """A policy with one group, one clause, one Match."""
    return policy([[pb.Match(**fields)]])


# (description, policy, connection, expected match)
MATCH_TABLE: list[tuple[str, pb.Authorization, rbac.Connection, bool]] = [
    # structure
    ("no groups never matches", policy(), conn(), False),
    ("group with no rules matches all", policy([]), conn(), True),
    ("clause with no matches matches all", policy([[]]), conn(), True),
    ("empty Match is skipped", policy([[pb.Match()]]), conn(), False),
    ("empty Match skipped, sibling decides", policy([[pb.Match(), pb.Match(destination_ports=[8080])]]), conn(), True),
    ("unset StringMatch makes Match empty", one(principals=[pb.StringMatch()]), conn(), False),
    ("malformed CIDR dropped -> empty Match", one(source_ips=[pb.Address(address=b"\x01", length=8)]), conn(), False),
    # principals: compared without spiffe://
    ("principal exact", one(principals=[exact("cluster.local/ns/client/sa/sleep")]), conn(), True),
    ("principal exact with scheme never matches", one(principals=[exact(str(SLEEP))]), conn(), False),
    ("principal exact other", one(principals=[exact("cluster.local/ns/other/sa/curl")]), conn(), False),
    ("principal prefix", one(principals=[prefix("cluster.local/ns/client/")]), conn(), True),
    ("principal suffix", one(principals=[suffix("/sa/sleep")]), conn(), True),
    ("principal suffix miss", one(principals=[suffix("/sa/curl")]), conn(), False),
    ("principal presence", one(principals=[presence()]), conn(), True),
    ("principal presence, no identity", one(principals=[presence()]), conn(None), False),
    ("principal values OR-ed", one(principals=[exact("x"), suffix("/sa/sleep")]), conn(), True),
    ("not_principals excludes", one(not_principals=[exact("cluster.local/ns/client/sa/sleep")]), conn(), False),
    ("not_principals other passes", one(not_principals=[exact("cluster.local/ns/other/sa/curl")]), conn(), True),
    ("not_principals presence, identity", one(not_principals=[presence()]), conn(), False),
    ("not_principals presence, no identity (STRICT)", one(not_principals=[presence()]), conn(None), True),
    ("principal exact, no identity", one(principals=[exact("")]), conn(None), False),
    # namespaces: namespace of the peer identity
    ("namespace exact", one(namespaces=[exact("client")]), conn(), True),
    ("namespace exact miss", one(namespaces=[exact("other")]), conn(), False),
    ("namespace prefix", one(namespaces=[prefix("cli")]), conn(), True),
    ("namespace suffix", one(namespaces=[suffix("ent")]), conn(), True),
    ("namespace presence", one(namespaces=[presence()]), conn(), True),
    ("namespace, no identity", one(namespaces=[prefix("")]), conn(None), False),
    ("not_namespaces excludes", one(not_namespaces=[exact("client")]), conn(), False),
    ("not_namespaces other passes", one(not_namespaces=[exact("other")]), conn(), True),
    ("not_namespaces, no identity passes", one(not_namespaces=[exact("client")]), conn(None), True),
    # service accounts
    ("service account", one(service_accounts=[sa("client", "sleep")]), conn(), True),
    ("service account wrong ns", one(service_accounts=[sa("other", "sleep")]), conn(), False),
    ("service account no identity", one(service_accounts=[sa("client", "sleep")]), conn(None), False),
    ("not_service_accounts excludes", one(not_service_accounts=[sa("client", "sleep")]), conn(), False),
    ("not_service_accounts other", one(not_service_accounts=[sa("other", "curl")]), conn(), True),
    # source / destination IPs with CIDR lengths
    ("source /32", one(source_ips=[cidr("10.1.0.5/32")]), conn(), True),
    ("source /32 miss", one(source_ips=[cidr("10.1.0.6/32")]), conn(), False),
    ("source /16", one(source_ips=[cidr("10.1.0.0/16")]), conn(), True),
    ("source /24 miss", one(source_ips=[cidr("10.1.1.0/24")]), conn(), False),
    ("source /0", one(source_ips=[cidr("0.0.0.0/0")]), conn(), True),
    ("source v6 net never holds v4", one(source_ips=[cidr("::/0")]), conn(), False),
    ("source v6", one(source_ips=[cidr("fd00::/64")]), conn(src="fd00::5"), True),
    ("not_source_ips excludes", one(not_source_ips=[cidr("10.1.0.0/16")]), conn(), False),
    ("not_source_ips other", one(not_source_ips=[cidr("10.9.0.0/16")]), conn(), True),
    ("destination ip", one(destination_ips=[cidr("10.2.0.7/32")]), conn(), True),
    ("destination ip miss", one(destination_ips=[cidr("10.2.0.8/32")]), conn(), False),
    ("not_destination_ips excludes", one(not_destination_ips=[cidr("10.2.0.0/24")]), conn(), False),
    # destination ports (target port after mapping)
    ("port", one(destination_ports=[8080]), conn(), True),
    ("port OR-ed", one(destination_ports=[80, 8080]), conn(), True),
    ("port miss (service port is not target port)", one(destination_ports=[80]), conn(), False),
    ("port 15008 never seen", one(destination_ports=[15008]), conn(), False),
    ("not_destination_ports excludes", one(not_destination_ports=[8080]), conn(), False),
    ("not_destination_ports other", one(not_destination_ports=[9090]), conn(), True),
    # inside a Match: types AND-ed, positive AND negative
    ("types AND-ed both hold", one(namespaces=[exact("client")], destination_ports=[8080]), conn(), True),
    ("types AND-ed one fails", one(namespaces=[exact("client")], destination_ports=[9090]), conn(), False),
    ("positive and negative", one(namespaces=[prefix("c")], not_namespaces=[exact("client")]), conn(), False),
    # clause: matches OR-ed
    (
        "clause matches OR-ed",
        policy([[pb.Match(destination_ports=[1]), pb.Match(namespaces=[exact("client")])]]),
        conn(),
        True,
    ),
    # group: clauses AND-ed
    (
        "group clauses AND-ed, one fails",
        policy([[pb.Match(namespaces=[exact("client")])], [pb.Match(destination_ports=[1])]]),
        conn(),
        False,
    ),
    (
        "group clauses AND-ed, both hold",
        policy([[pb.Match(namespaces=[exact("client")])], [pb.Match(destination_ports=[8080])]]),
        conn(),
        True,
    ),
    ("group with empty clause and a holding one", policy([[], [pb.Match(destination_ports=[8080])]]), conn(), True),
    # policy: groups OR-ed
    (
        "groups OR-ed",
        policy([[pb.Match(destination_ports=[1])]], [[pb.Match(principals=[presence()])]]),
        conn(),
        True,
    ),
    # port-level PeerAuthentication shape: STRICT except 9090
    (
        "converted PA: plaintext to strict port",
        policy([[pb.Match(not_principals=[presence()])], [pb.Match(not_destination_ports=[9090])]]),
        conn(None, port=8080),
        True,
    ),
    (
        "converted PA: plaintext to permissive port",
        policy([[pb.Match(not_principals=[presence()])], [pb.Match(not_destination_ports=[9090])]]),
        conn(None, port=9090),
        False,
    ),
    (
        "converted PA: mTLS to strict port",
        policy([[pb.Match(not_principals=[presence()])], [pb.Match(not_destination_ports=[9090])]]),
        conn(port=8080),
        False,
    ),
    ("trust domain is part of principal", one(principals=[prefix("cluster.local/")]), conn(FOREIGN), False),
]


@pytest.mark.parametrize(("desc", "pol", "c", "expected"), MATCH_TABLE, ids=[row[0] for row in MATCH_TABLE])
def test_match_table(desc: str, pol: pb.Authorization, c: rbac.Connection, expected: bool) -> None:
    assert rbac.matches(pol, c) is expected, desc


def allow(name: str, *fields: dict[str, Any], dry_run: bool = False) -> pb.Authorization:
    return policy([[pb.Match(**f) for f in fields]], name=name, dry_run=dry_run)


def deny(name: str, *fields: dict[str, Any], dry_run: bool = False) -> pb.Authorization:
    return policy([[pb.Match(**f) for f in fields]], name=name, action=pb.DENY, dry_run=dry_run)


STRICT = policy(
    [[pb.Match(not_principals=[presence()])]], name="istio_converted_static_strict", ns="istio-system", action=pb.DENY
)
ALLOW_CLIENT_NS = allow("allow-client", {"namespaces": [exact("client")]})
DENY_SLEEP = deny("deny-sleep", {"principals": [exact(SLEEP.principal)]})
ALLOW_NOTHING = policy(name="allow-nothing")  # ALLOW with no rules: denies everything

# (description, policies, connection, outcome, deciding policy)
EVAL_TABLE: list[tuple[str, list[pb.Authorization], rbac.Connection, rbac.Outcome, str | None]] = [
    ("no policies allows", [], conn(), rbac.Outcome.NO_POLICIES, None),
    ("no policies allows plaintext", [], conn(None), rbac.Outcome.NO_POLICIES, None),
    ("allow matches", [ALLOW_CLIENT_NS], conn(), rbac.Outcome.ALLOWED, "server/allow-client"),
    ("allow exists but misses", [ALLOW_CLIENT_NS], conn(OTHER), rbac.Outcome.NOT_ALLOWED, None),
    ("allow-nothing denies all", [ALLOW_NOTHING], conn(), rbac.Outcome.NOT_ALLOWED, None),
    ("deny matches", [DENY_SLEEP], conn(), rbac.Outcome.EXPLICITLY_DENIED, "server/deny-sleep"),
    ("deny misses, no allows", [DENY_SLEEP], conn(OTHER), rbac.Outcome.NO_POLICIES, None),
    (
        "deny wins over allow",
        [ALLOW_CLIENT_NS, DENY_SLEEP],
        conn(),
        rbac.Outcome.EXPLICITLY_DENIED,
        "server/deny-sleep",
    ),
    (
        "deny evaluated first regardless of order",
        [DENY_SLEEP, ALLOW_CLIENT_NS],
        conn(),
        rbac.Outcome.EXPLICITLY_DENIED,
        "server/deny-sleep",
    ),
    (
        "STRICT denies plaintext",
        [STRICT],
        conn(None),
        rbac.Outcome.EXPLICITLY_DENIED,
        "istio-system/istio_converted_static_strict",
    ),
    ("STRICT passes mTLS", [STRICT], conn(), rbac.Outcome.NO_POLICIES, None),
    (
        "STRICT + allow, plaintext",
        [STRICT, ALLOW_CLIENT_NS],
        conn(None),
        rbac.Outcome.EXPLICITLY_DENIED,
        "istio-system/istio_converted_static_strict",
    ),
    ("any allow suffices", [ALLOW_NOTHING, ALLOW_CLIENT_NS], conn(), rbac.Outcome.ALLOWED, "server/allow-client"),
    (
        "dry-run deny not enforced",
        [deny("d", {"principals": [presence()]}, dry_run=True)],
        conn(),
        rbac.Outcome.NO_POLICIES,
        None,
    ),
    (
        "dry-run allow does not count as an allow policy",
        [allow("a", {"destination_ports": [1]}, dry_run=True)],
        conn(),
        rbac.Outcome.NO_POLICIES,
        None,
    ),
    (
        "dry-run allow does not rescue",
        [ALLOW_NOTHING, allow("a", {"destination_ports": [8080]}, dry_run=True)],
        conn(),
        rbac.Outcome.NOT_ALLOWED,
        None,
    ),
]


@pytest.mark.parametrize(("desc", "pols", "c", "outcome", "decider"), EVAL_TABLE, ids=[row[0] for row in EVAL_TABLE])
def test_evaluate_table(
    desc: str, pols: list[pb.Authorization], c: rbac.Connection, outcome: rbac.Outcome, decider: str | None
) -> None:
    d = rbac.evaluate(pols, c)
    assert d.outcome is outcome, desc
    assert d.policy == decider
    assert d.allowed is (outcome in (rbac.Outcome.ALLOWED, rbac.Outcome.NO_POLICIES))


def test_dry_run_is_reported_not_enforced() -> None:
    d = rbac.evaluate(
        [deny("audit-deny", {"principals": [presence()]}, dry_run=True), allow("audit-allow", {}, dry_run=True)],
        conn(),
    )
    assert d.allowed
    # the dry-run ALLOW (an empty Match) matches nothing: enforced, it would deny this connection too
    assert d.dry_run == ("dry-run: server/audit-deny would deny", "dry-run: no allow policies match, would deny")


def test_explain_names_policy() -> None:
    assert "server/deny-sleep" in rbac.evaluate([DENY_SLEEP], conn()).explain()
    assert rbac.evaluate([], conn()).explain() == rbac.Outcome.NO_POLICIES.value
