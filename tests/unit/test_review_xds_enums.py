"""Enum values this agent does not know (a newer controller or istiod) are refused at the xDS boundary, as ztunnel
refuses them (``Action::try_from``, ``Scope::try_from``, ``TunnelProtocol::try_from``, ``NetworkMode::try_from``):
proto3 keeps unknown values as plain integers, and the data path read an unknown action as ALLOW (turning default
allow into default deny for the workloads it selects) and an unknown scope as a selector policy."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from agent.state import ADDRESS_TYPE, AUTHORIZATION_TYPE, WorkloadStore
from agent.xds import XdsClient, decode_response
from api.istio.security import authorization_pb2 as apb
from api.istio.workload import workload_pb2 as wpb


def resource(name: str, msg: object, type_url: str, version: str) -> discovery_pb2.Resource:
    value = msg.SerializeToString()  # type: ignore[attr-defined]
    return discovery_pb2.Resource(name=name, version=version, resource=any_pb2.Any(type_url=type_url, value=value))


def policy(action: int = apb.DENY, scope: int = apb.NAMESPACE) -> apb.Authorization:
    rules = [apb.Rules(matches=[apb.Match(destination_ports=[80])])]
    return apb.Authorization(name="p", namespace="demo", scope=scope, action=action, groups=[apb.Group(rules=rules)])  # type: ignore[arg-type]


def workload(protocol: int = wpb.HBONE, mode: int = wpb.STANDARD) -> wpb.Address:
    w = wpb.Workload(uid="c//Pod/demo/a", name="a", namespace="demo", addresses=[bytes([10, 0, 0, 1])])
    w.tunnel_protocol = protocol  # type: ignore[assignment]
    w.network_mode = mode  # type: ignore[assignment]
    return wpb.Address(workload=w)


def test_unknown_policy_action_and_scope_are_refused_and_the_last_good_version_kept() -> None:
    store = WorkloadStore()
    client = XdsClient(store, "127.0.0.1:1", "n1")
    ack = client.handle_response(
        discovery_pb2.DeltaDiscoveryResponse(
            type_url=AUTHORIZATION_TYPE, nonce="1", resources=[resource("demo/p", policy(), AUTHORIZATION_TYPE, "1")]
        )
    )
    assert not ack.HasField("error_detail")
    for bad in (policy(action=7), policy(scope=9)):
        ack = client.handle_response(
            discovery_pb2.DeltaDiscoveryResponse(
                type_url=AUTHORIZATION_TYPE, nonce="2", resources=[resource("demo/p", bad, AUTHORIZATION_TYPE, "2")]
            )
        )
        assert ack.error_detail.message.startswith("demo/p: "), ack.error_detail.message
        (held,) = store.all_policies()
        assert held.action == apb.DENY and held.scope == apb.NAMESPACE  # the last good version still enforces
    bad = resource("demo/p", policy(action=7), AUTHORIZATION_TYPE, "3")
    decoded = decode_response(discovery_pb2.DeltaDiscoveryResponse(type_url=AUTHORIZATION_TYPE, resources=[bad]))
    assert decoded.errors == [("demo/p", "action 7 is not one of ALLOW, DENY")]


def test_unknown_workload_tunnel_protocol_and_network_mode_are_refused() -> None:
    for bad, words in ((workload(protocol=5), "tunnel_protocol 5"), (workload(mode=4), "network_mode 4")):
        decoded = decode_response(
            discovery_pb2.DeltaDiscoveryResponse(
                type_url=ADDRESS_TYPE, resources=[resource("c//Pod/demo/a", bad, ADDRESS_TYPE, "1")]
            )
        )
        assert not decoded.upserts and words in decoded.errors[0][1], decoded.errors
    ok = decode_response(
        discovery_pb2.DeltaDiscoveryResponse(
            type_url=ADDRESS_TYPE,
            resources=[resource("c//Pod/demo/a", workload(protocol=wpb.LEGACY_ISTIO_MTLS), ADDRESS_TYPE, "1")],
        )
    )
    assert not ok.errors and ok.upserts  # known values still pass
