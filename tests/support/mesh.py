"""Helpers for end-to-end tests on a mesh lab: wait for convergence and talk as a pod (many streams at once).
Observing agents, links and the live config lives in lab.observe (the demo uses it too)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import Callable

from lab import Lab, netns

ETH_P_ALL = 0x0003


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0, interval: float = 0.2) -> None:
    """Poll until ``predicate()`` holds. The timeout is a liveness bound for a hung system, not a measurement."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as e:  # the condition may raise while the system converges (e.g. a refused connection)
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last_error!r})" if last_error else ""))


def connect(lab: Lab, pod: str, ip: str, port: int, timeout: float = 5.0) -> socket.socket:
    with netns.enter(lab.pod(pod).netns):
        return socket.create_connection((ip, port), timeout=timeout)


async def _echo_one(sock: socket.socket, payload: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    received = bytearray()

    async def send() -> None:
        await loop.sock_sendall(sock, payload)
        sock.shutdown(socket.SHUT_WR)

    sender = asyncio.ensure_future(send())
    while chunk := await loop.sock_recv(sock, 1 << 18):
        received += chunk
    await sender
    sock.close()
    return bytes(received)


def parallel_echo(lab: Lab, pod: str, ip: str, port: int, streams: int, size: int) -> list[tuple[str, str]]:
    """Open ``streams`` connections from ``pod`` at once, echo ``size`` random bytes on each; returns
    (sent sha256, received sha256) pairs."""
    payloads = [os.urandom(size) for _ in range(streams)]
    socks = [connect(lab, pod, ip, port) for _ in range(streams)]

    async def run() -> list[bytes]:
        return await asyncio.wait_for(
            asyncio.gather(*(_echo_one(s, p) for s, p in zip(socks, payloads, strict=True))), 120
        )

    results = asyncio.run(run())
    return [
        (hashlib.sha256(p).hexdigest(), hashlib.sha256(r).hexdigest()) for p, r in zip(payloads, results, strict=True)
    ]
