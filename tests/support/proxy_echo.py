"""Byte-exact traffic helpers for proxy tests: an echo server and a client that checks what came back."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from dataclasses import dataclass

from lab.workload import handle_echo


async def echo_server(host: str, port: int = 0) -> asyncio.Server:
    """Echoes every byte and answers the client's FIN with its own (half-close aware)."""
    return await asyncio.start_server(handle_echo, host, port, reuse_address=True)


@dataclass
class Exchange:
    sent: int
    received: int
    sent_sha: str
    received_sha: str

    @property
    def intact(self) -> bool:
        return self.sent == self.received and self.sent_sha == self.received_sha


async def exchange_socket(sock: socket.socket, size: int, chunk: int = 1 << 16) -> Exchange:
    """Sends `size` random bytes on a connected socket, half-closes, reads the echo until EOF."""
    reader, writer = await asyncio.open_connection(sock=sock)
    return await exchange(reader, writer, size, chunk)


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int, chunk: int = 1 << 16
) -> Exchange:
    sent_h, recv_h = hashlib.sha256(), hashlib.sha256()
    received = 0

    async def send() -> None:
        left = size
        while left:
            data = os.urandom(min(chunk, left))
            sent_h.update(data)
            writer.write(data)
            await writer.drain()
            left -= len(data)
        writer.write_eof()

    async def recv() -> None:
        nonlocal received
        while data := await reader.read(1 << 18):
            recv_h.update(data)
            received += len(data)

    try:
        await asyncio.gather(send(), recv())
    finally:
        writer.close()
    return Exchange(size, received, sent_h.hexdigest(), recv_h.hexdigest())


def client_socket(source_ip: str | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if source_ip:
        s.bind((source_ip, 0))
    s.setblocking(False)
    return s


async def connect_from(source_ip: str | None, addr: tuple[str, int]) -> socket.socket:
    s = client_socket(source_ip)
    try:
        await asyncio.get_running_loop().sock_connect(s, addr)
    except BaseException:
        s.close()
        raise
    return s
