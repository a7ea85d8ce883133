"""Reviewer O: outbound routing cases compared with ztunnel's build_request / load_balance (src/proxy/outbound.rs,
src/state.rs) where Ambit's node-netns listeners make a difference."""

from __future__ import annotations

from agent.outbound import OutboundConfig, RouteKind, route
from agent.state import WorkloadStore
from api.istio.workload import workload_pb2 as wpb
from tests.unit.test_proxy_outbound import CLIENT, NODE_IP, ON_NODE, service, wl


def test_a_service_endpoint_at_this_nodes_address_on_an_agent_port_is_refused() -> None:
    """A Service whose endpoint is a host-network pod of this node (a DaemonSet's, say) with an agent port as its
    target port: the agent would dial its own listener on the node's address. `route` refuses that for the
    dialled address and `resolved` for a DNS endpoint's address; the endpoint picked behind a VIP got through
    and landed on the agent's own listener (refused there with another reason, or, on 15008, a TLS handshake
    the client never asked for). Elsewhere the same target port is a port like any other."""
    s = WorkloadStore()
    here = wl("agent-like", NODE_IP, "n1", ports={80: 15008}, hbone=False, network_mode=wpb.HOST_NETWORK)
    s.put([CLIENT, here, service("10.96.0.10", ports={80: 15008})])
    r = route(s, "n1", CLIENT, ("10.96.0.10", 80), ON_NODE)
    assert (r.kind, r.reason) == (RouteKind.REJECT, "self_call")
    assert r.service is not None and r.workload is not None and r.workload.name == "agent-like"

    elsewhere = OutboundConfig(is_node_address=lambda ip: False)  # the same endpoint seen from another node
    r = route(s, "n1", CLIENT, ("10.96.0.10", 80), elsewhere)
    assert r.kind is RouteKind.PASSTHROUGH and r.target == (NODE_IP, 15008)
