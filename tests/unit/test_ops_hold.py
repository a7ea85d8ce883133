"""An agent with no saved state holds captured connections (unaccepted) until its first configuration, bounded by
--config-wait. Real listening sockets on 127.0.0.1 with the agent's own Listener; the agent's xDS client is never
connected (the test sets its readiness), so only the hold logic is exercised."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.main import Agent, AgentConfig
from agent.sockets import Address, Listener, transparent_listener
from tests.support.xds_controller import wait_for


@contextlib.asynccontextmanager
async def _held(tmp_path: Path, config_wait: float) -> AsyncIterator[tuple[Agent, list[Address], int]]:
    """An agent whose one listener is held by _accept_when_configured; yields the agent, what its handler saw, and
    the listener's port."""
    cfg = AgentConfig(node="n1", controller="127.0.0.1:1", state_dir=str(tmp_path), capture=False)
    cfg.config_wait = config_wait
    agent = Agent(cfg)
    seen: list[Address] = []

    async def handler(conn: socket.socket, dst: Address) -> None:
        seen.append(conn.getpeername())
        conn.close()

    sock = transparent_listener(0, "127.0.0.1", transparent=False)
    listener = Listener(sock, handler, "outbound")
    agent.listeners.append(listener)
    hold = asyncio.create_task(agent._accept_when_configured())
    try:
        yield agent, seen, sock.getsockname()[1]
    finally:
        hold.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hold
        await listener.close()
        await agent.controller.close()


async def _connect(port: int) -> socket.socket:
    """Connected as soon as the kernel completed the handshake into the backlog, accepted or not."""
    client = socket.socket()
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
    return client


async def test_connections_wait_unaccepted_until_the_first_configuration(tmp_path: Path) -> None:
    async with _held(tmp_path, config_wait=60) as (agent, seen, port):
        with await _connect(port) as client:
            for _ in range(20):  # the event loop runs the hold task many times over; nothing may accept
                await asyncio.sleep(0)
            assert seen == [] and agent.listeners[0]._loop is None, "accepted before any configuration"
            agent.xds.ready.set()
            await wait_for(lambda: seen == [client.getsockname()], what="the held connection to be handled")


async def test_past_config_wait_connections_are_accepted_without_configuration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No controller answer: after --config-wait the listeners accept (handlers then refuse and log), not hold
    connections silently forever."""
    with caplog.at_level(logging.WARNING, logger="agent"):
        async with _held(tmp_path, config_wait=0.2) as (agent, seen, port):
            with await _connect(port) as client:
                await wait_for(lambda: seen == [client.getsockname()], what="accepted after config_wait")
            assert not agent.xds.ready.is_set()
    assert "no configuration yet: accepting captured connections without it" in caplog.messages


async def test_a_drain_during_the_hold_leaves_the_closed_listeners_alone(tmp_path: Path) -> None:
    async with _held(tmp_path, config_wait=60) as (agent, _, _):
        agent.draining = True
        await agent.listeners[0].stop_accepting()
        agent.xds.ready.set()
        await wait_for(lambda: agent._reconcile_wanted.is_set(), what="the hold to end")
        assert agent.listeners[0]._loop is None, "a closed listener must not be started"
