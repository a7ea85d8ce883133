"""Delta ADS server internals without sockets: encoding, versions, subscriptions, debounce, ACK/NACK bookkeeping."""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from api.istio.security import authorization_pb2 as apb
from api.istio.workload import workload_pb2 as wpb
from controller.monitoring import ControllerMetrics
from controller.xds_server import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    AckEvent,
    ResourceTable,
    XdsConnection,
    XdsServer,
    encode_response,
    resource_version,
)


def workload(uid: str, ip: bytes, sa: str = "default") -> wpb.Address:
    return wpb.Address(workload=wpb.Workload(uid=uid, name=uid, namespace="demo", addresses=[ip], service_account=sa))


def policy(name: str) -> apb.Authorization:
    return apb.Authorization(name=name, namespace="demo", scope=apb.NAMESPACE, action=apb.DENY)


def decode(body: bytes) -> discovery_pb2.DeltaDiscoveryResponse:
    return discovery_pb2.DeltaDiscoveryResponse.FromString(body)


def conn() -> XdsConnection:
    return XdsConnection(id="c1", peer="ipv4:127.0.0.1:1", identity=None)


def subscribe(server: XdsServer, c: XdsConnection, type_url: str, initial: dict[str, str] | None = None) -> None:
    server.handle_request(
        c, discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, initial_resource_versions=initial or {})
    )


def test_encoded_response_decodes_as_protobuf() -> None:
    table = ResourceTable(ADDRESS_TYPE)
    table.apply({"w1": workload("w1", b"\x0a\x00\x00\x01"), "w2": workload("w2", b"\x0a\x00\x00\x02")})
    body = encode_response(ADDRESS_TYPE, "n1", [e.frame for e in table.entries.values()], ["gone"], "7")
    resp = decode(body)
    assert resp.type_url == ADDRESS_TYPE and resp.nonce == "n1" and resp.system_version_info == "7"
    assert list(resp.removed_resources) == ["gone"]
    got = {r.name: (r.version, wpb.Address.FromString(r.resource.value)) for r in resp.resources}
    assert got["w1"][1] == workload("w1", b"\x0a\x00\x00\x01")
    assert got["w1"][0] == table.entries["w1"].version
    assert all(r.resource.type_url == ADDRESS_TYPE for r in resp.resources)


def test_version_is_a_content_hash() -> None:
    a, b = ResourceTable(ADDRESS_TYPE), ResourceTable(ADDRESS_TYPE)
    a.apply({"w1": workload("w1", b"\x0a\x00\x00\x01")})
    b.apply({"w1": workload("w1", b"\x0a\x00\x00\x01")})  # another controller process, same content
    assert a.entries["w1"].version == b.entries["w1"].version
    assert a.entries["w1"].version == resource_version(workload("w1", b"\x0a\x00\x00\x01").SerializeToString())
    assert a.apply({"w1": workload("w1", b"\x0a\x00\x00\x01")}) == set()  # unchanged: nothing to push
    assert a.apply({"w1": workload("w1", b"\x0a\x00\x00\x09")}) == {"w1"}
    assert a.entries["w1"].version != b.entries["w1"].version
    assert a.apply({"w1": None, "never": None}) == {"w1"}


def test_initial_response_skips_matching_versions_and_removes_unknown() -> None:
    server = XdsServer(metrics=ControllerMetrics())
    server.tables[ADDRESS_TYPE].apply(
        {"w1": workload("w1", b"\x01\x01\x01\x01"), "w2": workload("w2", b"\x02\x02\x02\x02")}
    )
    c = conn()
    subscribe(
        server, c, ADDRESS_TYPE, {"w1": server.tables[ADDRESS_TYPE].entries["w1"].version, "w2": "old", "w3": "x"}
    )
    assert c.wake.is_set()
    built = server.build_pending(c, ADDRESS_TYPE)
    assert built is not None
    resp = decode(built[0])
    assert [r.name for r in resp.resources] == ["w2"]
    assert list(resp.removed_resources) == ["w3"]
    assert server.build_pending(c, ADDRESS_TYPE) is None


def test_empty_state_still_answers_the_initial_request() -> None:
    server = XdsServer(metrics=ControllerMetrics())
    c = conn()
    subscribe(server, c, AUTHORIZATION_TYPE)
    built = server.build_pending(c, AUTHORIZATION_TYPE)
    assert built is not None and decode(built[0]).type_url == AUTHORIZATION_TYPE
    assert len(decode(built[0]).resources) == 0


async def test_burst_is_debounced_into_one_incremental_push() -> None:
    server = XdsServer(metrics=ControllerMetrics(), debounce_quiet=0.05, debounce_max=5.0)
    c = conn()
    server.connections[c.id] = c
    subscribe(server, c, ADDRESS_TYPE)
    subscribe(server, c, AUTHORIZATION_TYPE)
    server.build_pending(c, ADDRESS_TYPE)
    server.build_pending(c, AUTHORIZATION_TYPE)
    c.wake.clear()
    server.update(ADDRESS_TYPE, {"w1": workload("w1", b"\x01\x01\x01\x01")})
    server.update(ADDRESS_TYPE, {"w2": workload("w2", b"\x02\x02\x02\x02")})
    server.update(AUTHORIZATION_TYPE, {"demo/p": policy("p")})
    assert not c.wake.is_set()  # still inside the quiet period
    await asyncio.wait_for(c.wake.wait(), 5)
    addr = server.build_pending(c, ADDRESS_TYPE)
    authz = server.build_pending(c, AUTHORIZATION_TYPE)
    assert addr is not None and authz is not None
    assert sorted(r.name for r in decode(addr[0]).resources) == ["w1", "w2"]
    assert [r.name for r in decode(authz[0]).resources] == ["demo/p"]
    c.wake.clear()
    server.update(ADDRESS_TYPE, {"w1": None})
    await asyncio.wait_for(c.wake.wait(), 5)
    built = server.build_pending(c, ADDRESS_TYPE)
    assert built is not None
    resp = decode(built[0])
    assert list(resp.removed_resources) == ["w1"] and len(resp.resources) == 0


async def test_debounce_max_bounds_a_continuous_stream_of_changes() -> None:
    server = XdsServer(metrics=ControllerMetrics(), debounce_quiet=0.2, debounce_max=0.3)
    c = conn()
    server.connections[c.id] = c
    subscribe(server, c, ADDRESS_TYPE)
    server.build_pending(c, ADDRESS_TYPE)
    c.wake.clear()
    for i in range(40):  # a change every 50 ms never leaves a 200 ms quiet gap
        server.update(ADDRESS_TYPE, {f"w{i}": workload(f"w{i}", bytes([10, 0, 0, i]))})
        if c.wake.is_set():
            break
        await asyncio.sleep(0.05)
    assert c.wake.is_set()
    assert i < 39


async def test_connection_waiting_for_full_response_is_not_marked_dirty() -> None:
    server = XdsServer(metrics=ControllerMetrics(), debounce_quiet=0.01)
    c = conn()
    server.connections[c.id] = c
    server.update(ADDRESS_TYPE, {"w1": workload("w1", b"\x01\x01\x01\x01")})
    subscribe(server, c, ADDRESS_TYPE)
    await asyncio.sleep(0.1)  # the flush happens while the full response is pending
    built = server.build_pending(c, ADDRESS_TYPE)
    assert built is not None and [r.name for r in decode(built[0]).resources] == ["w1"]
    assert server.build_pending(c, ADDRESS_TYPE) is None  # no duplicate incremental push


def test_ack_and_nack_bookkeeping() -> None:
    events: list[AckEvent] = []
    metrics = ControllerMetrics()
    server = XdsServer(metrics=metrics, on_ack=events.append)
    server.tables[ADDRESS_TYPE].apply({"w1": workload("w1", b"\x01\x01\x01\x01")})
    c = conn()
    node = base_pb2.Node(id="ztunnel~1.2.3.4~x")
    node.metadata.update({"NODE_NAME": "node1"})
    server.handle_request(c, discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE, node=node))
    assert c.node_name == "node1"
    first = server.build_pending(c, ADDRESS_TYPE)
    assert first is not None
    nonce = decode(first[0]).nonce
    server.handle_request(c, discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE, response_nonce=nonce))
    assert c.acks == 1 and c.nacks == 0 and events[-1].error is None and events[-1].nonce == nonce
    server.tables[ADDRESS_TYPE].apply({"w2": workload("w2", b"\x02\x02\x02\x02")})
    c.dirty[ADDRESS_TYPE] = {"w2"}
    c.dirty_since[ADDRESS_TYPE] = 0.0
    second = server.build_pending(c, ADDRESS_TYPE)
    assert second is not None
    nack = discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE, response_nonce=decode(second[0]).nonce)
    nack.error_detail.code = 3
    nack.error_detail.message = "w2: bad address"
    server.handle_request(c, nack)
    assert c.nacks == 1 and c.last_nack == "w2: bad address"
    assert events[-1].error == "w2: bad address"
    assert metrics.xds_rejects.labels("address")._value.get() == 1
    assert not c.dirty and not c.full  # a NACK schedules no re-push
    # A subscription change on a wildcard stream asks for nothing new.
    c.wake.clear()
    server.handle_request(c, discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE, resource_names_subscribe=["x"]))
    assert not c.wake.is_set()


def test_unknown_type_is_ignored() -> None:
    server = XdsServer(metrics=ControllerMetrics())
    c = conn()
    server.handle_request(c, discovery_pb2.DeltaDiscoveryRequest(type_url="type.googleapis.com/envoy.Cluster"))
    assert not c.subscribed and not c.wake.is_set()


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16384, 2**21])
def test_frames_survive_any_length(n: int) -> None:
    table = ResourceTable(ADDRESS_TYPE)
    table.apply({"w": wpb.Address(workload=wpb.Workload(uid="w", name="x" * n, addresses=[b"\x01\x02\x03\x04"]))})
    entry = table.entries["w"]
    resp = decode(encode_response(ADDRESS_TYPE, "1", [entry.frame], []))
    assert wpb.Address.FromString(resp.resources[0].resource.value).workload.name == "x" * n
