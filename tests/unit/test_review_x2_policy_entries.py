"""Malformed IP and port entries of an Authorization, at the agent's xDS boundary and in its evaluation.

ztunnel (src/rbac.rs ``TryFrom<&Match> for RbacMatch``) keeps such a policy: it drops a malformed IP entry alone
(``filter_map(|a| a.try_into().ok())``) and truncates a port (``*p as u16``). The agent NACKed the whole policy
instead, so a new ALLOW with one bad address entry never arrived, and with no other ALLOW on the workload everybody
was admitted; a new DENY with one was not enforced at all. Now the policy is accepted (ACKed) and each malformed
entry is read the restrictive way (agent/rbac.py module docstring): in an ALLOW it matches nobody and excludes
everybody, in a DENY it matches anybody and excludes nobody, so that an ALLOW never admits more and a DENY never
denies less than any reading of what its author wrote. Each one is logged with its policy and path, and counted.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from agent import rbac
from agent.prometheus import Registry
from agent.state import ADDRESS_TYPE, AUTHORIZATION_TYPE, WorkloadStore
from agent.xds import XdsClient, decode_response
from api.istio.security import authorization_pb2 as pb
from api.istio.workload import workload_pb2 as wpb
from common.spiffe import Identity

SLEEP = Identity("cluster.local", "client", "sleep")
BAD_BYTES = pb.Address(address=b"\x0a\x01\x00", length=24)  # 3 bytes: no address
TOO_LONG = pb.Address(address=bytes([10, 9, 0, 0]), length=40)  # /40 of an IPv4 address
WRAPPING_PORT = 65536 + 80  # ztunnel's `as u16` reads it as 80
UNSET = pb.StringMatch()  # no match_type: ztunnel's conversion drops it


def cidr(text: str) -> pb.Address:
    net = ipaddress.ip_network(text)
    return pb.Address(address=net.network_address.packed, length=net.prefixlen)


def conn(src: str = "10.1.0.5", port: int = 80, ident: Identity | None = SLEEP) -> rbac.Connection:
    return rbac.Connection(src, "10.2.0.7", port, ident, 40000)


def policy(*matches: pb.Match, action: int = pb.ALLOW, name: str = "p") -> pb.Authorization:
    return pb.Authorization(
        name=name,
        namespace="demo",
        scope=pb.NAMESPACE,
        action=action,  # type: ignore[arg-type]
        groups=[pb.Group(rules=[pb.Rules(matches=list(matches))])],
    )


def allow(**fields: Any) -> pb.Authorization:
    return policy(pb.Match(**fields))


def deny(**fields: Any) -> pb.Authorization:
    return policy(pb.Match(**fields), action=pb.DENY)


# (description, policy, connection, whether the policy matches it)
CASES: list[tuple[str, pb.Authorization, rbac.Connection, bool]] = [
    # ALLOW: a malformed value matches nobody and excludes everybody.
    ("ALLOW, only source entry malformed, with a port: not port-80-for-all", allow(source_ips=[BAD_BYTES],
     destination_ports=[80]), conn(), False),
    ("ALLOW, prefix longer than the address, with a port", allow(source_ips=[TOO_LONG], destination_ports=[80]),
     conn("10.9.0.1"), False),
    ("ALLOW, malformed entry beside a good one: the good one still admits", allow(source_ips=[BAD_BYTES,
     cidr("10.1.0.0/16")]), conn(), True),
    ("ALLOW, malformed entry beside a good one: nobody else", allow(source_ips=[BAD_BYTES, cidr("10.1.0.0/16")]),
     conn("10.9.0.1"), False),
    ("ALLOW, malformed exclusion: the Match matches nothing", allow(not_source_ips=[BAD_BYTES],
     destination_ports=[80]), conn(), False),
    ("ALLOW, malformed destination entry", allow(destination_ips=[TOO_LONG], principals=[pb.StringMatch(
     exact="cluster.local/ns/client/sa/sleep")]), conn(), False),
    ("ALLOW, port above 65535 is not port 80", allow(destination_ports=[WRAPPING_PORT]), conn(port=80), False),
    ("ALLOW, port above 65535 excluded: not everything else", allow(not_destination_ports=[WRAPPING_PORT]),
     conn(port=8080), False),
    ("ALLOW, a sibling Match still decides", policy(pb.Match(source_ips=[BAD_BYTES]), pb.Match(principals=[
     pb.StringMatch(exact="cluster.local/ns/client/sa/sleep")])), conn(), True),
    # DENY: a malformed value matches anybody and excludes nobody.
    ("DENY, only entry malformed: denies, not skipped", deny(source_ips=[BAD_BYTES]), conn(), True),
    ("DENY, malformed source beside a good one, with a port: any source on that port",
     deny(source_ips=[BAD_BYTES, cidr("10.1.0.0/16")], destination_ports=[22]), conn("10.9.0.1", 22), True),
    ("DENY, the other fields still narrow it", deny(source_ips=[BAD_BYTES], destination_ports=[22]),
     conn("10.9.0.1", 80), False),
    ("DENY, malformed exclusion dropped, good exclusion kept", deny(not_source_ips=[BAD_BYTES,
     cidr("10.1.0.0/16")]), conn(), False),
    ("DENY, malformed exclusion dropped: everybody else denied", deny(not_source_ips=[BAD_BYTES,
     cidr("10.1.0.0/16")]), conn("10.9.0.1"), True),
    ("DENY, port above 65535: any port", deny(destination_ports=[WRAPPING_PORT], namespaces=[pb.StringMatch(
     exact="client")]), conn(port=8080), True),
    ("DENY, port above 65535 excluded: excludes nothing", deny(not_destination_ports=[WRAPPING_PORT]),
     conn(port=80), True),
    # An unset StringMatch (no exact, prefix, suffix or presence), which ztunnel drops: the same rule.
    ("ALLOW, only principal unset, with a port: not port-80-for-all", allow(principals=[UNSET],
     destination_ports=[80]), conn(), False),
    ("ALLOW, unset principal beside a good one: the good one still admits", allow(principals=[UNSET,
     pb.StringMatch(exact="cluster.local/ns/client/sa/sleep")]), conn(), True),
    ("ALLOW, unset namespace exclusion: the Match matches nothing", allow(not_namespaces=[UNSET],
     destination_ports=[80]), conn(), False),
    ("DENY, only namespace unset: denies", deny(namespaces=[UNSET], destination_ports=[80]), conn(), True),
    ("DENY, unset principal exclusion dropped: denies", deny(not_principals=[UNSET]), conn(), True),
]  # fmt: skip


@pytest.mark.parametrize(("policy_", "connection", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_entries_are_read_restrictively(
    policy_: pb.Authorization, connection: rbac.Connection, expected: bool
) -> None:
    assert rbac.matches(policy_, connection) is expected


def test_malformed_entries_are_listed_with_their_path_and_reading() -> None:
    p = policy(
        pb.Match(source_ips=[cidr("10.1.0.0/16"), BAD_BYTES], not_destination_ips=[TOO_LONG]),
        pb.Match(destination_ports=[80, WRAPPING_PORT], not_principals=[UNSET]),
    )
    found = [(e.path, e.field, e.value) for e in rbac.malformed_entries(p)]
    assert found == [
        ("groups[0].rules[0].matches[0].not_destination_ips[0]", "not_destination_ips", "10.9.0.0/40"),
        ("groups[0].rules[0].matches[0].source_ips[1]", "source_ips", "address of 3 bytes"),
        ("groups[0].rules[0].matches[1].destination_ports[1]", "destination_ports", "65616"),
        ("groups[0].rules[0].matches[1].not_principals[0]", "not_principals", "unset StringMatch"),
    ]
    assert rbac.malformed_entries(allow(source_ips=[cidr("10.0.0.0/8")], destination_ports=[65535])) == []


def resource(name: str, msg: Any, type_url: str) -> discovery_pb2.Resource:
    return discovery_pb2.Resource(
        name=name, version="v1", resource=any_pb2.Any(type_url=type_url, value=msg.SerializeToString())
    )


def test_a_policy_with_a_malformed_entry_is_acked_not_nacked() -> None:
    decoded = decode_response(
        discovery_pb2.DeltaDiscoveryResponse(
            type_url=AUTHORIZATION_TYPE,
            nonce="1",
            resources=[resource("demo/p", allow(source_ips=[BAD_BYTES], destination_ports=[80]), AUTHORIZATION_TYPE)],
        )
    )
    assert decoded.errors == []
    assert list(decoded.upserts) == ["demo/p"]
    assert [(name, entry.path) for name, _, entry in decoded.dropped] == [
        ("demo/p", "groups[0].rules[0].matches[0].source_ips[0]")
    ]


def test_with_a_policy_sent_twice_only_the_copy_applied_is_reported() -> None:
    decoded = decode_response(
        discovery_pb2.DeltaDiscoveryResponse(
            type_url=AUTHORIZATION_TYPE,
            nonce="1",
            resources=[
                resource("demo/p", allow(source_ips=[BAD_BYTES]), AUTHORIZATION_TYPE),
                resource("demo/p", allow(source_ips=[cidr("10.0.0.0/8")]), AUTHORIZATION_TYPE),
            ],
        )
    )
    assert decoded.errors == [] and decoded.dropped == []


def server_workload() -> wpb.Address:
    w = wpb.Workload(
        uid="c//Pod/demo/server", name="server", namespace="demo", addresses=[socket.inet_aton("10.2.0.7")]
    )
    w.tunnel_protocol = wpb.HBONE
    return wpb.Address(workload=w)


@pytest.mark.parametrize(
    ("new_policy", "expect_allowed"),
    [
        # The author allowed port 80 from one address only: the port must not open to all.
        (allow(source_ips=[BAD_BYTES], destination_ports=[80]), False),
        # The author denied a source range: not knowing which, the agent denies all sources.
        (deny(source_ips=[BAD_BYTES]), False),
    ],
    ids=["new ALLOW", "new DENY"],
)
def test_a_new_policy_with_a_malformed_entry_is_enforced_restrictively(
    new_policy: pb.Authorization, expect_allowed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the client and the store, as a connection's decision sees it. Before, the NACKed policy never
    reached the store: the workload, with no policy at all, admitted every caller."""
    store = WorkloadStore()
    registry = Registry()
    client = XdsClient(store, "127.0.0.1:1", "n1", registry=registry)
    addr = discovery_pb2.DeltaDiscoveryResponse(
        type_url=ADDRESS_TYPE, nonce="1", resources=[resource("c//Pod/demo/server", server_workload(), ADDRESS_TYPE)]
    )
    assert not client.handle_response(addr).HasField("error_detail")
    with caplog.at_level(logging.WARNING, logger="ambit.agent.xds"):
        ack = client.handle_response(
            discovery_pb2.DeltaDiscoveryResponse(
                type_url=AUTHORIZATION_TYPE, nonce="2", resources=[resource("demo/p", new_policy, AUTHORIZATION_TYPE)]
            )
        )
    assert not ack.HasField("error_detail")  # ACKed, as ztunnel does: the agent becomes ready
    assert client.ready.is_set()
    server = store.workload_by_ip("10.2.0.7")
    assert server is not None
    decision = rbac.evaluate(store.policies_for(server), conn())
    assert decision.allowed is expect_allowed, decision
    assert registry.get_sample_value("ambit_xds_authorization_malformed_entries_total", {"field": "source_ips"}) == 1
    assert client.stats["malformed_entries"] == 1
    (record,) = [r for r in caplog.records if r.getMessage() == "authorization policy entry malformed"]
    logged = record.fields  # type: ignore[attr-defined]
    assert logged["policy"] == "demo/p" and logged["version"] == "v1"
    assert logged["entry"] == "groups[0].rules[0].matches[0].source_ips[0]"
    assert logged["value"] == "address of 3 bytes"
    assert logged["action"] == pb.Action.Name(new_policy.action)
    assert logged["reading"]
