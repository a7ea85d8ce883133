"""Established connections re-checked when policy arrives over xDS (the XdsClient, the store and the registry
together, as in the agent): Istio's PolicyWatcher closes what the new policy set no longer allows
(AuthorizationPolicyLateRejection, reference 1.2 "Policy re-evaluation"), for additions, changes and removals
alike, a dry-run policy never cuts, and a workload's own update re-checks it against its new namespace/selectors."""

from __future__ import annotations

import functools
import ipaddress

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from agent import rbac
from agent.connections import ConnectionRegistry
from agent.metrics import Metrics
from agent.state import ADDRESS_TYPE, AUTHORIZATION_TYPE, WorkloadStore
from agent.xds import XdsClient
from api.istio.security import authorization_pb2 as apb
from api.istio.workload import workload_pb2 as wpb
from common.spiffe import Identity

SLEEP = Identity("cluster.local", "client", "sleep")
UID = "Kubernetes//Pod/server/echo-1"


def server(namespace: str = "server", selectors: tuple[str, ...] = ()) -> wpb.Workload:
    return wpb.Workload(
        uid=UID,
        name="echo-1",
        namespace=namespace,
        addresses=[ipaddress.ip_address("10.2.0.7").packed],
        tunnel_protocol=wpb.HBONE,
        authorization_policies=list(selectors),
    )


def policy(name: str, action: int, port: int, scope: int = apb.NAMESPACE, dry_run: bool = False) -> apb.Authorization:
    return apb.Authorization(
        name=name,
        namespace="server",
        scope=scope,  # type: ignore[arg-type]
        action=action,  # type: ignore[arg-type]
        dry_run=dry_run,
        groups=[apb.Group(rules=[apb.Rules(matches=[apb.Match(destination_ports=[port])])])],
    )


def policies(*ps: apb.Authorization, removed: tuple[str, ...] = ()) -> discovery_pb2.DeltaDiscoveryResponse:
    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=AUTHORIZATION_TYPE, nonce="n", removed_resources=removed)
    for p in ps:
        resp.resources.add(
            name=f"{p.namespace}/{p.name}",
            version=str(hash(p.SerializeToString())),
            resource=any_pb2.Any(type_url=AUTHORIZATION_TYPE, value=p.SerializeToString()),
        )
    return resp


def workload(w: wpb.Workload) -> discovery_pb2.DeltaDiscoveryResponse:
    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE, nonce="a")
    resp.resources.add(
        name=w.uid,
        version=str(hash(w.SerializeToString())),
        resource=any_pb2.Any(type_url=ADDRESS_TYPE, value=wpb.Address(workload=w).SerializeToString()),
    )
    return resp


class Agent:
    def __init__(self) -> None:
        self.store = WorkloadStore()
        self.xds = XdsClient(self.store, "127.0.0.1:1", "n2")
        self.registry = ConnectionRegistry(self.store, Metrics())
        self.cut: list[str] = []
        self.xds.handle_response(workload(server()))

    def connect(self, port: int) -> rbac.Decision:
        conn = rbac.Connection("10.1.0.5", "10.2.0.7", port, SLEEP)
        wl = self.store.workload_by_uid(UID)
        assert wl is not None
        decision = rbac.evaluate(self.store.policies_for(wl), conn)
        if decision.allowed:
            self.registry.track(conn, UID, "inbound", functools.partial(self.cut.append, str(port)))
        return decision


def test_adding_changing_and_removing_policies_cut_what_they_no_longer_allow() -> None:
    agent = Agent()
    assert agent.connect(80).allowed and agent.connect(8080).allowed and agent.connect(9090).allowed
    # An ALLOW for 80 and one for 8080: 9090 is now allowed by none.
    agent.xds.handle_response(policies(policy("a80", apb.ALLOW, 80), policy("a8080", apb.ALLOW, 8080)))
    assert agent.cut == ["9090"]
    # The 8080 ALLOW removed: 8080 is allowed by no remaining ALLOW.
    agent.xds.handle_response(policies(removed=("server/a8080",)))
    assert agent.cut == ["9090", "8080"]
    # A dry-run DENY on 80 cuts nothing; enforced, it does.
    agent.xds.handle_response(policies(policy("d80", apb.DENY, 80, dry_run=True)))
    assert agent.cut == ["9090", "8080"]
    agent.xds.handle_response(policies(policy("d80", apb.DENY, 80)))
    assert agent.cut == ["9090", "8080", "80"]
    assert len(agent.registry) == 0


def test_a_workload_update_rechecks_against_its_new_selectors_and_namespace() -> None:
    agent = Agent()
    agent.xds.handle_response(policies(policy("sel", apb.DENY, 80, scope=apb.WORKLOAD_SELECTOR)))
    assert agent.connect(80).allowed and agent.connect(8080).allowed  # the selector policy names no one yet
    agent.xds.handle_response(workload(server(selectors=("server/sel",))))
    assert agent.cut == ["80"]
    # Namespace policies follow the workload's namespace.
    agent.xds.handle_response(policies(policy("ns-allow-80", apb.ALLOW, 80)))
    assert agent.cut == ["80", "8080"]
    agent = Agent()
    agent.xds.handle_response(workload(server(namespace="elsewhere")))
    agent.xds.handle_response(policies(policy("ns-allow-80", apb.ALLOW, 80)))
    assert agent.connect(8080).allowed  # the "server" namespace's ALLOW does not apply in "elsewhere"
    agent.xds.handle_response(workload(server(namespace="server")))
    assert agent.cut == ["8080"]
