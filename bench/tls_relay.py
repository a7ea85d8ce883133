"""Reference configuration (f): a Python mTLS relay pair without HTTP/2, the floor a Python tunnel can reach.

The client relay accepts plain TCP and opens one mutual-TLS connection per user connection to the server relay,
which checks the caller's SPIFFE identity and dials a fixed backend. No pooling and no CONNECT framing: it shows
what TLS alone costs in Python on this machine, next to Envoy and Ambit.

    python -m bench.tls_relay client|server --map LISTEN_IP:PORT=TARGET_IP:PORT ... --cert F --key F --root F
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import ssl
from pathlib import Path
from typing import cast

from common import log, tls
from common.spiffe import Identity

LOG = logging.getLogger("bench.tls_relay")


class Pipe(asyncio.Protocol):
    """One side of a relayed connection; back-pressure flows by pausing the other side's reads."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Pipe | None = None
        self.early: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so this is a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)

    def link(self, peer: Pipe) -> None:
        self.peer = peer
        peer.peer = self
        for pipe in (self, peer):
            pipe.flush_early()

    def flush_early(self) -> None:
        assert self.peer is not None and self.peer.transport is not None
        for chunk in self.early:
            self.peer.transport.write(chunk)
        self.early.clear()
        if self.eof:
            self.peer.half_close()

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.early.append(data)  # uvloop may deliver before the peer exists, even when paused
            return
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None:
            self.peer.half_close()
        # Keep a plain socket half-open for the reply; a TLS transport cannot be, and says so if asked.
        return self.transport is not None and self.transport.get_extra_info("ssl_object") is None

    def half_close(self) -> None:
        """TLS transports cannot half-close in asyncio, so a FIN towards TLS becomes a full close."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        self.peer = None


class AcceptedPipe(Pipe):
    """The listener side: reading stays paused until the other leg is connected and verified."""

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        self.relay.start_dial(self)


class Relay:
    def __init__(self, role: str, target: tuple[str, int], client_ctx: ssl.SSLContext | None, trust_domain: str):
        self.role = role
        self.target = target
        self.client_ctx = client_ctx
        self.trust_domain = trust_domain
        self.expected_server = Identity(trust_domain, "bench", "server")
        self._dials: set[asyncio.Task[None]] = set()

    def accepted(self) -> AcceptedPipe:
        return AcceptedPipe(self)

    def start_dial(self, inbound: AcceptedPipe) -> None:
        task = asyncio.get_running_loop().create_task(self._dial(inbound))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _dial(self, inbound: AcceptedPipe) -> None:
        loop = asyncio.get_running_loop()
        transport = inbound.transport
        assert transport is not None
        try:
            if self.role == "server":
                tls.verify_peer(transport.get_extra_info("ssl_object"), trust_domain=self.trust_domain)
                _, outbound = await loop.create_connection(Pipe, *self.target)
            else:
                _, outbound = await loop.create_connection(Pipe, *self.target, ssl=self.client_ctx, server_hostname="")
                assert outbound.transport is not None
                tls.verify_peer(outbound.transport.get_extra_info("ssl_object"), expected=[self.expected_server])
        except (OSError, ssl.SSLError, tls.PeerVerificationError) as exc:
            LOG.warning("dial failed", extra=log.kv(role=self.role, target=f"{self.target}", error=str(exc)))
            transport.close()
            return
        inbound.link(outbound)
        if not transport.is_closing():
            transport.resume_reading()


def _parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def serve(args: argparse.Namespace, roots: list[str], chain: str, key: str) -> None:
    server_ctx = tls.server_context(chain, key, roots) if args.role == "server" else None
    client_ctx = tls.client_context(roots, chain, key) if args.role == "client" else None
    loop = asyncio.get_running_loop()
    servers = []
    for mapping in args.map:
        listen, _, target = mapping.partition("=")
        relay = Relay(args.role, _parse_addr(target), client_ctx, args.trust_domain)
        host, port = _parse_addr(listen)
        servers.append(await loop.create_server(relay.accepted, host, port, ssl=server_ctx, reuse_address=True))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    LOG.info("relay ready", extra=log.kv(role=args.role, maps=args.map))
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_relay", description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["client", "server"])
    parser.add_argument("--map", action="append", required=True, help="LISTEN_IP:PORT=TARGET_IP:PORT")
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--trust-domain", default="cluster.local")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args(argv)
    log.setup("INFO")
    loop_factory = None
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with contextlib.suppress(KeyboardInterrupt):
        roots = [Path(args.root).read_text()]
        coro = serve(args, roots, Path(args.cert).read_text(), Path(args.key).read_text())
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(coro)


if __name__ == "__main__":
    main()
