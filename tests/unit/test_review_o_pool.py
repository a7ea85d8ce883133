"""Reviewer O: HboneConnectionPool cases compared with ztunnel's pool (src/proxy/pool.rs)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest

from agent import pool as pool_module
from agent.pool import HboneConnectionPool, PoolKey
from agent.tunnel import HboneConnectError, TunnelStats
from common.spiffe import Identity

SRC = Identity("cluster.local", "a", "client")
DST = Identity("cluster.local", "b", "server")
KEY = PoolKey(SRC, DST, ("10.2.0.7", 15008))


class GoneConnection:
    """A connection whose peer went away (GOAWAY, TLS alert after the handshake, close) before its opener used it."""

    peer_identity = DST
    usable = False
    active_streams = 0
    available_streams = 0

    def __init__(self) -> None:
        self.closed = asyncio.get_running_loop().create_future()
        self.closed.set_result(None)

    def set_stream_count_callback(self, cb: Any) -> None:
        pass

    async def open_stream(self, *args: Any) -> Any:
        raise HboneConnectError(503, "connection not usable", retryable=True)

    async def wait_closed(self) -> None:
        await self.closed

    def close(self) -> None:
        pass


async def test_a_connection_gone_before_its_opener_used_it_is_not_redialled_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The opener that waited for a handshake looped back for another one whenever the new connection was no longer
    usable when it woke: against a peer that refuses every connection right after the handshake (a TLS 1.3 server
    rejecting the client certificate after the client's Finished, a server sending GOAWAY at once), one user
    connection dialled without end and never failed. ztunnel hands the connection it made to its maker
    (checkout_conn_under_writelock / start_conn_if_win_writelock), whose request then fails: one new connection
    per attempt, and the pool retries a stream the peer provably did not take once."""
    dials = 0

    async def fake_connect(*args: Any, **kwargs: Any) -> GoneConnection:
        nonlocal dials
        dials += 1
        if dials > 10:
            raise RuntimeError("still dialling")
        return GoneConnection()

    monkeypatch.setattr(pool_module, "connect", fake_connect)
    p = HboneConnectionPool(stats=TunnelStats())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(HboneConnectError) as err:
        await p.open_stream(KEY, ctx, "10.2.0.7:8080", [])
    assert err.value.status == 503
    assert dials == 2, "one connection for the first attempt, one for the retry"
    await p.close()
