"""Plain TCP <-> TCP relay through the kernel with `os.splice` (passthrough, plaintext inbound, same node).

Bytes move socket -> pipe -> socket without entering Python (measured 0.6x of direct against 0.26x for a
copying relay, ENVIRONMENT.md). Each direction owns a pipe and only reads more once the pipe is drained into
the other socket, so a slow reader holds back its writer (back-pressure bounded by the pipe size). A FIN
becomes shutdown(SHUT_WR) on the other side once everything before it was delivered (half-close), and the
counters are exact: they count bytes accepted by the destination socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import struct

from agent.tunnel import RelayResult

DEFAULT_PIPE_SIZE = 1 << 20
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


async def _ready(fd: int, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer learns at once that the connection was cut, not finished."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class SpliceRelay:
    """Relays between two connected sockets; `bytes_up`/`bytes_down` are live so a cut connection still reports.

    Takes ownership of both sockets: they are closed when `run` ends, abortively (RST) if it was cancelled
    or a side reset.
    """

    def __init__(self, client: socket.socket, upstream: socket.socket, pipe_size: int = DEFAULT_PIPE_SIZE) -> None:
        self.client = client
        self.upstream = upstream
        self.pipe_size = pipe_size
        self.bytes_up = 0  # client -> upstream
        self.bytes_down = 0  # upstream -> client

    async def run(self) -> RelayResult:
        self.client.setblocking(False)
        self.upstream.setblocking(False)
        up = asyncio.ensure_future(self._pump(self.client, self.upstream, True))
        down = asyncio.ensure_future(self._pump(self.upstream, self.client, False))
        error: str | None = None
        clean = False
        try:
            done, pending = await asyncio.wait((up, down), return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    error = f"{type(exc).__name__}: {exc}"
            clean = error is None and not pending
        finally:
            for t in (up, down):
                t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.gather(up, down, return_exceptions=True)
            if clean:
                self.client.close()
                self.upstream.close()
            else:
                abort(self.client)
                abort(self.upstream)
        return RelayResult(self.bytes_up, self.bytes_down, error)

    async def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.pipe_size)
            src_fd, dst_fd = src.fileno(), dst.fileno()
            while True:
                try:
                    n = os.splice(src_fd, w, self.pipe_size, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await _ready(src_fd, write=False)
                    continue
                if n == 0:
                    break
                while n:
                    try:
                        m = os.splice(r, dst_fd, n, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        await _ready(dst_fd, write=True)
                        continue
                    n -= m
                    if up:
                        self.bytes_up += m
                    else:
                        self.bytes_down += m
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError as e:
                if e.errno != errno.ENOTCONN:
                    raise
        finally:
            os.close(r)
            os.close(w)
