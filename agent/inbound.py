"""Inbound: HBONE (15008) and plaintext (15006) connections for enrolled pods on this node.

HBONE: the eBPF redirect hands us connections for `podIP:15008`, so the accepted socket's local address
names the destination pod; TLS is terminated with *that* pod's certificate (there is no SNI), and each
CONNECT is checked like ztunnel's inbound: the address must still belong to an enrolled workload of the
identity the handshake asserted (503: a pooled connection outlives pods, and IPs are reused), `:authority`
must be `ip:port` of that same pod (400), policy must allow the peer identity (401), the pod must accept the
connection (503); then 200 (with the pod's `baggage`, as ztunnel) and relay.

Plaintext (15006): connections to enrolled pods from outside the mesh. The same policy check with no peer
identity (STRICT PeerAuthentication arrives as a DENY of "no principal"), then spliced to the pod.

Both connect to the pod from the client's own address when `keep_source_address` is on (transparent bind;
replies come back through the pod's veth program), falling back to the node address where the kernel
refuses.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Any

from agent import rbac
from agent.accesslog import AccessLog
from agent.addressing import (
    AGENT_PORTS,
    HBONE,
    Address,
    BadAuthority,
    destination_service,
    format_address,
    parse_authority,
    workload_baggage,
    workload_identity,
)
from agent.connections import ConnectionRegistry
from agent.identity import CertificateUnavailable
from agent.metrics import Metrics
from agent.sockets import abort, canonical_ip, connect_upstream, peer_or_close
from agent.state import WorkloadStore
from agent.tunnel import (
    ConnectRequest,
    HboneStreamReset,
    ServerConnections,
    TunnelConfig,
    TunnelStats,
    relay,
    serve_hbone_connection,
)
from common.log import kv
from common.spiffe import Identity

log = logging.getLogger("agent.inbound")

ABANDONED = "client reset the stream before the answer"
# ztunnel's handler is not cancelled by the client's reset: it runs on to send_response, which fails with an
# h2::Error (Error::H2, src/proxy/h2/server.rs), recorded as H2_HANDSHAKE_FAILURE (src/proxy/inbound.rs serve_connect)
ABANDONED_FLAG = "H2_HANDSHAKE_FAILURE"


# How much sooner than the source agent stops waiting for a CONNECT's answer the pod's connect gives up: the 503 (and
# the destination's reason in its log) must reach the source before its own timer fires.
ANSWER_MARGIN = 1.0


@dataclass(frozen=True, slots=True)
class InboundConfig:
    keep_source_address: bool = True
    # ztunnel's CONNECTION_TIMEOUT (src/proxy.rs freebind_connect); for HBONE capped below the source's wait for
    # the CONNECT's answer (see InboundProxy), plaintext clients wait for TCP.
    connect_timeout: float = 10.0
    own_ports: frozenset[int] = AGENT_PORTS


def forwarded(headers: list[tuple[str, str]]) -> dict[str, str]:
    """The parameters of the first element of the `forwarded` header (RFC 7239), names lowercase."""
    for name, value in headers:
        if name.lower() != "forwarded":
            continue
        params = {}
        for pair in value.split(",", 1)[0].split(";"):
            key, sep, val = pair.strip().partition("=")
            if sep:
                params[key.strip().lower()] = val.strip().strip('"')
        return params
    return {}


def original_client(peer: Address, params: dict[str, str]) -> Address:
    """The client a CONNECT speaks for: the TCP peer, as ztunnel's inbound takes it (`forwarded: for=` only from
    its own waypoint, which Ambit has not). Agents tunnel from the client pod's own address, which the network
    vouches for; believing `for=`'s address let a peer holding one certificate of an identity claim the address of
    any workload of that identity and pass a policy's ipBlocks meant for that one. Only the port is taken from
    `for=` when it names the peer's own address: the port the client pod used, which its agent's line shows (the
    tunnel's own port is shared by every stream of the pooled connection); no policy reads a source port."""
    try:
        ip, port = parse_authority(params.get("for", ""))
    except BadAuthority:
        return peer
    return (peer[0], port) if canonical_ip(ip) == canonical_ip(peer[0]) else peer


def validate_authority(authority: str, local_ip: str) -> Address:
    """`:authority` as (ip, port); raises BadAuthority unless it is `ip:port` of the connection's own pod."""
    ip, port = parse_authority(authority)
    if ip != local_ip:
        raise BadAuthority(f"authority {authority!r} does not match the destination {local_ip}")
    return ip, port


async def _respond(req: ConnectRequest, status: int, headers: list[tuple[str, str]] | None = None) -> bool:
    """Answer the CONNECT; False when the client already gave up on the stream (nothing left to answer)."""
    try:
        await req.respond(status, headers)
    except HboneStreamReset:
        return False
    return True


class _Common:
    def __init__(
        self,
        store: WorkloadStore,
        node: str,
        metrics: Metrics,
        access_log: AccessLog,
        connections: ConnectionRegistry,
        config: InboundConfig | None = None,
        *,
        trust_domain: str,
    ) -> None:
        self.store = store
        self.node = node
        self.metrics = metrics
        self.access_log = access_log
        self.connections = connections
        self.config = config or InboundConfig()
        self.trust_domain = trust_domain

    def local_workload(self, ip: str) -> Any | None:
        """An enrolled workload of this node with address `ip` (only those get inbound service)."""
        wl = self.store.workload_by_ip(ip)
        if wl is None or wl.node != self.node or wl.tunnel_protocol != HBONE:
            return None
        return wl

    def refuse(
        self, sock: socket.socket, direction: str, reason: str, src: Address | None, dst: Address, **detail: Any
    ) -> None:
        self.access_log.refused(direction, src, dst, reason, **detail)
        abort(sock)


class InboundProxy(_Common):
    """HBONE server: `await proxy.handle(sock, orig_dst)` for each connection accepted on 15008."""

    def __init__(
        self,
        store: WorkloadStore,
        certs: Any,
        node: str,
        metrics: Metrics,
        access_log: AccessLog,
        connections: ConnectionRegistry,
        config: InboundConfig | None = None,
        *,
        tunnel_config: TunnelConfig | None = None,
        tunnel_stats: TunnelStats | None = None,
    ) -> None:
        super().__init__(store, node, metrics, access_log, connections, config, trust_domain=certs.trust_domain)
        self.certs = certs
        self.tunnel_config = tunnel_config
        # The source agent waits for the CONNECT's answer as long as its tunnel's response_timeout (the same
        # binary's default as ours). Were our connect to the pod as long, a pod that never answers the SYN would time
        # out on both sides at once, the source first (its timer starts a round trip earlier): it would log a stream
        # timeout, and the 503 would go to a reset stream. ztunnel has no such wait: its source always hears the 503
        # (src/proxy/inbound.rs serve_connect).
        wait = (tunnel_config or TunnelConfig()).response_timeout
        self.upstream_timeout = min(self.config.connect_timeout, max(wait - ANSWER_MARGIN, wait / 2))
        self.hbone_connections = ServerConnections()  # told to go elsewhere when the agent drains
        self.tunnel_stats = tunnel_stats

    async def handle(self, sock: socket.socket, orig_dst: Address) -> None:
        if (peer := peer_or_close(sock)) is None:
            return
        wl = self.local_workload(orig_dst[0])
        if wl is None:
            self.refuse(sock, "inbound", "unknown_destination", peer, orig_dst)
            return
        ident = workload_identity(wl, self.trust_domain)
        try:
            ctx = await self.certs.server_context(ident)
        except CertificateUnavailable as e:  # the CA may be unreachable: refuse this one, keep serving others
            self.refuse(sock, "inbound", "no_certificate", peer, orig_dst, identity=str(ident), detail=str(e))
            return

        async def on_connect(req: ConnectRequest) -> None:
            # A pooled connection outlives config changes: resolve the workload (hence its policies) per stream.
            current = self.local_workload(orig_dst[0])
            if current is None:
                await self._refuse_stream(req, peer, orig_dst, 503, "unknown_destination")
                return
            if workload_identity(current, self.trust_domain) != ident:  # the address now belongs to someone else
                await self._refuse_stream(req, peer, orig_dst, 503, "identity_changed", identity_was=str(ident))
                return
            await self._connect(req, current, ident, orig_dst, peer)

        await serve_hbone_connection(
            sock,
            ctx,
            on_connect,
            trust_domain=self.trust_domain,
            config=self.tunnel_config,
            stats=self.tunnel_stats,
            connections=self.hbone_connections,
        )

    async def _refuse_stream(
        self, req: ConnectRequest, peer: Address, dst: Address, status: int, reason: str, **detail: Any
    ) -> None:
        """A CONNECT turned away before policy (ztunnel's early deny): counted by reason, logged, answered."""
        self.access_log.refused(
            "inbound", peer, dst, reason, authority=req.authority, identity=str(req.peer_identity), **detail
        )
        await _respond(req, status)

    async def _connect(self, req: ConnectRequest, wl: Any, ident: Identity, orig_dst: Address, peer: Address) -> None:
        try:
            dst = validate_authority(req.authority, orig_dst[0])
        except BadAuthority as e:
            await self._refuse_stream(req, peer, orig_dst, 400, "bad_authority", detail=str(e))
            return
        if dst[1] in self.config.own_ports:  # ztunnel: SelfCall while picking the upstream, answered 503
            await self._refuse_stream(req, peer, orig_dst, 503, "self_call")
            return
        params = forwarded(req.headers)
        client = original_client(peer, params)
        src = self.store.workload_by_ip(client[0])
        # As ztunnel (build_inbound_request), for consistency with the source's line: dst.addr is the address the
        # tunnel reached (podIP:15008), dst.hbone_addr the :authority.
        report = self.access_log.start(
            "inbound",
            client,
            orig_dst,
            src=src,
            dst=wl,
            service=destination_service(self.store, wl, dst[1], params.get("host")),
            src_identity=req.peer_identity,
            dst_identity=ident,
            mtls=True,
            hbone_addr=dst,
            path="hbone",
        )
        conn = rbac.Connection(client[0], dst[0], dst[1], req.peer_identity, client[1])
        decision = rbac.evaluate(self.store.policies_for(wl), conn)
        report.decision = decision
        report.opened()
        for note in decision.dry_run:
            log.info("dry-run policy", extra=kv(connection=str(conn), result=note))
        if not decision.allowed:
            self.metrics.error("inbound", "policy_denied")
            await _respond(req, 401)
            report.finish(error=decision.explain(), flags="DENY")
            return
        # Tracked from the decision on, as ztunnel registers before its first check: a policy change that lands
        # while the pod is being connected cuts this connection too (the task is cancelled until the relay runs,
        # then the stream is reset, so the relay still reports its bytes).
        task = asyncio.current_task()
        assert task is not None
        tracked = self.connections.track(conn, wl.uid, "inbound", task.cancel, [report])
        answered = False
        try:
            try:
                upstream = await connect_upstream(
                    dst,
                    # not a pod to itself: its kernel drops a packet from its own address arriving from outside
                    source_ip=client[0] if self.config.keep_source_address and client[0] != dst[0] else None,
                    connect_timeout=self.upstream_timeout,
                )
            except (OSError, TimeoutError) as e:
                self.metrics.error("inbound", "connect_failed")
                await _respond(req, 503)
                report.finish(error=f"connect {format_address(dst)}: {e}", flags="CONNECT")
                return
            # As ztunnel (ENABLE_RESPONSE_BAGGAGE, on by default): the 200, and only the 200, describes the
            # destination in `baggage`, for a client that reports what answered.
            bag = workload_baggage(self.store, wl)
            if not await _respond(req, 200, [("baggage", bag)] if bag else None):
                upstream.close()
                report.finish(error=ABANDONED, flags=ABANDONED_FLAG)
                return
            answered = True
            tracked.close = req.stream.reset
            result = await relay(upstream, req.stream, lambda live: report.relaying(lambda: live()[::-1]))
        except asyncio.CancelledError:
            late = tracked.late_rejection
            if late is None:  # the client gave up (the stream's reset cancels its handler), or the agent stops
                report.finish(
                    error=ABANDONED if req.abandoned else "cancelled", flags=ABANDONED_FLAG if req.abandoned else "-"
                )
                raise
            if not answered:  # cut before the answer: refused as the first check would have
                await _respond(req, 401)
            report.finish(error=late, flags="DENY")
            return
        except Exception as e:  # a failure nothing above expects: the handler logs it; the record still closes
            report.finish(error=f"internal error: {e!r}", flags="CONNECT")
            raise
        finally:
            self.connections.untrack(tracked)
        # relay counts from the TCP socket's view: up = pod -> tunnel (server->client)
        late = tracked.late_rejection
        failure = result.failure  # a reset or broken pipe while relaying is no error (ztunnel's ignore_io_errors)
        flags = "DENY" if late else "CONNECT" if failure else "-"  # a copy error: SendError/ReceiveError, CONNECT
        report.finish(result.bytes_down, result.bytes_up, error=late or failure, flags=flags)


class InboundPlaintextProxy(_Common):
    """Plaintext into enrolled pods (15006): `await proxy.handle(sock, orig_dst)`."""

    async def handle(self, sock: socket.socket, orig_dst: Address) -> None:
        if (client := peer_or_close(sock)) is None:
            return
        if orig_dst[1] in self.config.own_ports:
            self.refuse(sock, "inbound_plaintext", "self_call", client, orig_dst)
            return
        wl = self.local_workload(orig_dst[0])
        if wl is None:
            self.refuse(sock, "inbound_plaintext", "unknown_destination", client, orig_dst)
            return
        report = self.access_log.start(
            "inbound",
            client,
            orig_dst,
            src=self.store.workload_by_ip(client[0]),
            dst=wl,
            service=destination_service(self.store, wl, orig_dst[1]),
            dst_identity=workload_identity(wl, self.trust_domain),
            mtls=False,
            path="plaintext",
        )
        conn = rbac.Connection(client[0], orig_dst[0], orig_dst[1], None, client[1])
        await self.connections.splice_authorized(
            sock,
            conn,
            wl,
            orig_dst,
            [report],
            "inbound_plaintext",
            keep_source=self.config.keep_source_address,
            connect_timeout=self.config.connect_timeout,
        )
