"""Test stand-ins for the two ends of a captured connection (run with `python -m tests.support.tcp_probe`).

``serve --port P``: a plain server; each connection gets ``server:P local=<ip:port> peer=<ip:port>`` and is closed.
``serve --transparent --port 15001 ...``: the agent's stand-in, IP_TRANSPARENT on 0.0.0.0 like the real listeners;
answers ``tproxy:P orig=<getsockname()> peer=<ip:port>`` and closes first (so *its* side ends in TIME_WAIT).
``--dual`` listens on [::] (IPv4 and IPv6). ``--relay`` makes the transparent listener connect to the original
destination from the client's own address (IP_TRANSPARENT bind, as the agent's source-preserving inbound does) and
relay the answer back, prefixed with ``relayed:P``: that only works when the return path delivers the server's
replies to the relay socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75


def _fmt(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``ip:port`` for IPv4 (also when seen through a dual-stack socket), ``[ip]:port`` for IPv6."""
    host = addr[0].removeprefix("::ffff:") if "." in addr[0] else addr[0]
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


async def _relay(port: int, sock: socket.socket, writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    peer, orig = sock.getpeername(), sock.getsockname()
    up = socket.socket(sock.family, socket.SOCK_STREAM)
    _transparent(up)
    up.setblocking(False)
    try:
        up.bind((peer[0], 0))
        await asyncio.wait_for(loop.sock_connect(up, orig), 3)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = await asyncio.wait_for(loop.sock_recv(up, 4096), 3)
            if not chunk:
                break
            answer += chunk
        writer.write(f"relayed:{port} ".encode() + answer)
    except (OSError, TimeoutError) as exc:
        writer.write(f"relay-failed:{port} {exc!r}\n".encode())
    finally:
        up.close()


def _handler(port: int, transparent: bool, relay: bool):  # type: ignore[no-untyped-def]
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        peer, local = writer.get_extra_info("peername"), sock.getsockname()
        if relay:
            await _relay(port, sock, writer)
        elif transparent:
            writer.write(f"tproxy:{port} orig={_fmt(local)} peer={_fmt(peer)}\n".encode())
        else:
            writer.write(f"server:{port} local={_fmt(local)} peer={_fmt(peer)}\n".encode())
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    return handle


def _transparent(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    if s.family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)


async def serve(ports: list[int], transparent: bool, relay: bool, dual: bool) -> None:
    servers = []
    for port in ports:
        s = socket.socket(socket.AF_INET6 if dual else socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dual:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if transparent:
            _transparent(s)
        s.bind(("::" if dual else "0.0.0.0", port))
        s.listen(128)
        s.setblocking(False)
        servers.append(await asyncio.start_server(_handler(port, transparent, relay), sock=s))
    print("READY", flush=True)
    await asyncio.gather(*(srv.serve_forever() for srv in servers))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["serve"])
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--transparent", action="store_true")
    ap.add_argument("--relay", action="store_true")
    ap.add_argument("--dual", action="store_true", help="listen on [::] for IPv4 and IPv6")
    args = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.transparent, args.relay, args.dual))


if __name__ == "__main__":
    main()
