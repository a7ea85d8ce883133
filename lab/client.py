"""Traffic helpers that run inside a lab netns from the calling process: what tests, the demo and probes use to
act as a pod (or node) without starting a process there."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from lab.netns import enter


def tcp_echo(netns: str, ip: str, port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send ``payload`` from inside ``netns``, half-close, and return everything the peer sent back."""
    with enter(netns):
        sock = socket.create_connection((ip, port), timeout=timeout)
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


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
