"""Pool of client HBONE connections, keyed like ztunnel's WorkloadKey (source identity, the source pod's address,
destination identities, address): a connection leaves from its client pod's address, which the peer judges.

A Python mTLS handshake costs 3-6 ms of CPU, so user connections must become streams on pooled connections;
concurrent openers for one key share a single handshake instead of stampeding, a connection takes at most
``max_streams_per_conn`` streams (then another is opened), and connections idle for ``idle_timeout`` are closed.
A source identity keeps at most ``max_connections_per_source`` pooled connections (500, ztunnel's pool per workload);
over it the least recently used one is retired.

A connection speaks with the certificate and trusts the roots its TLS context had at the handshake. When the source
identity's certificate is renewed or the trust bundle changes, the caller's context changes (CertificateManager
hands out one context per certificate and bundle), and connections made with an older one take no new streams:
they are retired, closing with their last stream. Otherwise a busy pooled connection, never idle, would go on
presenting a certificate past its renewal, past its expiry even (TLS checks it once), and trusting a root the mesh
has since retired. Which context is current is the order the pool first saw them in: callers take the context
from CertificateManager right before they ask (no await in between), so a later context is a newer certificate. A
caller still holding a replaced one (it waited on a handshake across the renewal, or retries) uses the connections
made with the current one rather than retiring them and dialling with its old certificate again; ztunnel's pool
has no such caller context at all: each new connection fetches the current certificate (src/proxy/pool.rs
ConnSpawner::new_pool_conn), whoever asked for it.

A stream the peer refused (RST_STREAM REFUSED_STREAM, or above the last-stream-id of its GOAWAY) was provably not
processed and is retried once, on another connection: the refusing one takes no new streams (it is retired, as
ztunnel's checkout drops a connection that is no longer ready_to_use and makes a new one), so the retry cannot land
on the connection that just refused it. A refusal over the peer's MAX_CONCURRENT_STREAMS (lowered while the stream
was on its way, RFC 9113 5.1.2) only shows the connection full: it stays pooled for when its streams end.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import ssl
import time
import weakref
from dataclasses import dataclass

from agent.sockets import Dial, connect_upstream
from agent.tunnel import (
    STATS,
    ConnectStage,
    HboneClientConnection,
    HboneConnectError,
    HboneStream,
    TunnelConfig,
    TunnelStats,
    connect,
)
from common.log import kv
from common.spiffe import Identity

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PoolKey:
    """Connections are shared only by requests that would accept the same servers: a connection verified against
    a service's `subject_alt_names` may have proved one of those rather than ``dst``, so ``also`` is part of the key
    (ztunnel's WorkloadKey holds the whole list of acceptable identities)."""

    src: Identity
    dst: Identity  # the destination workload's identity
    addr: tuple[str, int]
    also: frozenset[Identity] = frozenset()  # other identities the server may prove instead (service SANs)
    # The client pod's address, which the connection leaves from (None: the node's). Part of ztunnel's WorkloadKey
    # too: the peer judges the client by the TCP source (ipBlocks, source_workload), so pods of one identity do not
    # share a connection.
    source: str | None = None

    def __post_init__(self) -> None:
        if self.dst in self.also:  # SANs naming the workload itself: the same set as none, so the same connections
            object.__setattr__(self, "also", self.also - {self.dst})

    @property
    def accepted(self) -> frozenset[Identity]:
        return self.also | {self.dst}


class _Pooled:
    """A pooled connection plus the bookkeeping for idle release."""

    __slots__ = ("conn", "context", "created", "idle_handle", "idle_since", "key", "retired", "used")

    def __init__(self, key: PoolKey, conn: HboneClientConnection, context: ssl.SSLContext) -> None:
        self.key = key
        self.conn = conn
        self.context = context  # the source's TLS context at the handshake (its certificate, the roots it trusts)
        self.retired = False  # out of the pool (context replaced, or it refused a stream); closes with its last stream
        self.created = time.monotonic()
        self.idle_since: float | None = time.monotonic()
        self.idle_handle: asyncio.TimerHandle | None = None
        # The source's pooled connections, least recently used first (the one this belongs to while pooled).
        self.used: dict[_Pooled, None] | None = None


class HboneConnectionPool:
    """Opens CONNECT streams on pooled connections; a new connection is made when all are full or unusable."""

    close_timeout = 2.0  # how long close() lets connections end gracefully before aborting the rest

    def __init__(
        self,
        max_streams_per_conn: int = 100,
        idle_timeout: float = 300.0,
        *,
        max_connections_per_source: int = 500,
        config: TunnelConfig | None = None,
        stats: TunnelStats | None = None,
        dial: Dial = connect_upstream,
    ) -> None:
        if max_streams_per_conn < 1 or max_connections_per_source < 1:
            raise ValueError("max_streams_per_conn and max_connections_per_source must be >= 1")
        self.max_streams_per_conn = max_streams_per_conn
        # As ztunnel's pool per workload (pingora_pool::ConnectionPool::new(500), an LRU): over it, the source's
        # least recently used connection is retired. Without a bound, a pod fanning out to thousands of
        # destinations more often than the idle timeout kept a connection open to each for good.
        self.max_connections_per_source = max_connections_per_source
        self.idle_timeout = idle_timeout
        self.config = config or TunnelConfig()
        self.stats = stats or STATS
        self.dial = dial
        self._conns: dict[PoolKey, list[_Pooled]] = {}
        # The handshake under way for a key, with the context it uses (one per key: openers share it).
        self._connecting: dict[PoolKey, tuple[ssl.SSLContext, asyncio.Task[_Pooled]]] = {}
        self._retired: set[_Pooled] = set()  # out of the pool, still carrying streams
        self._used: dict[Identity, dict[_Pooled, None]] = {}  # per source, least recently used first
        # Contexts in the order first seen (a later one is a renewal), and the latest per source identity; weak,
        # so a context nothing uses any more (the certificate manager replaced it, its connections closed) goes.
        self._seen: weakref.WeakKeyDictionary[ssl.SSLContext, int] = weakref.WeakKeyDictionary()
        self._order = itertools.count()
        self._newest: weakref.WeakValueDictionary[Identity, ssl.SSLContext] = weakref.WeakValueDictionary()
        self.connections_created = 0
        self.connect_failures = 0
        self._closed = False

    async def open_stream(
        self,
        key: PoolKey,
        ssl_context: ssl.SSLContext,
        authority: str,
        headers: list[tuple[str, str]],
        early: bytes = b"",
    ) -> HboneStream:
        """A CONNECT stream to ``key.addr`` whose server proved to be ``key.dst`` or one of ``key.also``.

        ``ssl_context`` is the client context of ``key.src`` (CertificateManager.client_context). Raises
        HboneConnectError: the peer's status (400/401/503), or 503 for connect/TLS/identity failures. A stream
        the peer provably did not process (GOAWAY race, refused stream, a new connection gone before use) is retried
        once on another connection (pooled or new, never the one that refused it), with the same ``early`` bytes
        (HboneClientConnection.open_stream), which that peer therefore never got.
        """
        for attempt in (1, 2):
            pooled: _Pooled | None = None
            try:
                pooled = await self._checkout(key, ssl_context)
                return await pooled.conn.open_stream(authority, headers, early)
            except HboneConnectError as e:
                if e.retryable and pooled is not None and pooled.conn.available_streams > 0:
                    # The peer refused a stream it had room for by its own limit: no new streams there, so the
                    # retry, and every later request, goes to another connection or a new one. (A refusal over
                    # the limit, opened before the peer's SETTINGS lowering it arrived, leaves it full, not bad.)
                    self._retire(pooled, "refused a stream")
                if not e.retryable or attempt == 2:
                    raise
                log.info("HBONE stream refused, retrying on another connection", extra=kv(reason=e.reason))
        raise AssertionError("unreachable")

    def _current(self, src: Identity, ssl_context: ssl.SSLContext) -> ssl.SSLContext:
        """The newest client context of ``src`` the pool has seen: ``ssl_context``, unless the caller's is one a
        renewal has since replaced."""
        newest = self._newest.get(src)
        if newest is ssl_context:
            return ssl_context
        seen = self._seen
        order = seen.get(ssl_context)
        if order is None:
            order = seen[ssl_context] = next(self._order)
        if newest is not None and newest is not ssl_context and seen.get(newest, -1) > order:
            return newest
        self._newest[src] = ssl_context
        return ssl_context

    def _scan(self, key: PoolKey, ssl_context: ssl.SSLContext) -> tuple[_Pooled | None, bool]:
        """A connection of ``key`` made with ``ssl_context`` that can take a stream now, and whether the key has
        connections made with another context."""
        found: _Pooled | None = None
        other = False
        for pooled in self._conns.get(key, ()):
            if pooled.context is not ssl_context:
                other = True
                continue
            conn = pooled.conn
            if (
                found is None
                and conn.usable
                and conn.active_streams < self.max_streams_per_conn
                and conn.available_streams > 0
            ):
                found = pooled
        return found, other

    async def _checkout(self, key: PoolKey, ssl_context: ssl.SSLContext) -> _Pooled:
        """A usable connection with a free stream slot; it stays usable until the caller's next await."""
        while True:
            if self._closed:
                raise HboneConnectError(503, "connection pool closed", stage=ConnectStage.POOL)
            found, stale = self._scan(key, ssl_context)
            if found is not None and not stale:  # the common case: no context to compare
                return self._touch(found)
            ctx = self._current(key.src, ssl_context)
            if ctx is not ssl_context:  # the caller's context was replaced: the current one's connections serve
                found, stale = self._scan(key, ctx)
            if stale:  # also when a current one serves: an idle stale one would stay open until its idle timeout
                self._retire_stale(key, ctx)
            if found is not None:
                return self._touch(found)
            pending = self._connecting.get(key)
            if pending is not None and pending[0] is ctx:
                task = pending[1]
            else:  # none under way, or one with a context since replaced (its connection will be retired)
                task = asyncio.get_running_loop().create_task(self._connect(key, ctx))
                self._connecting[key] = (ctx, task)
                task.add_done_callback(functools.partial(self._connect_done, key))
            # Every opener for this key waits on the same handshake; cancelling one waiter does not cancel it.
            made = await asyncio.shield(task)
            if made.retired and made.context is not self._current(key.src, ctx):
                # Another waiter found the certificate renewed meanwhile and retired it: use the current one's.
                continue
            if not made.conn.usable:
                # Gone before anyone used it (GOAWAY, the peer's close, a TLS alert right after the handshake): this
                # attempt fails, as ztunnel's maker's request on it would. Dialling again here never ended against
                # a peer refusing every connection.
                raise HboneConnectError(
                    503, "new connection closed before use", retryable=True, stage=ConnectStage.HTTP2
                )
            if made.conn.available_streams == 0 and made.conn.active_streams == 0:
                # The peer allows no stream at all (SETTINGS_MAX_CONCURRENT_STREAMS 0: overloaded, RFC 9113
                # 6.5.2). Another connection to it would say the same: dialling on was a loop of handshakes for as
                # long as the peer kept it at 0. (ztunnel's maker's request would wait on that connection.)
                raise HboneConnectError(
                    503, "peer allows no streams (SETTINGS_MAX_CONCURRENT_STREAMS 0)", stage=ConnectStage.HTTP2
                )

    async def _connect(self, key: PoolKey, ssl_context: ssl.SSLContext) -> _Pooled:
        try:
            conn = await connect(
                key.addr,
                ssl_context,
                key.accepted,
                config=self.config,
                stats=self.stats,
                source_ip=key.source,
                dial=self.dial,
            )
        except HboneConnectError:
            self.connect_failures += 1
            raise
        pooled = _Pooled(key, conn, ssl_context)
        self.connections_created += 1
        conn.set_stream_count_callback(functools.partial(self._on_stream_count, pooled))
        self._conns.setdefault(key, []).append(pooled)
        used = pooled.used = self._used.setdefault(key.src, {})
        used[pooled] = None
        while len(used) > self.max_connections_per_source:
            oldest = next(iter(used))
            # DEBUG, as ztunnel's eviction: a pod fanning out evicts on every new connection
            self._retire(oldest, "over max_connections_per_source", logging.DEBUG)
            if oldest.used is not None:  # not taken out (cannot happen: a pooled one is retired): never spin
                break
        self._arm_idle(pooled)
        asyncio.get_running_loop().create_task(self._watch(pooled))
        log.debug("HBONE connection opened", extra=kv(dst=str(key.dst), addr=f"{key.addr[0]}:{key.addr[1]}"))
        return pooled

    def _connect_done(self, key: PoolKey, task: asyncio.Task[_Pooled]) -> None:
        pending = self._connecting.get(key)
        if pending is not None and pending[1] is task:
            del self._connecting[key]
        if not task.cancelled():
            task.exception()  # retrieved here so a failure nobody awaited is not logged as "never retrieved"

    async def _watch(self, pooled: _Pooled) -> None:
        """Evict the connection from the pool as soon as it closes (GOAWAY, keepalive timeout, peer close)."""
        await pooled.conn.wait_closed()
        self._evict(pooled)
        self._retired.discard(pooled)

    def _touch(self, pooled: _Pooled) -> _Pooled:
        """``pooled`` is being used: the most recently used of its source's."""
        used = pooled.used
        if used is not None:
            del used[pooled]
            used[pooled] = None
        return pooled

    def _evict(self, pooled: _Pooled) -> None:
        if pooled.idle_handle is not None:
            pooled.idle_handle.cancel()
            pooled.idle_handle = None
        used = pooled.used
        if used is not None:
            pooled.used = None
            del used[pooled]
            if not used:
                del self._used[pooled.key.src]
        conns = self._conns.get(pooled.key)
        if conns and pooled in conns:
            conns.remove(pooled)
            if not conns:
                del self._conns[pooled.key]

    def _retire_stale(self, key: PoolKey, ssl_context: ssl.SSLContext) -> None:
        """Take the key's connections made with another context than ``ssl_context`` (the current one) out of the
        pool."""
        for pooled in [p for p in self._conns.get(key, ()) if p.context is not ssl_context]:
            self._retire(pooled, "the source's certificate or trust bundle changed")

    def _retire(self, pooled: _Pooled, why: str, level: int = logging.INFO) -> None:
        """Take ``pooled`` out of the pool: it takes no new streams, closes now if it has none, else with its last
        one (:meth:`_on_stream_count`). A connection already out of the pool (closed, retired) is left alone."""
        conns = self._conns.get(pooled.key)
        if pooled.retired or not conns or pooled not in conns:
            return
        pooled.retired = True
        self._evict(pooled)
        log.log(
            level,
            "HBONE connection retired: " + why,
            extra=kv(src=str(pooled.key.src), dst=str(pooled.key.dst), streams=pooled.conn.active_streams),
        )
        if pooled.conn.active_streams == 0:
            pooled.conn.close()
        else:
            self._retired.add(pooled)

    def _on_stream_count(self, pooled: _Pooled, count: int) -> None:
        if count:
            pooled.idle_since = None
            if pooled.idle_handle is not None:
                pooled.idle_handle.cancel()
                pooled.idle_handle = None
            return
        if pooled.idle_since is None:
            pooled.idle_since = time.monotonic()
            self._arm_idle(pooled)
        if not pooled.conn.usable or pooled.retired:
            # Draining after GOAWAY, or retired: nothing will use it again.
            pooled.conn.close()
            self._evict(pooled)
            self._retired.discard(pooled)

    def _arm_idle(self, pooled: _Pooled) -> None:
        if pooled.idle_handle is not None:
            pooled.idle_handle.cancel()
        pooled.idle_handle = asyncio.get_running_loop().call_later(self.idle_timeout, self._idle_expired, pooled)

    def _idle_expired(self, pooled: _Pooled) -> None:
        pooled.idle_handle = None
        if pooled.conn.active_streams == 0:
            log.debug("HBONE connection idle, releasing", extra=kv(dst=str(pooled.key.dst)))
            pooled.conn.close()
            self._evict(pooled)

    def connection_count(self) -> int:
        return sum(len(v) for v in self._conns.values())

    def stream_count(self) -> int:
        return sum(p.conn.active_streams for p in self._all())

    def _all(self) -> list[_Pooled]:
        return [p for conns in self._conns.values() for p in conns] + list(self._retired)

    def snapshot(self) -> list[dict[str, object]]:
        """Per connection, retired ones included: key, the address it left from, active streams, age, idle time (for
        /config_dump)."""
        now = time.monotonic()
        return [
            {
                "src": str(p.key.src),
                "dst": str(p.key.dst),
                "also": sorted(str(i) for i in p.key.also),
                "peer": str(p.conn.peer_identity),
                "addr": f"{p.key.addr[0]}:{p.key.addr[1]}",
                "source": p.conn.local_ip,
                "streams": p.conn.active_streams,
                "usable": p.conn.usable,
                "retired": p.retired,
                "age_s": round(now - p.created, 3),
                "idle_s": None if p.idle_since is None else round(now - p.idle_since, 3),
            }
            for p in self._all()
        ]

    async def close(self) -> None:
        """Close every pooled connection (agent shutdown)."""
        self._closed = True
        for _, task in list(self._connecting.values()):
            task.cancel()
        pooled_all = self._all()
        self._retired.clear()
        for p in pooled_all:
            p.conn.close()
            self._evict(p)
        # One deadline for all: each connection waited in turn would make a shutdown against peers that no longer
        # answer (the TLS shutdown waits for their close_notify) last close_timeout per pooled connection.
        waits = [asyncio.ensure_future(p.conn.wait_closed()) for p in pooled_all]
        if waits:
            await asyncio.wait(waits, timeout=self.close_timeout)
        for p, w in zip(pooled_all, waits, strict=True):
            if not w.done():
                w.cancel()
                p.conn.abort()
