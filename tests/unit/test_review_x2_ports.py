"""Port numbers above 65535 in an Address are refused at the agent's xDS boundary.

The workload API carries ports as uint32. ztunnel converts them with ``as u16`` (src/state/workload.rs: ``PortList``
service and target ports, ``GatewayAddress.hbone_mtls_port`` of waypoints and network gateways, the application
tunnel's port), which wraps: 65616 is read as 80, and traffic is sent to a port nobody configured. The agent took
them as given. Now such an Address is NACKed, naming the resource and the field, and the version held before
stays. (Ports in an Authorization's matches are malformed entries: test_review_x2_policy_entries.)
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from agent.state import ADDRESS_TYPE, WorkloadStore
from agent.xds import XdsClient, decode_response
from api.istio.workload import workload_pb2 as wpb

SVC_KEY = "demo/web.demo.svc.cluster.local"
WAYPOINT = wpb.NamespacedHostname(namespace="demo", hostname="waypoint.demo.svc.cluster.local")


def workload(port: int = 8080) -> wpb.Address:
    w = wpb.Workload(uid="c//Pod/demo/a", name="a", namespace="demo", addresses=[socket.inet_aton("10.0.0.1")])
    w.services[SVC_KEY].ports.append(wpb.Port(service_port=80, target_port=port))
    return wpb.Address(workload=w)


def service() -> wpb.Address:
    return wpb.Address(
        service=wpb.Service(
            name="web",
            namespace="demo",
            hostname="web.demo.svc.cluster.local",
            addresses=[wpb.NetworkAddress(address=socket.inet_aton("10.96.0.1"))],
            ports=[wpb.Port(service_port=80, target_port=8080)],
        )
    )


BIG = 65536 + 80  # ztunnel's `as u16` reads 80

# (field path as named in the NACK, how to build an Address with that field set to BIG)
Builder = Callable[[], wpb.Address]


def _workload_with(edit: Callable[[wpb.Workload], None]) -> Builder:
    def build() -> wpb.Address:
        addr = workload()
        edit(addr.workload)
        return addr

    return build


def _service_with(edit: Callable[[wpb.Service], None]) -> Builder:
    def build() -> wpb.Address:
        addr = service()
        edit(addr.service)
        return addr

    return build


FIELDS: list[tuple[str, Builder]] = [
    (f"workload.services[{SVC_KEY!r}].ports[0].service_port",
     _workload_with(lambda w: setattr(w.services[SVC_KEY].ports[0], "service_port", BIG))),
    (f"workload.services[{SVC_KEY!r}].ports[0].target_port",
     _workload_with(lambda w: setattr(w.services[SVC_KEY].ports[0], "target_port", BIG))),
    ("workload.waypoint.hbone_mtls_port",
     _workload_with(lambda w: w.waypoint.CopyFrom(wpb.GatewayAddress(hostname=WAYPOINT, hbone_mtls_port=BIG)))),
    ("workload.network_gateway.hbone_mtls_port",
     _workload_with(lambda w: w.network_gateway.CopyFrom(wpb.GatewayAddress(hostname=WAYPOINT,
                                                                             hbone_mtls_port=BIG)))),
    ("workload.application_tunnel.port",
     _workload_with(lambda w: w.application_tunnel.CopyFrom(wpb.ApplicationTunnel(protocol=wpb.ApplicationTunnel.PROXY,
                                                                                   port=BIG)))),
    ("service.ports[0].target_port", _service_with(lambda s: setattr(s.ports[0], "target_port", BIG))),
    ("service.ports[1].service_port", _service_with(lambda s: s.ports.append(wpb.Port(service_port=BIG)))),
    ("service.waypoint.hbone_mtls_port",
     _service_with(lambda s: s.waypoint.CopyFrom(wpb.GatewayAddress(hostname=WAYPOINT, hbone_mtls_port=BIG)))),
    ("service.weighted_waypoints[0].destination.hbone_mtls_port",
     _service_with(lambda s: s.weighted_waypoints.append(wpb.WeightedWaypoint(
         destination=wpb.GatewayAddress(hostname=WAYPOINT, hbone_mtls_port=BIG), weight=1)))),
]  # fmt: skip


def response(
    name: str, addr: wpb.Address, version: str = "v1", nonce: str = "1"
) -> discovery_pb2.DeltaDiscoveryResponse:
    return discovery_pb2.DeltaDiscoveryResponse(
        type_url=ADDRESS_TYPE,
        nonce=nonce,
        resources=[
            discovery_pb2.Resource(
                name=name,
                version=version,
                resource=any_pb2.Any(type_url=ADDRESS_TYPE, value=addr.SerializeToString()),
            )
        ],
    )


def name_of(addr: wpb.Address) -> str:
    return addr.workload.uid if addr.HasField("workload") else SVC_KEY


@pytest.mark.parametrize(("field", "build"), FIELDS, ids=[f[0] for f in FIELDS])
def test_a_port_above_65535_is_nacked_naming_resource_and_field(field: str, build: Builder) -> None:
    addr = build()
    decoded = decode_response(response(name_of(addr), addr))
    assert decoded.upserts == {}
    assert decoded.errors == [(name_of(addr), f"{field} {BIG} is not a port (above 65535)")]


def test_port_65535_is_a_port() -> None:
    decoded = decode_response(response("c//Pod/demo/a", workload(65535)))
    assert decoded.errors == [] and list(decoded.upserts) == ["c//Pod/demo/a"]


def test_the_version_held_before_stays() -> None:
    store = WorkloadStore()
    client = XdsClient(store, "127.0.0.1:1", "n1")
    assert not client.handle_response(response("c//Pod/demo/a", workload(8080))).HasField("error_detail")
    nack = client.handle_response(response("c//Pod/demo/a", workload(BIG), version="v2", nonce="2"))
    assert nack.error_detail.message == (
        f"c//Pod/demo/a: workload.services[{SVC_KEY!r}].ports[0].target_port {BIG} is not a port (above 65535)"
    )
    assert store.versions(ADDRESS_TYPE) == {"c//Pod/demo/a": "v1"}
    held = store.workload_by_uid("c//Pod/demo/a")
    assert held is not None and held.services[SVC_KEY].ports[0].target_port == 8080
