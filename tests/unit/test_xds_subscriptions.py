"""Non-wildcard (on-demand) delta xDS subscriptions against the controller's server, over real gRPC on 127.0.0.1.

A stream that names resources gets only those, their later changes and removals; a name that does not exist is
answered as removed and delivered once it appears; ``*`` turns wildcard on and off; wildcard streams are unchanged.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import NamedTuple

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from api.istio.security import authorization_pb2 as apb
from api.istio.workload import workload_pb2 as wpb
from controller.monitoring import ControllerMetrics
from controller.xds_server import ADDRESS_TYPE, AUTHORIZATION_TYPE, ResourceTable, Subscription, XdsServer
from tests.support.xds_controller import wait_for


def workload(name: str, ip: str, sa: str = "default") -> wpb.Address:
    return wpb.Address(
        workload=wpb.Workload(
            uid=name, name=name, namespace="demo", addresses=[socket.inet_aton(ip)], service_account=sa
        )
    )


class Stream:
    """One DeltaAggregatedResources call: requests are queued, every response read is ACKed as a client must."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._requests: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest] = asyncio.Queue()

        async def requests() -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
            while True:
                yield await self._requests.get()

        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources(requests())

    def send(self, type_url: str = ADDRESS_TYPE, **fields: object) -> None:
        self._requests.put_nowait(discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, **fields))

    async def receive(self) -> discovery_pb2.DeltaDiscoveryResponse:
        resp = await asyncio.wait_for(self.call.read(), 20)  # a safety net against hanging, not a timing assert
        assert isinstance(resp, discovery_pb2.DeltaDiscoveryResponse), resp
        self.send(resp.type_url, response_nonce=resp.nonce)
        return resp


SVC = "demo/web.demo.svc.cluster.local"


def names(resp: discovery_pb2.DeltaDiscoveryResponse) -> list[str]:
    return sorted(r.name for r in resp.resources)


def address_subscription(server: XdsServer) -> Subscription:
    """The Address subscription of the only stream (for waiting until the server has read a request)."""
    (conn,) = server.connections.values()
    return conn.subscriptions[ADDRESS_TYPE]


class Env(NamedTuple):
    server: XdsServer
    channel: grpc.aio.Channel


class InitialState:
    """Served from the start, so no debounced push of it can land in the middle of a test."""

    def addresses(self) -> dict[str, wpb.Address]:
        return {"w1": workload("w1", "10.0.0.1"), "w2": workload("w2", "10.0.0.2")}

    def authorizations(self) -> dict[str, apb.Authorization]:
        return {"demo/p": apb.Authorization(name="p", namespace="demo")}


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    server = XdsServer(InitialState(), metrics=ControllerMetrics(), debounce_quiet=0.005)
    port = await server.serve(0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Env(server, channel)
    finally:
        await channel.close(grace=None)
        await server.stop(0)


async def test_ztunnel_on_demand_stream_gets_only_what_it_names(env: Env) -> None:
    server, channel = env
    wildcard, on_demand = Stream(channel), Stream(channel)
    wildcard.send()
    # ztunnel's on-demand start: '*' subscribed and unsubscribed in one request, i.e. subscribed to nothing.
    on_demand.send(resource_names_subscribe=["*"], resource_names_unsubscribe=["*"])
    assert names(await wildcard.receive()) == ["w1", "w2"]
    first = await on_demand.receive()
    assert names(first) == [] and list(first.removed_resources) == []  # answered, with nothing

    # A lookup: one name that exists, one that does not (answered as removed, as istiod does).
    on_demand.send(resource_names_subscribe=["w1", "w9"])
    resp = await on_demand.receive()
    assert names(resp) == ["w1"] and list(resp.removed_resources) == ["w9"]
    assert [c.subscriptions[ADDRESS_TYPE] for c in server.connections.values()].count(
        Subscription(wildcard=False, names={"w1", "w9"})
    ) == 1

    # A change to a resource it did not name reaches only the wildcard stream...
    server.update(ADDRESS_TYPE, {"w2": workload("w2", "10.0.0.22")})
    assert names(await wildcard.receive()) == ["w2"]
    # ...so the next thing the on-demand stream sees is the change to its own resource.
    server.update(ADDRESS_TYPE, {"w1": workload("w1", "10.0.0.11")})
    resp = await on_demand.receive()
    assert names(resp) == ["w1"] and not resp.removed_resources
    assert wpb.Address.FromString(resp.resources[0].resource.value).workload.addresses == [
        socket.inet_aton("10.0.0.11")
    ]
    assert names(await wildcard.receive()) == ["w1"]

    # The name that did not exist is delivered when it appears, and removals of named resources are sent.
    server.update(ADDRESS_TYPE, {"w9": workload("w9", "10.0.0.9"), "w3": workload("w3", "10.0.0.3")})
    assert names(await on_demand.receive()) == ["w9"]
    assert names(await wildcard.receive()) == ["w3", "w9"]
    server.update(ADDRESS_TYPE, {"w1": None})
    resp = await on_demand.receive()
    assert list(resp.removed_resources) == ["w1"] and not resp.resources


async def test_first_request_naming_resources_is_not_wildcard(env: Env) -> None:
    server, channel = env
    stream = Stream(channel)
    stream.send(resource_names_subscribe=["w2"])
    resp = await stream.receive()
    assert names(resp) == ["w2"] and not resp.removed_resources
    # Unsubscribed names get no further updates; subscribed ones do.
    stream.send(resource_names_unsubscribe=["w2"], resource_names_subscribe=["w1"])
    assert names(await stream.receive()) == ["w1"]
    server.update(ADDRESS_TYPE, {"w2": workload("w2", "10.0.0.22")})
    server.update(ADDRESS_TYPE, {"w2": None})
    server.update(ADDRESS_TYPE, {"w1": workload("w1", "10.0.0.11")})
    resp = await stream.receive()
    assert names(resp) == ["w1"] and not resp.removed_resources


async def test_subscribing_and_unsubscribing_the_wildcard(env: Env) -> None:
    server, channel = env
    stream = Stream(channel)
    stream.send(resource_names_subscribe=["w1"])
    assert names(await stream.receive()) == ["w1"]
    # Explicitly subscribing '*' makes it wildcard: everything is sent.
    stream.send(resource_names_subscribe=["*"])
    assert names(await stream.receive()) == ["w1", "w2"]
    server.update(ADDRESS_TYPE, {"w3": workload("w3", "10.0.0.3")})
    assert names(await stream.receive()) == ["w3"]
    # Unsubscribing '*' leaves wildcard mode; the explicitly subscribed name stays subscribed.
    stream.send(resource_names_unsubscribe=["*"])
    await wait_for(lambda: not address_subscription(server).wildcard, what="'*' unsubscribed")
    server.update(ADDRESS_TYPE, {"w3": workload("w3", "10.0.0.33"), "w2": workload("w2", "10.0.0.22")})
    server.update(ADDRESS_TYPE, {"w4": workload("w4", "10.0.0.4")})
    server.update(ADDRESS_TYPE, {"w1": workload("w1", "10.0.0.11")})
    assert names(await stream.receive()) == ["w1"]


async def test_reconnect_keeps_on_demand_names_from_initial_versions(env: Env) -> None:
    """ztunnel resubscribes after a reconnect only through initial_resource_versions; istiod keeps those names."""
    server, channel = env
    held = server.tables[ADDRESS_TYPE].entries["w1"].version
    stream = Stream(channel)
    stream.send(
        resource_names_subscribe=["*"],
        resource_names_unsubscribe=["*"],
        initial_resource_versions={"w1": held, "w2": "", "gone": ""},
    )
    resp = await stream.receive()
    assert names(resp) == ["w2"]  # w1 is current, w2's version is unknown to the client
    assert list(resp.removed_resources) == ["gone"]
    server.update(ADDRESS_TYPE, {"w3": workload("w3", "10.0.0.3")})
    server.update(ADDRESS_TYPE, {"w1": workload("w1", "10.0.0.11")})
    assert names(await stream.receive()) == ["w1"]


async def test_wildcard_stream_ignores_named_subscriptions(env: Env) -> None:
    """What agents use: naming a resource on a wildcard stream resends nothing; removals keep flowing."""
    server, channel = env
    stream = Stream(channel)
    stream.send()
    stream.send(AUTHORIZATION_TYPE)
    assert names(await stream.receive()) == ["w1", "w2"]
    assert names(await stream.receive()) == ["demo/p"]
    stream.send(resource_names_subscribe=["w1", "nope"])
    await wait_for(lambda: address_subscription(server).names == {"w1", "nope"}, what="names subscribed")
    assert address_subscription(server).wildcard
    server.update(ADDRESS_TYPE, {"w2": None})
    resp = await stream.receive()
    assert list(resp.removed_resources) == ["w2"] and not resp.resources


async def test_on_demand_lookup_by_network_address(env: Env) -> None:
    """ztunnel looks addresses up as ``network/IP``; istiod answers with the workload or service carrying that alias
    (under its own name, then subscribed), or with a removal when none does."""
    server, channel = env
    wl = wpb.Workload(uid="net-w", name="net-w", namespace="demo", network="net1")
    wl.addresses.append(socket.inet_pton(socket.AF_INET6, "fd00::5"))
    vip = wpb.NetworkAddress(network="net1", address=socket.inet_aton("10.96.0.1"))
    svc = wpb.Service(name="web", namespace="demo", hostname=SVC.split("/")[1], addresses=[vip])
    wildcard = Stream(channel)  # sees every push: shows when the update below has gone out
    wildcard.send()
    await wildcard.receive()
    server.update(ADDRESS_TYPE, {"net-w": wpb.Address(workload=wl), SVC: wpb.Address(service=svc)})
    assert names(await wildcard.receive()) == [SVC, "net-w"]
    stream = Stream(channel)
    stream.send(resource_names_subscribe=["*"], resource_names_unsubscribe=["*"])
    await stream.receive()
    stream.send(resource_names_subscribe=["net1/fd00::5", "net1/10.96.0.1", "/10.0.0.1", "net1/10.0.0.7"])
    resp = await stream.receive()
    # The fixture's workloads have no network: "/10.0.0.1" is w1's alias. Nothing carries "net1/10.0.0.7".
    assert names(resp) == [SVC, "net-w", "w1"]
    assert list(resp.removed_resources) == ["net1/10.0.0.7"]
    # Found resources are subscribed by name: their changes follow; a workload taking the missing address arrives.
    server.update(ADDRESS_TYPE, {"w2": workload("w2", "10.0.0.22")})
    server.update(ADDRESS_TYPE, {"w1": workload("w1", "10.0.0.1", sa="other")})
    assert names(await stream.receive()) == ["w1"]
    late = wpb.Workload(uid="late", name="late", namespace="demo", network="net1")
    late.addresses.append(socket.inet_aton("10.0.0.7"))
    server.update(ADDRESS_TYPE, {"late": wpb.Address(workload=late)})
    assert names(await stream.receive()) == ["late"]
    server.update(ADDRESS_TYPE, {"net-w": None})
    assert list((await stream.receive()).removed_resources) == ["net-w"]


def test_alias_index_follows_changes() -> None:
    table = ResourceTable(ADDRESS_TYPE)
    table.apply({"a": workload("a", "10.0.0.1")})
    assert table.resolve("/10.0.0.1") == {"a"}  # the first alias lookup builds the index
    table.apply({"a": workload("a", "10.0.0.2"), "b": workload("b", "10.0.0.1")})
    assert table.resolve("/10.0.0.1") == {"b"} and table.resolve("/10.0.0.2") == {"a"}
    table.apply({"b": None})
    assert table.resolve("/10.0.0.1") == set() and table.resolve("a") == {"a"}
    assert ResourceTable(AUTHORIZATION_TYPE).resolve("/10.0.0.1") == set()  # policies have no aliases
