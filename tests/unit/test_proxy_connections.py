"""agent.connections.ConnectionRegistry: a store change re-checks tracked connections and cuts only the
ones current policy denies; connections are tracked from the policy decision on, so a change that lands while the
pod is still being connected cuts them too (as ztunnel registers before its first check:
`ConnectionManager::assert_rbac`, "Register before our initial assert")."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from agent import connections as connections_mod
from agent import inbound as inbound_mod
from agent import rbac
from agent.accesslog import AccessLog
from agent.connections import LATE_REJECTION, ConnectionRegistry
from agent.inbound import InboundProxy
from agent.metrics import Metrics, sample_value
from agent.state import WorkloadStore
from agent.tunnel import RelayResult
from api.istio.security import authorization_pb2 as apb
from api.istio.workload import workload_pb2 as wpb
from common.spiffe import Identity

SERVER = wpb.Workload(
    uid="Kubernetes//Pod/server/echo-1",
    name="echo-1",
    namespace="server",
    addresses=[ipaddress.ip_address("10.2.0.7").packed],
    node="n2",
    tunnel_protocol=wpb.HBONE,
)
SLEEP = Identity("cluster.local", "client", "sleep")
CURL = Identity("cluster.local", "client", "curl")


def deny(principal: str, name: str = "deny") -> apb.Authorization:
    return apb.Authorization(
        name=name,
        namespace="server",
        scope=apb.NAMESPACE,
        action=apb.DENY,
        groups=[apb.Group(rules=[apb.Rules(matches=[apb.Match(principals=[apb.StringMatch(exact=principal)])])])],
    )


def server_registry() -> tuple[WorkloadStore, Metrics, ConnectionRegistry]:
    """A store holding SERVER (no policies yet) and the registry watching it."""
    store = WorkloadStore()
    store.put([SERVER])
    metrics = Metrics()
    return store, metrics, ConnectionRegistry(store, metrics)


def fake_pod_and_relay(monkeypatch: pytest.MonkeyPatch, result: RelayResult) -> None:
    """inbound's upstream connect hands back a socket whose pod end is already closed, and its relay returns
    ``result`` at once: what a test of the inbound decision and its report needs of the data path."""

    async def pod(*_: Any, **__: Any) -> socket.socket:
        a, b = socket.socketpair()
        b.close()
        return a

    async def relayed(upstream: socket.socket, stream: Any, live: Any = None) -> RelayResult:
        upstream.close()
        return result

    monkeypatch.setattr(inbound_mod, "connect_upstream", pod)
    monkeypatch.setattr(inbound_mod, "relay", relayed)


def test_policy_change_cuts_only_denied_connections() -> None:
    store, metrics, registry = server_registry()
    cut: list[str] = []
    reports = {}
    for who in (SLEEP, CURL):
        conn = rbac.Connection("10.1.0.5", "10.2.0.7", 8080, who, 40000)
        reports[who] = AccessLog(metrics).start("inbound", ("10.1.0.5", 40000), ("10.2.0.7", 8080), dst=SERVER)
        registry.track(conn, SERVER.uid, "inbound", functools.partial(cut.append, who.service_account), [reports[who]])
    store.put(policies=[deny("cluster.local/ns/other/sa/x", "unrelated")])
    assert cut == [] and len(registry) == 2

    store.put(policies=[deny(CURL.principal)])
    assert cut == ["curl"] and len(registry) == 1
    assert sample_value(metrics, "ambit_connection_errors_total", {"reason": "policy_late_rejection"}) == 1
    decision = reports[CURL].decision
    assert decision is not None and decision.policy == "server/deny"
    [t] = list(registry._conns)
    assert t.conn.src_identity == SLEEP and t.late_rejection is None

    # a namespace-wide ALLOW that SLEEP does not match cuts it too
    allow = apb.Authorization(
        name="allow-other",
        namespace="server",
        scope=apb.NAMESPACE,
        action=apb.ALLOW,
        groups=[apb.Group(rules=[apb.Rules(matches=[apb.Match(namespaces=[apb.StringMatch(exact="other")])])])],
    )
    store.put(policies=[allow])
    assert cut == ["curl", "sleep"] and len(registry) == 0


def test_late_rejection_names_the_policy() -> None:
    store, _, registry = server_registry()
    t = registry.track(rbac.Connection("10.1.0.5", "10.2.0.7", 8080, None), SERVER.uid, "inbound", lambda: None)
    strict = apb.Authorization(
        name="istio_converted_static_strict",
        namespace="istio-system",
        scope=apb.GLOBAL,
        action=apb.DENY,
        groups=[apb.Group(rules=[apb.Rules(matches=[apb.Match(not_principals=[apb.StringMatch(presence={})])])])],
    )
    store.put(policies=[strict])
    assert t.late_rejection is not None
    assert t.late_rejection.startswith(LATE_REJECTION)
    assert "istio-system/istio_converted_static_strict" in t.late_rejection
    registry.untrack(t)  # idempotent after a cut
    assert len(registry) == 0


def test_attaching_an_existing_selector_policy_cuts() -> None:
    """Only the workload changes (it now names a selector policy that already existed)."""
    store = WorkloadStore()
    selector_deny = deny(CURL.principal, "deny-curl")
    selector_deny.scope = apb.WORKLOAD_SELECTOR
    store.put([SERVER], [selector_deny])
    registry = ConnectionRegistry(store, Metrics())
    cut: list[str] = []
    registry.track(rbac.Connection("10.1.0.6", "10.2.0.7", 8080, CURL), SERVER.uid, "inbound", lambda: cut.append("x"))
    other = wpb.Workload(uid="Kubernetes//Pod/server/other", name="other", namespace="server")
    store.put([other])  # an unrelated workload change re-checks nothing that matters
    assert cut == []
    attached = wpb.Workload()
    attached.CopyFrom(SERVER)
    attached.authorization_policies.append("server/deny-curl")
    change = store.put([attached])
    assert not change.policies and SERVER.uid in change.workloads
    assert cut == ["x"] and len(registry) == 0


@pytest.fixture
def tcp_pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """Connected loopback TCP pairs (the agent's end first); all closed at the end."""
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def tcp_pair(made: list[tuple[socket.socket, socket.socket]]) -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        peer = socket.create_connection(srv.getsockname())
        mine, _ = srv.accept()
    mine.setblocking(False)
    made.append((mine, peer))
    return mine, peer


async def test_policy_change_during_upstream_connect_cuts_the_spliced_connection(
    monkeypatch: pytest.MonkeyPatch, tcp_pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    """Same-node and inbound-plaintext path (ConnectionRegistry.splice_authorized)."""
    store, metrics, registry = server_registry()
    client_side, client = tcp_pair(tcp_pairs)

    async def connect_while_policy_changes(*_: Any, **__: Any) -> socket.socket:
        store.put(policies=[deny(CURL.principal, "deny-curl")])  # lands while the pod's SYN/ACK is on its way
        await asyncio.sleep(0)
        upstream, _pod = tcp_pair(tcp_pairs)
        return upstream

    monkeypatch.setattr(connections_mod, "connect_upstream", connect_while_policy_changes)
    report = AccessLog(metrics).start("inbound", ("10.1.0.6", 40000), ("10.2.0.7", 8080), dst=SERVER)
    conn = rbac.Connection("10.1.0.6", "10.2.0.7", 8080, CURL, 40000)
    task = asyncio.create_task(
        registry.splice_authorized(
            client_side, conn, SERVER, ("127.0.0.1", 1), [report], "inbound_plaintext", keep_source=False
        )
    )
    for _ in range(50):  # let the relay start (or be cut)
        await asyncio.sleep(0)
    client.close()  # ends the relay either way, so the test never waits on a running splice
    for _a, pod in tcp_pairs[1:]:
        pod.close()
    await task
    assert len(registry) == 0
    flags = {"response_flags": "DENY"}
    assert sample_value(metrics, "istio_tcp_connections_closed_total", flags) == 1, "connection was not cut"
    assert sample_value(metrics, "ambit_connection_errors_total", {"reason": "policy_late_rejection"}) == 1


class _FakeStream:
    def __init__(self) -> None:
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1


class _FakeRequest:
    """What InboundProxy._connect reads from a tunnel.ConnectRequest."""

    def __init__(self, authority: str, peer: Identity) -> None:
        self.authority = authority
        self.headers: list[tuple[str, str]] = []
        self.peer_identity = peer
        self.stream = _FakeStream()
        self.statuses: list[int] = []
        self.response_headers: list[list[tuple[str, str]] | None] = []

    async def respond(self, status: int, headers: list[tuple[str, str]] | None = None) -> None:
        self.statuses.append(status)
        self.response_headers.append(headers)


class _Certs:
    trust_domain = "cluster.local"


async def test_policy_change_during_upstream_connect_cuts_the_hbone_connection(
    monkeypatch: pytest.MonkeyPatch, tcp_pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    store, metrics, registry = server_registry()
    proxy = InboundProxy(store, _Certs(), "n2", metrics, AccessLog(metrics), registry)
    relayed: list[bool] = []

    async def connect_while_policy_changes(*_: Any, **__: Any) -> socket.socket:
        store.put(policies=[deny(CURL.principal, "deny-curl")])
        await asyncio.sleep(0)
        upstream, _pod = tcp_pair(tcp_pairs)
        return upstream

    async def fake_relay(upstream: socket.socket, stream: Any) -> RelayResult:
        relayed.append(True)
        await asyncio.sleep(0)
        upstream.close()
        return RelayResult(0, 0, None)

    monkeypatch.setattr(inbound_mod, "connect_upstream", connect_while_policy_changes)
    monkeypatch.setattr(inbound_mod, "relay", fake_relay)
    req = _FakeRequest("10.2.0.7:8080", CURL)
    server_id = Identity("cluster.local", "server", "default")
    await proxy._connect(req, SERVER, server_id, ("10.2.0.7", 15008), ("10.1.0.6", 1))  # type: ignore[arg-type]
    # Either answered 401 or cut at once (stream reset, late rejection): never relayed as an allowed connection.
    flags = {"response_flags": "DENY"}
    assert sample_value(metrics, "istio_tcp_connections_closed_total", flags) == 1, (
        f"connection let through after a DENY applied during setup: statuses={req.statuses} relayed={relayed} "
        f"resets={req.stream.resets} (expected {LATE_REJECTION} or 401)"
    )


def test_connection_to_a_workload_gone_from_the_store_still_obeys_namespace_policy() -> None:
    """ztunnel re-checks a tracked connection against the destination workload it was opened to (its
    namespace, the global policies, its selector policies); a workload that left the store must not turn
    into "no policies apply, allow"."""
    store = WorkloadStore()
    store.put([SERVER])
    registry = ConnectionRegistry(store, Metrics())
    cut: list[bool] = []
    registry.track(rbac.Connection("10.1.0.6", "10.2.0.7", 8080, CURL), SERVER.uid, "inbound", lambda: cut.append(True))
    store.apply("type.googleapis.com/istio.workload.Address", {}, [SERVER.uid])  # e.g. the pod is terminating
    assert cut == [] and len(registry) == 1
    store.put(policies=[deny(CURL.principal, "deny-curl")])  # namespace "server" now denies curl
    assert cut == [True] and len(registry) == 0
