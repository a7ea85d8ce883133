"""Pool of client HBONE connections, keyed like ztunnel's (source identity, destination identity, address).

INTERFACE STUB (HBONE engineer): names and signatures are final; bodies follow.

A Python mTLS handshake costs 3-6 ms of CPU, so user connections must become streams on pooled connections;
concurrent openers for one key share a single handshake instead of stampeding.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from agent.tunnel import HboneStream, TunnelConfig, TunnelStats
from common.spiffe import Identity


@dataclass(frozen=True, slots=True)
class PoolKey:
    src: Identity
    dst: Identity
    addr: tuple[str, int]


class HboneConnectionPool:
    """Opens CONNECT streams on pooled connections; a new connection is made when all are full or unusable."""

    def __init__(
        self,
        max_streams_per_conn: int = 100,
        idle_timeout: float = 300.0,
        *,
        config: TunnelConfig | None = None,
        stats: TunnelStats | None = None,
    ) -> None:
        raise NotImplementedError

    async def open_stream(
        self,
        key: PoolKey,
        ssl_context: ssl.SSLContext,
        authority: str,
        headers: list[tuple[str, str]],
    ) -> HboneStream:
        """A CONNECT stream to ``key.addr`` whose server proved to be ``key.dst``.

        ``ssl_context`` is the client context of ``key.src`` (CertificateManager.client_context). Raises
        HboneConnectError: the peer's status (400/401/503), or 503 for connect/TLS/identity failures.
        """
        raise NotImplementedError

    def connection_count(self) -> int:
        raise NotImplementedError

    def stream_count(self) -> int:
        raise NotImplementedError

    def snapshot(self) -> list[dict[str, object]]:
        """Per connection: key, active streams, age, idle time (for /config_dump style debugging)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close every pooled connection (agent shutdown)."""
        raise NotImplementedError
