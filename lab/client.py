"""Traffic helpers that run inside a lab netns from the calling process: what tests, the demo and probes use to
act as a pod (or node) without starting a process there."""

from __future__ import annotations

import http.client
import json
import selectors
import socket
from typing import Any

from lab.netns import enter


def tcp_echo(netns: str, ip: str, port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send ``payload`` from inside ``netns``, half-close, and return everything the peer sent back.

    Sending and receiving interleave, so payloads larger than the socket buffers along the path cannot deadlock
    against an echo server that stops reading while its writes are blocked.
    """
    with enter(netns):
        sock = socket.create_connection((ip, port), timeout=timeout)
    received = bytearray()
    view = memoryview(payload)
    with sock, selectors.DefaultSelector() as sel:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if view else 0))
        if not view:
            sock.shutdown(socket.SHUT_WR)
        while True:
            events = sel.select(timeout)
            if not events:
                raise TimeoutError(f"echo via {ip}:{port}: no progress for {timeout}s ({len(received)} bytes back)")
            _, mask = events[0]
            if mask & selectors.EVENT_WRITE:
                view = view[sock.send(view[:65536]) :]
                if not view:
                    sock.shutdown(socket.SHUT_WR)
                    sel.modify(sock, selectors.EVENT_READ)
            if mask & selectors.EVENT_READ:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
    return bytes(received)


def http_get(netns: str, ip: str, port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP/1.1 GET from inside ``netns``; returns (status, body)."""
    conn = http.client.HTTPConnection(ip, port, timeout=timeout)
    try:
        with enter(netns):
            conn.connect()
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def who(netns: str, ip: str, port: int = 8080, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a sample workload who it is and who called it (see lab.workload)."""
    status, body = http_get(netns, ip, port, "/", timeout)
    if status != 200:
        raise http.client.HTTPException(f"GET http://{ip}:{port}/ from {netns}: status {status}: {body[:200]!r}")
    result: dict[str, Any] = json.loads(body)
    return result
