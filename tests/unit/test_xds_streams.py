"""The xDS server over real gRPC streams on 127.0.0.1 (in-process): a stuck client does not hold others back;
the monitoring HTTP endpoints answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from agent.state import WorkloadStore
from agent.xds import XdsClient
from api.istio.workload import workload_pb2 as wpb
from common.http import Response
from controller.monitoring import ControllerMetrics, metrics_route, monitoring_server
from controller.xds_server import ADDRESS_TYPE, AUTHORIZATION_TYPE, AckEvent, XdsServer
from tests.support.xds_controller import wait_for


def workload(i: int, padding: int = 0) -> wpb.Address:
    ip = socket.inet_aton(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    name = f"c//Pod/demo/w{i}"
    return wpb.Address(workload=wpb.Workload(uid=name, name=f"w{i}", namespace="demo", addresses=[ip],
                                             canonical_name="x" * padding))  # fmt: skip


@contextlib.asynccontextmanager
async def running(coro: object) -> AsyncIterator[asyncio.Task[None]]:
    task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task


async def test_stuck_client_does_not_stall_the_others() -> None:
    server = XdsServer(metrics=ControllerMetrics(), debounce_quiet=0.01)
    # ~20 MB of state: far more than gRPC's flow-control windows, so a client that never reads blocks its stream.
    server.update(ADDRESS_TYPE, {f"c//Pod/demo/w{i}": workload(i, 2000) for i in range(10_000)})
    port = await server.serve(0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stuck_requests: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest] = asyncio.Queue()

    async def requests() -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
        while True:
            yield await stuck_requests.get()

    stuck_requests.put_nowait(discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE))
    stuck = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources(requests())
    try:
        await wait_for(lambda: len(server.connections) == 1, what="stuck client connected")
        store = WorkloadStore()
        async with running(XdsClient(store, f"127.0.0.1:{port}", "n1").run()):
            await wait_for(lambda: store.workload_by_ip("10.0.0.5") is not None, limit=60, what="full state")
            server.update(ADDRESS_TYPE, {"c//Pod/demo/w5": None})
            await wait_for(lambda: store.workload_by_ip("10.0.0.5") is None, what="update despite a stuck peer")
            stuck_conn = next(c for c in server.connections.values() if c.node_name == "")
            assert stuck_conn.pushes == 0  # its first (huge) write never completed
    finally:
        stuck.cancel()
        await channel.close(grace=None)
        await server.stop(0)


async def test_client_against_in_process_server_both_types() -> None:
    """The shape benchmarks use: XdsServer(...).serve(0) plus clients in the same or another process."""
    acks: list[AckEvent] = []
    server = XdsServer(metrics=ControllerMetrics(), on_ack=acks.append)
    server.update(ADDRESS_TYPE, {"c//Pod/demo/w1": workload(1)})
    port = await server.serve(0)
    try:
        store = WorkloadStore()
        client = XdsClient(store, f"127.0.0.1:{port}", "n1")
        async with running(client.run()):
            await asyncio.wait_for(client.ready.wait(), 20)
            await wait_for(lambda: len(acks) == 2, what="both ACKs")
            assert {a.type_url for a in acks} == {ADDRESS_TYPE, AUTHORIZATION_TYPE}
            assert all(a.error is None and a.node == "n1" and a.acked_at >= a.sent_at for a in acks)
    finally:
        await server.stop(0)


async def _http_get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_monitoring_endpoints() -> None:
    metrics = ControllerMetrics()
    metrics.config_errors.set(2)

    def broken() -> Response:
        raise ValueError("boom")

    server = monitoring_server(
        {"/metrics": metrics_route(metrics), "/debug/x": lambda: Response.json({"a": 1}), "/bad": broken}
    )
    await server.start("127.0.0.1", 0)
    port = server.port
    try:
        status, body = await _http_get(port, "/metrics")
        assert status == 200 and b"ambit_config_rejected 2.0" in body
        status, body = await _http_get(port, "/debug/x?pretty=1")
        assert status == 200 and json.loads(body) == {"a": 1}
        status, body = await _http_get(port, "/nope")
        assert status == 404 and b"/debug/x" in body
        status, body = await _http_get(port, "/bad")
        assert status == 500 and b"ValueError: boom" in body
    finally:
        await server.close()
