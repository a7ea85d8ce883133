"""Reconnect pacing after a stream that worked: gRPC's xDS client (gRFC A57) and Envoy (GrpcStream::onReceiveMessage)
reset the backoff once a response arrives on the stream, whatever status ends it later. ztunnel's rule alone (reset
on UNKNOWN/CANCELLED/clean end) kept a backoff grown during an earlier outage: a controller lost abruptly later
(node failure, OOM kill, keepalive timeout: UNAVAILABLE) was retried only after up to 15 s."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from agent.state import ADDRESS_TYPE, WorkloadStore
from agent.xds import Backoff, XdsClient
from tests.support.xds_controller import StreamHandler, delta_xds_server, running, wait_for


def _answer_then_fail(code: grpc.StatusCode, calls: list[int], then: bytes = b"") -> StreamHandler:
    """Each stream: one good response, then ``then`` as a second message if given, then ``code``."""

    async def handler(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        calls.append(1)
        resp = discovery_pb2.DeltaDiscoveryResponse(type_url=ADDRESS_TYPE, nonce=f"n{len(calls)}")
        await context.write(resp.SerializeToString())
        await anext(aiter(requests))  # the first initial request, so the response is read before the failure
        if then:
            await context.write(then)
            await asyncio.sleep(0.5)  # the agent ends the stream on it
        await context.abort(code, "controller lost")

    return handler


async def test_a_stream_that_delivered_a_response_resets_the_backoff_whatever_ends_it() -> None:
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAUTHENTICATED):
        calls: list[int] = []
        async with delta_xds_server(_answer_then_fail(code, calls)) as port:
            client = XdsClient(WorkloadStore(), f"127.0.0.1:{port}", "n1", backoff=Backoff(0.01, 60.0))
            client.backoff.current = 60.0  # as after an earlier outage: without a reset, no second attempt for 60 s
            async with running(client):
                await wait_for(lambda: len(calls) >= 2, what=f"a quick reconnect after {code.name}")  # noqa: B023
            assert client.stats["responses"] >= 1


async def test_a_stream_ended_on_a_response_the_agent_cannot_take_keeps_backing_off() -> None:
    """A controller that answers and then sends bytes the agent cannot decode would send them again on every new
    stream: resetting there would have each agent resume the full state every 10 ms."""
    calls: list[int] = []
    garbage = b"\x0a\xff\xff"  # field 1, a length running past the end: not a DeltaDiscoveryResponse
    async with delta_xds_server(_answer_then_fail(grpc.StatusCode.UNAVAILABLE, calls, then=garbage)) as port:
        client = XdsClient(WorkloadStore(), f"127.0.0.1:{port}", "n1", backoff=Backoff(0.01, 0.08))
        async with running(client):
            await wait_for(lambda: len(calls) >= 6, what="repeated streams")
        assert client.stats["responses"] >= 5  # each stream delivered its good response first (the last may not yet)
        assert "cannot decode" in client.stats["last_error"]
        assert client.backoff.current == 0.08
