"""HBONE over mutual TLS on asyncio: client and server connections, streams, and the TCP <-> stream relay.

INTERFACE STUB (HBONE engineer): the names and signatures below are what PROXY codes against; bodies follow.

Protocol-based (not StreamReader) so that the DATA path is a chain of callbacks: TLS decrypts into our buffer,
:mod:`agent.hbone` slices DATA payloads out of it, and the slices go straight to the plain TCP transport.
"""

from __future__ import annotations

import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from common.spiffe import Identity


class HboneConnectError(Exception):
    """Opening a tunnel stream failed.

    ``status`` is the HTTP status the peer answered (400 bad request / address mismatch, 401 denied by policy,
    503 upstream unreachable) or 503 when we never got an answer (connect refused, TLS failure, peer identity
    not the expected one, connection lost before the response).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HBONE CONNECT failed: {status} {reason}")
        self.status = status
        self.reason = reason


class HboneStreamReset(Exception):
    """The peer reset the stream (RST_STREAM) or the connection carrying it went away."""


@dataclass(slots=True)
class TunnelConfig:
    """Per-connection knobs; defaults follow ztunnel (reference/istio-ambient.md 1.5)."""

    stream_window: int = 4 * 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    max_frame_size: int = 1024 * 1024
    max_concurrent_streams: int = 200
    max_header_list_size: int = 64 * 1024
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 20.0
    handshake_timeout: float = 10.0
    connect_timeout: float = 5.0


@dataclass
class TunnelStats:
    """Counters PROXY's metrics can read: ``rejects[reason]`` counts refused connections/streams by reason
    ("tls_handshake", "no_client_cert", "untrusted_peer", "trust_domain", "protocol_error", "bad_request",
    "header_too_large", "refused_stream", "keepalive_timeout", ...)."""

    rejects: Counter[str] = field(default_factory=Counter)
    connections_opened: int = 0
    connections_closed: int = 0
    streams_opened: int = 0
    streams_closed: int = 0


STATS = TunnelStats()
"""Process-wide default counters, used when no ``stats`` is passed."""


class HboneStream:
    """One CONNECT stream: a bidirectional byte stream with half-close.

    The async methods are for control code and tests; :func:`relay` uses the callback fast path internally.
    """

    stream_id: int
    peer_identity: Identity | None

    async def read(self, max_bytes: int = 256 * 1024) -> bytes:
        """Up to ``max_bytes`` received bytes; ``b""`` after the peer's END_STREAM. Raises HboneStreamReset."""
        raise NotImplementedError

    async def write(self, data: bytes) -> None:
        """Send ``data``, waiting for flow-control window and TLS write back-pressure. Raises HboneStreamReset."""
        raise NotImplementedError

    def write_eof(self) -> None:
        """Half-close: END_STREAM; we can still read."""
        raise NotImplementedError

    def reset(self) -> None:
        """Abort the stream (RST_STREAM CANCEL); idempotent."""
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class RelayResult:
    """Bytes moved by :func:`relay`: up = TCP -> tunnel, down = tunnel -> TCP; ``error`` when it did not end cleanly."""

    bytes_up: int
    bytes_down: int
    error: str | None = None


async def relay(sock: socket.socket, stream: HboneStream) -> RelayResult:
    """Move bytes both ways between a connected plain TCP socket and ``stream`` until both directions ended.

    TCP FIN becomes END_STREAM and END_STREAM becomes shutdown(SHUT_WR); a reset on either side aborts both.
    Back-pressure: TCP reading pauses while the stream has no send window or TLS writing is paused, and stream
    credit is returned only as the TCP side drains. Takes ownership of ``sock`` (closed at the end). Cancelling
    the task (e.g. a policy change) resets the stream and closes the socket.
    """
    raise NotImplementedError


class HboneClientConnection:
    """A client HBONE connection (TLS + HTTP/2) multiplexing CONNECT streams; created by :func:`connect`."""

    peer_identity: Identity

    async def open_stream(self, authority: str, headers: list[tuple[str, str]]) -> HboneStream:
        """Send CONNECT and wait for the response; non-200 raises HboneConnectError(status)."""
        raise NotImplementedError

    @property
    def active_streams(self) -> int:
        raise NotImplementedError

    @property
    def usable(self) -> bool:
        """False once GOAWAY was received/sent or the connection closed: open no new streams on it."""
        raise NotImplementedError

    def close(self) -> None:
        """GOAWAY(NO_ERROR) and close the transport (open streams are reset)."""
        raise NotImplementedError

    async def wait_closed(self) -> None:
        raise NotImplementedError


async def connect(
    addr: tuple[str, int],
    ssl_context: ssl.SSLContext,
    expected: Identity,
    *,
    config: TunnelConfig | None = None,
    stats: TunnelStats | None = None,
) -> HboneClientConnection:
    """TCP connect + TLS (no SNI) + SPIFFE check of the server against ``expected`` (and its trust domain).

    Raises HboneConnectError(503, reason) on refusal, timeout, TLS failure or wrong identity.
    """
    raise NotImplementedError


class ConnectRequest:
    """A CONNECT received on the server side, handed to the handler of :func:`serve_hbone_connection`."""

    authority: str
    headers: list[tuple[str, str]]  # regular headers (forwarded, baggage, traceparent, ...), names lowercase
    peer_identity: Identity
    stream_id: int

    async def respond(self, status: int, headers: list[tuple[str, str]] | None = None) -> None:
        """Answer the CONNECT. 200 opens the tunnel (then use :attr:`stream`); any other status ends the stream."""
        raise NotImplementedError

    @property
    def stream(self) -> HboneStream:
        """The tunnel stream; only valid after ``respond(200)``."""
        raise NotImplementedError


async def serve_hbone_connection(
    sock: socket.socket,
    ssl_context: ssl.SSLContext,
    handler: Callable[[ConnectRequest], Awaitable[None]],
    *,
    trust_domain: str | None,
    config: TunnelConfig | None = None,
    stats: TunnelStats | None = None,
) -> None:
    """Serve one accepted TCP connection as an HBONE server until it closes.

    Does the TLS handshake (client certificate required by ``ssl_context``), checks the client's SPIFFE identity
    is in ``trust_domain``, then runs ``handler(req)`` as a task per valid CONNECT. Non-CONNECT requests get 400,
    protocol errors GOAWAY; every refusal is counted in ``stats.rejects``. A handler that returns or raises
    without responding makes the stream answer 503. Takes ownership of ``sock``; never raises on peer input.
    """
    raise NotImplementedError
