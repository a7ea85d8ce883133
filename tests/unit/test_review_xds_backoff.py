"""The agent's reconnect pacing: jittered so a fleet restarted together does not reconnect in lockstep, and never a
hot loop against a controller that ends every stream before answering it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc

from agent.state import WorkloadStore
from agent.xds import Backoff, XdsClient
from controller.monitoring import ControllerMetrics
from controller.xds_server import XdsServer
from tests.support.xds_controller import StreamHandler, delta_xds_server, running, wait_for


def test_delays_are_jittered_around_the_doubling_and_capped() -> None:
    b = Backoff(rng=random.Random(1))
    delays = [b.next_delay() for _ in range(20)]
    for i, d in enumerate(delays):
        nominal = min(15.0, 0.01 * 2**i)
        assert nominal * 0.8 <= d <= min(15.0, nominal * 1.2), (i, d)
    assert delays != [min(15.0, 0.01 * 2**i) for i in range(20)]  # not the bare doubling
    b.reset()
    assert 0.008 <= b.next_delay() <= 0.012


def test_agents_started_together_disperse() -> None:
    """Every agent of a node pool sees the controller go at the same instant: their retries must spread."""
    fleet = [Backoff(rng=random.Random(seed)) for seed in range(50)]
    for _ in range(6):
        delays = [b.next_delay() for b in fleet]
    assert len({round(d, 6) for d in delays}) > 40


def _abort_every_stream(code: grpc.StatusCode, calls: list[int]) -> StreamHandler:
    async def handler(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        calls.append(1)
        if code != grpc.StatusCode.OK:  # OK: the handler returns at once, a clean end of stream
            await context.abort(code, "broken controller")

    return handler


async def test_streams_ended_before_any_response_back_off() -> None:
    """UNKNOWN, CANCELLED and a clean end reset ztunnel's backoff: right after a working stream (the controller
    went away on purpose) that is a quick resume, but a controller that ends every stream at once (a failing
    handler, a proxy in front answering UNKNOWN) had every agent reconnect each 10 ms, each time asking for the
    full state. Without a response on the stream, the backoff keeps growing."""
    for code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED, grpc.StatusCode.OK):
        calls: list[int] = []
        async with delta_xds_server(_abort_every_stream(code, calls)) as port:
            client = XdsClient(WorkloadStore(), f"127.0.0.1:{port}", "n1", backoff=Backoff(0.01, 0.08))
            async with running(client):
                await wait_for(lambda: len(calls) >= 6, what="repeated streams")  # noqa: B023
            assert client.backoff.current == 0.08, (code, client.backoff.current)


async def test_a_stream_that_delivered_config_resets_the_backoff() -> None:
    server = XdsServer(metrics=ControllerMetrics())
    port = await server.serve(0)
    try:
        client = XdsClient(WorkloadStore(), f"127.0.0.1:{port}", "n1", backoff=Backoff(0.01, 60.0))
        client.backoff.current = 60.0  # as after a long outage: without a reset, no second attempt for a minute
        async with running(client):
            await asyncio.wait_for(client.ready.wait(), 20)
            conn = next(iter(server.connections.values()))
            conn.closed = True  # the controller ends the stream (status OK), as on a graceful shutdown
            conn.wake.set()
            await wait_for(lambda: client.stats["attempts"] >= 2, what="quick reconnect")
    finally:
        await server.stop(0)
