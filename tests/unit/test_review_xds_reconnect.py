"""A controller restart while an agent holds config, over real gRPC on 127.0.0.1 (in-process): the agent keeps
serving while it is away; on resume it gets exactly what changed, including removals made meanwhile."""

from __future__ import annotations

import asyncio
import socket

from agent.state import ADDRESS_TYPE, WorkloadStore
from agent.xds import Backoff, XdsClient
from api.istio.workload import workload_pb2 as wpb
from controller.monitoring import ControllerMetrics
from controller.xds_server import XdsServer
from tests.support.xds_controller import free_port, running, wait_for


def workload(i: int, tag: str = "") -> wpb.Address:
    w = wpb.Workload(uid=f"c//Pod/demo/w{i}", name=f"w{i}", namespace="demo", canonical_name=tag)
    w.addresses.append(socket.inet_aton(f"10.0.0.{i}"))
    return wpb.Address(workload=w)


def names(store: WorkloadStore) -> dict[str, str]:
    return {w.name: w.canonical_name for w in store.all_workloads()}


async def test_restart_resumes_with_changes_and_removals_only() -> None:
    port = free_port()
    first = XdsServer(metrics=ControllerMetrics())
    first.update(ADDRESS_TYPE, {f"c//Pod/demo/w{i}": workload(i) for i in (1, 2, 3)})
    await first.serve(port)
    store = WorkloadStore()
    client = XdsClient(store, f"127.0.0.1:{port}", "n1", backoff=Backoff(0.01, 0.2))
    async with running(client):
        await asyncio.wait_for(client.ready.wait(), 20)
        await first.stop(0)
        await wait_for(lambda: client.stats["last_error"].startswith("UNAVAILABLE"), what="controller gone")
        assert names(store) == {"w1": "", "w2": "", "w3": ""}  # still serving the last config
        # Meanwhile w1 changed, w2 was deleted, w4 appeared; w3 is untouched.
        second = XdsServer(metrics=ControllerMetrics())
        second.update(
            ADDRESS_TYPE,
            {"c//Pod/demo/w1": workload(1, "v2"), "c//Pod/demo/w3": workload(3), "c//Pod/demo/w4": workload(4)},
        )
        await second.serve(port)
        try:
            await wait_for(lambda: names(store) == {"w1": "v2", "w3": "", "w4": ""}, what="resumed state")
            (conn,) = second.connections.values()
            await wait_for(lambda: conn.acks == 2, what="ACKs")
            assert conn.resources_sent == 3  # w1 and w4 sent, w2 removed; w3 not resent
        finally:
            await second.stop(0)
