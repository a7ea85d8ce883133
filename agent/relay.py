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
_YIELD_EVERY = 16


async def _ready(read_fd: int | None, write_fd: int | None) -> None:
    """Wait until `read_fd` is readable or `write_fd` writable, whichever comes first."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    if read_fd is not None:
        loop.add_reader(read_fd, wake)
    if write_fd is not None:
        loop.add_writer(write_fd, wake)
    try:
        await fut
    finally:
        if read_fd is not None:
            loop.remove_reader(read_fd)
        if write_fd is not None:
            loop.remove_writer(write_fd)


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
        """One direction. The pipe is the buffer: each turn reads what fits and writes what the destination
        takes, so a partial write does not stop reading until the pipe is full."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            size = self.pipe_size
            with contextlib.suppress(OSError):
                size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.pipe_size)
            src_fd, dst_fd = src.fileno(), dst.fileno()
            buffered = 0  # bytes in the pipe
            eof = False
            streak = 0
            while not (eof and buffered == 0):
                moved = False
                if not eof and buffered < size:
                    try:
                        n = os.splice(src_fd, w, size - buffered, flags=_SPLICE_FLAGS)
                        eof = n == 0
                        buffered += n
                        moved = True
                    except BlockingIOError:
                        pass
                if buffered:
                    try:
                        m = os.splice(r, dst_fd, buffered, flags=_SPLICE_FLAGS)
                        buffered -= m
                        if up:
                            self.bytes_up += m
                        else:
                            self.bytes_down += m
                        moved = True
                    except BlockingIOError:
                        pass
                if not moved:
                    # Both would block. With bytes in the pipe, only the writer can unblock us (a read may have
                    # failed because the pipe ran out of slots, so waiting for "readable" would spin).
                    if buffered:
                        await _ready(None, dst_fd)
                    else:
                        await _ready(src_fd, None)
                    streak = 0
                else:
                    streak += 1
                    if streak >= _YIELD_EVERY:  # a stream that never blocks must not starve the event loop
                        streak = 0
                        await asyncio.sleep(0)
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError as e:
                if e.errno != errno.ENOTCONN:
                    raise
        finally:
            os.close(r)
            os.close(w)
