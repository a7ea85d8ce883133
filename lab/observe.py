"""Watching a running mesh lab from outside: an agent's admin, metrics and access log, the live config, and a raw
packet capture of a link. Used by the demo and the end-to-end tests; everything runs from the calling process
inside the lab's namespaces (lab.netns.enter)."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import netns
from lab.cluster import Lab

ETH_P_ALL = 0x0003


def http_json(lab: Lab, node: str, port: int, path: str, host: str | None = None) -> Any:
    info = lab.node(node)
    with netns.enter(info.netns):
        sock = socket.create_connection((host or info.ip, port), timeout=5)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise AssertionError(f"GET {path} on {node}:{port}: {head[:100]!r}")
    return json.loads(body) if path != "/metrics" else body.decode()


def metrics(lab: Lab, node: str) -> str:
    text: str = http_json(lab, node, 15020, "/metrics")
    return text


def metric_lines(text: str, name: str, **labels: str) -> list[str]:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return [line for line in text.splitlines() if line.startswith(name + "{") and all(w in line for w in want)]


def agent_log(lab: Lab, node: str) -> list[dict[str, Any]]:
    out = []
    for line in Path(lab.process(f"agent-{node}").log).read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


@dataclass
class Sniffer:
    """Raw AF_PACKET capture of every frame on one interface of a lab netns (no tshark dependency)."""

    frames: list[bytes] = field(default_factory=list)

    def tcp_payloads(self) -> Iterator[tuple[int, int, bytes]]:
        """(source port, destination port, payload) of each TCP segment seen, IPv4 or IPv6 (an IPv6 segment only
        when TCP directly follows the fixed header: the lab's traffic carries no extension headers)."""
        for frame in self.frames:
            ethertype = frame[12:14]
            if ethertype == b"\x08\x00" and len(frame) >= 34:
                ip = frame[14:]
                if ip[9] != socket.IPPROTO_TCP:
                    continue
                tcp = ip[(ip[0] & 0x0F) * 4 : struct.unpack("!H", ip[2:4])[0]]
            elif ethertype == b"\x86\xdd" and len(frame) >= 54:
                ip = frame[14:]
                if ip[6] != socket.IPPROTO_TCP:
                    continue
                tcp = ip[40 : 40 + struct.unpack("!H", ip[4:6])[0]]
            else:
                continue
            sport, dport = struct.unpack("!HH", tcp[:4])
            off = (tcp[12] >> 4) * 4
            yield sport, dport, bytes(tcp[off:])

    def saw(self, marker: bytes) -> bool:
        return any(marker in p for _, _, p in self.tcp_payloads())

    def ports(self) -> set[int]:
        return {p for s, d, _ in self.tcp_payloads() for p in (s, d)}


@contextlib.contextmanager
def sniff(netns_name: str, ifname: str) -> Iterator[Sniffer]:
    with netns.enter(netns_name):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((ifname, 0))
    sock.setblocking(False)
    result = Sniffer()

    def drain() -> None:
        while select.select([sock], [], [], 0)[0]:
            try:
                result.frames.append(sock.recv(65535))
            except BlockingIOError:
                return

    try:
        yield result
    finally:
        time.sleep(0.3)
        drain()
        sock.close()


@contextlib.contextmanager
def config_file(lab: Lab, name: str, text: str) -> Iterator[Path]:
    """Add a YAML file to the lab's live config (the controller watches it); removed afterwards."""
    path = Path(lab.config_dir) / name
    path.write_text(text)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def workloads(lab: Lab, node: str) -> list[dict[str, Any]]:
    dump = http_json(lab, node, 15000, "/config_dump", host="127.0.0.1")
    return list(dump.get("workloads", []))


def capture_status(lab: Lab, node: str) -> dict[str, Any]:
    dump = http_json(lab, node, 15000, "/config_dump", host="127.0.0.1")
    return dict(dump.get("capture", {}))
