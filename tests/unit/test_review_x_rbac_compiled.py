"""Policies are read into their matchable form once, not at every connection: ztunnel converts an Authorization
when it arrives (rbac.rs TryFrom) and evaluates that. Reading the protobuf again per decision (CIDRs parsed anew
each time) cost ~3 ms per connection with 20 applicable ALLOW policies on this machine, paid for every new
connection and, on every policy update, for every tracked connection at once on the event loop (10,000
connections: half a minute with all traffic stalled).
The semantics are pinned in test_rbac_eval.py; here only that a replaced policy is read afresh."""

from __future__ import annotations

import pytest

from agent import rbac
from api.istio.security import authorization_pb2 as pb
from common.spiffe import Identity

SLEEP = Identity("cluster.local", "client", "sleep")


def allow_port(port: int, name: str = "p") -> pb.Authorization:
    return pb.Authorization(
        name=name,
        namespace="demo",
        scope=pb.NAMESPACE,
        action=pb.ALLOW,
        groups=[pb.Group(rules=[pb.Rules(matches=[pb.Match(destination_ports=[port])])])],
    )


def test_a_policy_is_read_once_for_many_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[object] = []
    original = rbac._compile

    def counting(m: object, deny: bool) -> object:
        reads.append(m)
        return original(m, deny)

    monkeypatch.setattr(rbac, "_compile", counting)
    policies = [allow_port(80, "a"), allow_port(8080, "b")]
    for i in range(100):
        decision = rbac.evaluate(policies, rbac.Connection("10.1.0.5", "10.2.0.7", 8080, SLEEP, 40000 + i))
        assert decision.allowed and decision.policy == "demo/b"
    assert len(reads) == 2  # one Match in each policy, each read once


def test_a_replaced_policy_is_read_afresh() -> None:
    conn = rbac.Connection("10.1.0.5", "10.2.0.7", 8080, SLEEP)
    assert rbac.evaluate([allow_port(8080)], conn).allowed
    assert not rbac.evaluate([allow_port(9090)], conn).allowed  # same key, new object: the store's update
    assert rbac.evaluate([allow_port(8080)], conn).allowed


def test_updates_of_a_policy_do_not_pile_up() -> None:
    """Each update is a new object: only the latest of a policy stays read (the agent's memory budget)."""
    conn = rbac.Connection("10.1.0.5", "10.2.0.7", 8080, SLEEP)
    for port in range(1000, 1100):
        rbac.evaluate([allow_port(port, "churning")], conn)
    assert sum(1 for key in rbac._COMPILED if key == "demo/churning") == 1
    assert len(rbac._COMPILED) < 100
