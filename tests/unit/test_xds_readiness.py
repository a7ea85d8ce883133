"""Agent readiness counts an xDS type only once a response of it was applied and ACKed (ztunnel's rule): a NACKed
first response keeps /healthz/ready at 503 naming the type and error, until a later response of that type applies.
State restored from disk still counts as ready, as documented."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from agent.admin import readiness_server
from agent.main import Agent, AgentConfig
from agent.state import ADDRESS_TYPE, AUTHORIZATION_TYPE, WorkloadStore
from agent.xds import STATE_FILE, XdsClient, encode_state
from api.istio.security import authorization_pb2 as apb
from api.istio.workload import workload_pb2 as wpb
from controller.monitoring import ControllerMetrics
from controller.xds_server import XdsServer
from tests.support.http_get import http_get
from tests.support.xds_controller import wait_for

GOOD, BAD = "c//Pod/demo/good", "c//Pod/demo/bad"


def workload(uid: str, ip: str, resource_name: str | None = None) -> tuple[str, wpb.Address]:
    """An Address under ``resource_name``; the agent rejects it when that differs from the workload's uid."""
    wl = wpb.Workload(uid=uid, name=uid.rsplit("/", 1)[-1], namespace="demo", addresses=[socket.inet_aton(ip)])
    return resource_name or uid, wpb.Address(workload=wl)


def response(type_url: str, nonce: str, *items: tuple[str, wpb.Address]) -> discovery_pb2.DeltaDiscoveryResponse:
    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=type_url, nonce=nonce)
    for name, msg in items:
        any_msg = any_pb2.Any(type_url=type_url, value=msg.SerializeToString())
        resp.resources.append(discovery_pb2.Resource(name=name, version=nonce, resource=any_msg))
    return resp


def test_nacked_first_response_keeps_its_type_not_ready_until_one_applies() -> None:
    client = XdsClient(WorkloadStore(), "127.0.0.1:1", "n1")
    nack = client.handle_response(
        response(ADDRESS_TYPE, "1", workload(GOOD, "10.0.0.1"), workload("c//Pod/demo/x", "10.0.0.2", BAD))
    )
    assert nack.error_detail.message.startswith(f"{BAD}: ")
    assert not client.handle_response(response(AUTHORIZATION_TYPE, "2")).HasField("error_detail")
    # Every type has been seen, but the Address response did not apply: not ready, and the reason says why.
    assert not client.ready.is_set()
    reason = client.not_ready_reason()
    assert reason.startswith("configuration from the controller rejected (Address: ")
    assert BAD in reason and "does not match workload uid" in reason
    # A later Address response that applies cleanly syncs the type.
    assert not client.handle_response(response(ADDRESS_TYPE, "3", workload(BAD, "10.0.0.2"))).HasField("error_detail")
    assert client.ready.is_set() and client.not_ready_reason() == ""
    # Readiness is about the first sync: a later NACK does not take it back (as ztunnel).
    client.handle_response(response(ADDRESS_TYPE, "4", workload("c//Pod/demo/y", "10.0.0.3", "wrong")))
    assert client.ready.is_set()


def test_nack_of_an_already_synced_type_does_not_block_the_others() -> None:
    client = XdsClient(WorkloadStore(), "127.0.0.1:1", "n1")
    client.handle_response(response(ADDRESS_TYPE, "1", workload(GOOD, "10.0.0.1")))
    client.handle_response(response(ADDRESS_TYPE, "2", workload("c//Pod/demo/x", "10.0.0.2", BAD)))
    assert client.not_ready_reason() == "waiting for the first full configuration from the controller"
    client.handle_response(response(AUTHORIZATION_TYPE, "3"))
    assert client.ready.is_set()


async def probe(port: int) -> tuple[int, str]:
    return await http_get(f"http://127.0.0.1:{port}/healthz/ready")


@contextlib.asynccontextmanager
async def agent_xds(tmp_path: Path, controller_port: int) -> AsyncIterator[tuple[Agent, int]]:
    """An agent (no capture, no listeners) whose xDS client runs against the controller, and its ready port."""
    agent = Agent(
        AgentConfig(node="n1", controller=f"127.0.0.1:{controller_port}", state_dir=str(tmp_path), capture=False)
    )
    ready = readiness_server(agent.readiness)
    await ready.start("127.0.0.1", 0)
    task = asyncio.create_task(agent.xds.run())
    try:
        yield agent, ready.port
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await ready.close()
        await agent.controller.close()


async def test_ready_probe_reports_a_rejected_first_configuration(tmp_path: Path) -> None:
    """Over real gRPC to the controller's xDS server on 127.0.0.1, through /healthz/ready."""
    server = XdsServer(metrics=ControllerMetrics(), debounce_quiet=0.005)
    server.update(ADDRESS_TYPE, dict([workload(GOOD, "10.0.0.1"), workload("c//Pod/demo/x", "10.0.0.2", BAD)]))
    server.update(AUTHORIZATION_TYPE, {"demo/p": apb.Authorization(name="p", namespace="demo")})
    port = await server.serve(0)
    try:
        async with agent_xds(tmp_path / "agent", port) as (agent, ready_port):
            await wait_for(lambda: agent.xds.stats["responses"] >= 2, what="both types answered")
            assert agent.xds.stats["nacks"] == 1
            status, body = await probe(ready_port)
            assert status == 503
            assert body.startswith("configuration from the controller rejected (Address: c//Pod/demo/bad: ")
            assert agent.store.workload_by_ip("10.0.0.1") is not None  # the valid resource still applied
            # The controller fixes the resource: the next Address response applies and the agent becomes ready.
            server.update(ADDRESS_TYPE, dict([workload(BAD, "10.0.0.2")]))
            await asyncio.wait_for(agent.xds.ready.wait(), 20)
            assert await probe(ready_port) == (200, "ready\n")
    finally:
        await server.stop(0)


async def test_restored_state_still_counts_as_ready(tmp_path: Path) -> None:
    """docs: an agent restarted while the controller is down serves its last good state, and is ready; a rejected
    first response after the controller returns does not take that away (the good state keeps serving)."""
    state_dir = tmp_path / "agent"
    state_dir.mkdir()
    (saved,) = response(ADDRESS_TYPE, "1", workload(GOOD, "10.0.0.1")).resources
    (state_dir / STATE_FILE).write_bytes(encode_state({ADDRESS_TYPE: {GOOD: saved.SerializeToString()}}))
    server = XdsServer(metrics=ControllerMetrics(), debounce_quiet=0.005)
    server.update(ADDRESS_TYPE, dict([workload(GOOD, "10.0.0.1"), workload("c//Pod/demo/x", "10.0.0.2", BAD)]))
    port = await server.serve(0)
    try:
        async with agent_xds(state_dir, port) as (agent, ready_port):
            await wait_for(lambda: agent.xds.stats["nacks"] >= 1, what="rejected response")
            assert agent.xds.restored and not agent.xds.ready.is_set()
            assert agent.store.workload_by_ip("10.0.0.1") is not None
            assert await probe(ready_port) == (200, "ready\n")
    finally:
        await server.stop(0)


async def test_a_corrupt_state_file_is_reported_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The agent restores before its listeners open; run() must not read (and refuse) the same file again."""
    (tmp_path / STATE_FILE).write_bytes(b"something else")
    client = XdsClient(WorkloadStore(), "127.0.0.1:1", "n1", state_dir=tmp_path)
    with caplog.at_level(logging.ERROR, logger="agent.xds"):
        assert not client.restore()
        task = asyncio.create_task(client.run())
        await asyncio.sleep(0.1)  # run() has started (and keeps retrying the unreachable controller)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [r.getMessage() for r in caplog.records].count("ignoring xDS state file") == 1
    await client.channel.close()
