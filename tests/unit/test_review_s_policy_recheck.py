"""A policy update re-checks the connections whose policies it touched, once per distinct peer (helper S, agent at
large-cluster scale).

With 10,000 tracked connections every policy update (one selector policy of one service) evaluated all 10,000:
0.7-1.0 s of one loop turn. ztunnel's PolicyWatcher re-checks every connection too; a connection whose destination's
policy set the update did not touch keeps its decision, so skipping it changes no outcome. Per decision, the policy's
key is no longer formatted (it was, for every applicable policy of every connection).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest

from agent import connections, rbac
from agent.connections import ConnectionRegistry
from agent.metrics import Metrics
from agent.state import WorkloadStore
from api.istio.security import authorization_pb2 as apb
from api.istio.workload import workload_pb2 as wpb
from common.spiffe import Identity

CLIENT = Identity("cluster.local", "client", "sleep")


def workload(i: int, namespace: str, selectors: tuple[str, ...] = ()) -> wpb.Workload:
    return wpb.Workload(
        uid=f"c//Pod/{namespace}/w{i}",
        name=f"w{i}",
        namespace=namespace,
        addresses=[ipaddress.ip_address(f"10.2.0.{i}").packed],
        tunnel_protocol=wpb.HBONE,
        authorization_policies=list(selectors),
    )


def policy(name: str, namespace: str, action: int, port: int, scope: int = apb.NAMESPACE) -> apb.Authorization:
    return apb.Authorization(
        name=name,
        namespace=namespace,
        scope=scope,  # type: ignore[arg-type]
        action=action,  # type: ignore[arg-type]
        groups=[apb.Group(rules=[apb.Rules(matches=[apb.Match(destination_ports=[port])])])],
    )


class Mesh:
    """Workloads 1-2 in namespace a (2 selects a/sel), 3-4 in b; two connections to each, from one client."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.store = WorkloadStore()
        self.store.put(
            [
                workload(1, "a"),
                workload(2, "a", selectors=("a/sel",)),
                workload(3, "b"),
                workload(4, "b"),
            ]
        )
        self.registry = ConnectionRegistry(self.store, Metrics())
        self.cut: list[str] = []
        for i in (1, 2, 3, 4):
            for src_port in (40001, 40002):
                conn = rbac.Connection("10.1.0.5", f"10.2.0.{i}", 80, CLIENT, src_port)
                self.registry.track(conn, f"c//Pod/{'a' if i < 3 else 'b'}/w{i}", "inbound", self._closer(i, src_port))
        self.judged: list[str] = []
        original = rbac.evaluate

        def counting(policies: Any, conn: rbac.Connection) -> rbac.Decision:
            self.judged.append(conn.dst_ip)
            return original(policies, conn)

        monkeypatch.setattr(connections.rbac, "evaluate", counting)

    def _closer(self, i: int, src_port: int) -> Any:
        return functools.partial(self.cut.append, f"w{i}:{src_port}")

    def judged_workloads(self) -> list[str]:
        out = sorted({f"w{ip.rsplit('.', 1)[1]}" for ip in self.judged})
        self.judged.clear()
        return out


@pytest.fixture
def mesh(monkeypatch: pytest.MonkeyPatch) -> Iterator[Mesh]:
    yield Mesh(monkeypatch)


def test_a_namespace_policy_rechecks_its_namespace_only(mesh: Mesh) -> None:
    mesh.store.put(policies=[policy("allow-80", "a", apb.ALLOW, 80)])
    assert mesh.judged_workloads() == ["w1", "w2"] and mesh.cut == []
    mesh.store.put(policies=[policy("allow-80", "a", apb.ALLOW, 8080)])  # changed: port 80 is allowed by none
    assert mesh.judged_workloads() == ["w1", "w2"]
    assert sorted(mesh.cut) == ["w1:40001", "w1:40002", "w2:40001", "w2:40002"]
    assert len(mesh.registry) == 4


def test_a_removed_policy_rechecks_where_it_applied(mesh: Mesh) -> None:
    """A removal's scope is the removed policy's: removing one of two ALLOWs in b denies what only it allowed."""
    mesh.store.put(policies=[policy("allow-80", "b", apb.ALLOW, 80), policy("allow-90", "b", apb.ALLOW, 90)])
    mesh.judged_workloads()
    mesh.store.apply("type.googleapis.com/istio.security.Authorization", {}, ["b/allow-80"])
    assert mesh.judged_workloads() == ["w3", "w4"]
    assert sorted(mesh.cut) == ["w3:40001", "w3:40002", "w4:40001", "w4:40002"]


def test_a_selector_policy_rechecks_the_workloads_that_name_it(mesh: Mesh) -> None:
    mesh.store.put(policies=[policy("sel", "a", apb.DENY, 80, scope=apb.WORKLOAD_SELECTOR)])
    assert mesh.judged_workloads() == ["w2"]
    assert sorted(mesh.cut) == ["w2:40001", "w2:40002"]


def test_a_global_policy_rechecks_everybody_once_per_peer(mesh: Mesh) -> None:
    """Two connections from one client to one workload differ by source port only, which no policy looks at."""
    mesh.store.put(policies=[policy("deny-80", "istio-system", apb.DENY, 80, scope=apb.GLOBAL)])
    assert sorted(mesh.judged) == ["10.2.0.1", "10.2.0.2", "10.2.0.3", "10.2.0.4"]
    assert len(mesh.cut) == 8 and len(mesh.registry) == 0


def test_a_workload_update_rechecks_its_own_connections(mesh: Mesh) -> None:
    mesh.store.put(policies=[policy("sel", "b", apb.DENY, 80, scope=apb.WORKLOAD_SELECTOR)])
    mesh.judged_workloads()
    mesh.store.put([workload(4, "b", selectors=("b/sel",))])
    assert mesh.judged_workloads() == ["w4"]
    assert sorted(mesh.cut) == ["w4:40001", "w4:40002"]


def test_a_connection_to_a_workload_gone_is_judged_by_its_last_namespace(mesh: Mesh) -> None:
    mesh.store.apply("type.googleapis.com/istio.workload.Address", {}, ["c//Pod/a/w1"])
    mesh.judged_workloads()
    mesh.store.put(policies=[policy("deny-80", "b", apb.DENY, 80)])
    assert mesh.judged_workloads() == ["w3", "w4"]
    mesh.store.put(policies=[policy("deny-80", "a", apb.DENY, 80)])
    assert mesh.judged_workloads() == ["w1", "w2"]
    assert "w1:40001" in mesh.cut


def test_a_decision_formats_no_policy_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled form of a policy is found from the object itself: its key was formatted per applicable policy
    per decision (~0.5 us each; 70 policies in a namespace are 70 per connection)."""
    policies = [policy(f"p{i}", "a", apb.ALLOW, 1000 + i) for i in range(20)]
    conn = rbac.Connection("10.1.0.5", "10.2.0.1", 1019, CLIENT)
    assert rbac.evaluate(policies, conn).policy == "a/p19"
    keys: list[str] = []
    original = rbac.policy_key

    def counting(p: Any) -> str:
        keys.append(p.name)
        return original(p)

    monkeypatch.setattr(rbac, "policy_key", counting)
    for _ in range(10):
        assert rbac.evaluate(policies, conn).policy == "a/p19"
    assert keys == []
    replaced = policy("p19", "a", apb.ALLOW, 2000)
    assert not rbac.evaluate([*policies[:19], replaced], conn).allowed  # a new object is read afresh
    assert keys == ["p19"]
    assert len(rbac._BY_ID) == len(rbac._COMPILED)


def cidr(text: str) -> apb.Address:
    net = ipaddress.ip_network(text)
    return apb.Address(address=net.network_address.packed, length=net.prefixlen)


@pytest.mark.parametrize(
    ("field", "nets", "src", "dst", "holds"),
    [
        ("source_ips", ["10.1.0.0/16"], "10.1.255.9", "10.2.0.1", True),
        ("source_ips", ["10.1.0.0/16"], "10.2.0.9", "10.2.0.1", False),
        ("source_ips", ["0.0.0.0/0"], "10.2.0.9", "10.2.0.1", True),
        ("source_ips", ["0.0.0.0/0"], "fd00::1", "fd00::2", False),  # another family never matches
        ("source_ips", ["::/0"], "10.2.0.9", "10.2.0.1", False),
        ("source_ips", ["::ffff:0:0/96"], "10.2.0.9", "10.2.0.1", False),  # nor does a v4-mapped range
        ("source_ips", ["::/0"], "fd00::1", "fd00::2", True),
        ("source_ips", ["fd00::/64", "10.0.0.0/8"], "10.9.9.9", "10.2.0.1", True),
        ("source_ips", ["fd00::/64", "10.0.0.0/8"], "fd00::1:2", "fd00::2", True),
        ("source_ips", ["fd00::/64", "10.0.0.0/8"], "fd01::1", "fd00::2", False),
        ("source_ips", ["10.1.0.5/32"], "10.1.0.5", "10.2.0.1", True),
        ("source_ips", ["10.1.0.5/32"], "10.1.0.4", "10.2.0.1", False),
        ("destination_ips", ["10.2.0.0/31"], "10.1.0.5", "10.2.0.1", True),
        ("destination_ips", ["10.2.0.0/31"], "10.1.0.5", "10.2.0.2", False),
        ("not_source_ips", ["10.1.0.0/16"], "10.1.0.5", "10.2.0.1", False),
        ("not_source_ips", ["10.1.0.0/16", "fd00::/8"], "10.3.0.5", "10.2.0.1", True),
    ],
)
def test_address_ranges_match_as_ipaddress_says(field: str, nets: list[str], src: str, dst: str, holds: bool) -> None:
    """CIDRs are compared as integers (one parse of the peer's address per decision): the same answers as
    ipaddress's ``in``, families apart."""
    expected = any(ipaddress.ip_address(src if "source" in field else dst) in ipaddress.ip_network(n) for n in nets)
    assert expected == (holds if not field.startswith("not_") else not holds)
    match = apb.Match()
    getattr(match, field).extend(cidr(n) for n in nets)
    p = apb.Authorization(
        name="p", namespace="a", action=apb.ALLOW, groups=[apb.Group(rules=[apb.Rules(matches=[match])])]
    )
    assert rbac.evaluate([p], rbac.Connection(src, dst, 80, CLIENT)).allowed is holds


async def test_past_the_budget_the_recheck_goes_on_in_the_next_loop_turns(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One decision per loop turn: a mesh-wide DENY cuts w1's connections in the update's turn, then one workload's
    a turn; a removal of the DENY before the last turn spares w4 (the store as it is then decides)."""
    monkeypatch.setattr(connections, "RECHECK_BUDGET", 1)
    mesh.store.put(policies=[policy("deny-80", "istio-system", apb.DENY, 80, scope=apb.GLOBAL)])
    assert sorted(mesh.cut) == ["w1:40001", "w1:40002"]
    await asyncio.sleep(0)
    assert len(mesh.cut) == 4
    await asyncio.sleep(0)
    assert len(mesh.cut) == 6
    mesh.store.apply("type.googleapis.com/istio.security.Authorization", {}, ["istio-system/deny-80"])
    for _ in range(3):
        await asyncio.sleep(0)
    assert sorted(c.split(":")[0] for c in mesh.cut) == ["w1", "w1", "w2", "w2", "w3", "w3"]
    assert len(mesh.registry) == 2


def test_listing_malformed_entries_parses_no_well_formed_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """The xDS client lists the malformed entries of every policy it receives (1,000 in the synthetic cluster's
    state): each well-formed address was parsed into a network for that (~3 us each), ~70 us a policy. A quick look
    finds there is nothing to list; a malformed one is still listed with its reading."""
    parsed: list[bytes] = []
    original = rbac.parse_net

    def counting(entry: Any) -> Any:
        parsed.append(bytes(entry.address))
        return original(entry)

    monkeypatch.setattr(rbac, "parse_net", counting)
    match = apb.Match(source_ips=[cidr("10.1.0.0/16"), cidr("fd00::/64")], destination_ports=[80])
    match.principals.add(exact="cluster.local/ns/a/sa/b")
    good = apb.Authorization(
        name="p", namespace="a", action=apb.DENY, groups=[apb.Group(rules=[apb.Rules(matches=[match])])]
    )
    assert rbac.malformed_entries(good) == [] and parsed == []
    match.source_ips.add(address=b"\x0a\x01\x02", length=8)
    bad = apb.Authorization(
        name="p", namespace="a", action=apb.DENY, groups=[apb.Group(rules=[apb.Rules(matches=[match])])]
    )
    [entry] = rbac.malformed_entries(bad)
    assert entry.path == "groups[0].rules[0].matches[0].source_ips[2]" and entry.value == "address of 3 bytes"
