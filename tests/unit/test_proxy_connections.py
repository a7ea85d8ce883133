"""agent.connections.ConnectionRegistry: a store change re-checks tracked connections and cuts only the
ones current policy denies."""

from __future__ import annotations

import functools
import ipaddress

from agent import rbac
from agent.accesslog import AccessLog
from agent.connections import LATE_REJECTION, ConnectionRegistry
from agent.metrics import Metrics, sample_value
from agent.state import WorkloadStore
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


def test_policy_change_cuts_only_denied_connections() -> None:
    store = WorkloadStore()
    store.put([SERVER])
    metrics = Metrics()
    registry = ConnectionRegistry(store, metrics)
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
    store = WorkloadStore()
    store.put([SERVER])
    registry = ConnectionRegistry(store, Metrics())
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
