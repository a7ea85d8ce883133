"""Socket plumbing shared by the agent's listeners: transparent listening sockets, the accept loop, and
upstream connections that keep the client's source address.

The eBPF redirect (`bpf_sk_assign`) hands connections for any address to a listener bound to 0.0.0.0 with
IP_TRANSPARENT; the original destination is then simply the accepted socket's local address. SO_REUSEPORT
lets an old and a new agent overlap during a restart, as ztunnel's listeners do.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import functools
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

from agent.addressing import is_loopback, socket_address
from common.log import kv

log = logging.getLogger("agent.sockets")

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)
# Linux's IP_BIND_ADDRESS_NO_PORT (not exported by Python's socket module); applies to IPv6 sockets as well.
IP_BIND_ADDRESS_NO_PORT = 24

Address = tuple[str, int]
Handler = Callable[[socket.socket, Address], Awaitable[None]]
Gone = Callable[[Address, Address], None]
Refused = Callable[[Address, Address, str], None]  # (client, original destination, reason)
# (fd, client address from accept) of the connection the current Listener task is handling
_ACCEPTED: contextvars.ContextVar[tuple[int, Address] | None] = contextvars.ContextVar("accepted", default=None)


def set_transparent(sock: socket.socket, *, ipv6: bool) -> None:
    """Let `sock` accept connections for, or bind to, addresses that are not the node's.

    Each family has its own option: 19 at the IPv6 level is IPV6_MULTICAST_LOOP, which the kernel accepts and
    which does nothing for a TCP socket. The caller says which family `sock` is: reading `sock.family` builds an
    enum, a few microseconds on each upstream connection."""
    if ipv6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


# TCP keepalive on every proxied socket, ztunnel's values (idle 180 s, then 9 probes 180 s apart; istio/ztunnel#1699).
# A connection whose peer vanished without FIN or RST is otherwise held forever, with its relay and descriptors: a
# pod un-enrolled mid-connection (its packets stop reaching the agent's socket), a node gone, a conntrack entry lost.
KEEPALIVE = (180, 180, 9)  # idle, interval, probes


def keep_alive(sock: socket.socket) -> None:
    """Turn TCP keepalive on with :data:`KEEPALIVE`. Accepted sockets inherit it from their listener."""
    idle, interval, probes = KEEPALIVE
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)


def transparent_listener(
    port: int, host: str = "0.0.0.0", *, transparent: bool = True, reuse_port: bool = True, backlog: int = 1024
) -> socket.socket:
    """A non-blocking listening socket; with `transparent` it accepts connections addressed anywhere."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if transparent:
            set_transparent(sock, ipv6=family == socket.AF_INET6)
        keep_alive(sock)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def canonical_ip(host: str) -> str:
    """``host`` with an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) written as IPv4.

    A dual-stack listener (``--listen-address ::``) sees IPv4 connections in that form, while workloads, policies
    and ``:authority`` know them by their IPv4 address; ztunnel canonicalises the same way."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def original_destination(sock: socket.socket) -> Address:
    """Where the client meant to connect: the local address of a socket accepted by a transparent listener."""
    name = sock.getsockname()
    return (canonical_ip(name[0]), int(name[1]))


_SO_ORIGINAL_DST = 80  # netfilter's SO_ORIGINAL_DST (SOL_IP) and IP6T_SO_ORIGINAL_DST (SOL_IPV6)


def destination_before_nat(sock: socket.socket, local: Address) -> Address | None:
    """Where the client dialled before the node rewrote it (a kube-proxy ClusterIP, from conntrack), or None when
    nothing rewrote it (no conntrack entry, or the same address as ``local``).

    Capture assigns an enrolled pod's SYN to the outbound listener at its interface, before netfilter; kube-proxy
    then DNATs the VIP to the endpoint it picks, and the accepted socket's own address is that endpoint. The
    service the pod asked for is only in conntrack. One getsockopt; ENOENT where conntrack has no entry."""
    v6 = ":" in local[0]
    try:
        if v6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, _SO_ORIGINAL_DST, 28)  # sockaddr_in6 (SOL_IPV6)
            ip = socket.inet_ntop(socket.AF_INET6, raw[8:24])
        else:  # also an IPv4 connection on a dual-stack socket (SOL_IP options reach the IPv4 side)
            raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)  # sockaddr_in
            ip = socket.inet_ntop(socket.AF_INET, raw[4:8])
    except OSError:
        return None
    dialled = (ip, int.from_bytes(raw[2:4], "big"))
    return None if dialled == local else dialled


def peer_or_close(sock: socket.socket) -> Address | None:
    """The client's address, or None with the socket closed: a client that reset before its handler ran is
    gone, and there is nobody to refuse or log against. Under a :class:`Listener` it is the address accept(2) gave
    (the Listener already reported the ones gone before their handler ran), so a reset landing after that check
    still leaves the handler an address to log the failed connection against."""
    accepted = _ACCEPTED.get()
    if accepted is not None and accepted[0] == sock.fileno():
        return accepted[1]
    try:
        name = sock.getpeername()
    except OSError:
        sock.close()
        return None
    return (canonical_ip(name[0]), int(name[1]))


def make_nonblocking(sock: socket.socket) -> None:
    """Non-blocking mode, without the ioctl when Python already knows the socket is (made with SOCK_NONBLOCK or
    set before): relays take sockets the listener or connect_upstream already made non-blocking."""
    if sock.getblocking():
        sock.setblocking(False)


def abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer learns at once that the connection was cut, not finished."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    sock.close()


def reset_if_orphaned(sock: socket.socket) -> None:
    """SO_LINGER 0 on a socket a relay owns, so that the kernel's close of it when the agent dies (kill -9, OOM) sends
    RST: with the default it sent FIN, and the pod took the cut stream for a complete one (a truncated download or
    upload that looked whole). The relay's own clean end undoes it (:func:`close_gracefully`)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)


def close_gracefully(sock: socket.socket) -> None:
    """Close with the ordinary FIN handshake, also after :func:`reset_if_orphaned` (RST would drop bytes the peer has
    not acknowledged yet)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
    sock.close()


_LINGER_ZERO = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)


def refuse_forged_loopback(conn: socket.socket, listener: str, client: Address, dst: Address) -> None:
    """Reset a connection addressed to loopback by a client that is not on loopback, before any handler sees it.

    The kernel drops packets for a loopback address that arrive from outside as martians, unless the node sets
    net.ipv4.conf.*.route_localnet=1, as kube-proxy's iptables mode does for NodePorts on localhost. Then a pod with
    CAP_NET_RAW (in the runtimes' default set) can write a SYN to 127.0.0.1 out of its interface (CVE-2020-8558),
    and an enrolled pod's SYN is assigned to the outbound listener whatever its destination. ztunnel's outbound
    would connect to the pod's own loopback from inside the pod; ours, in the node's network namespace, connected to
    the node's, from the node's loopback address: the admin port, the kubelet's 10248, kube-proxy's 10249 (measured
    in the lab: a pod read the admin port's answers). No process of the node connects that way: it would use a
    loopback source."""
    log.warning("connection to loopback from elsewhere refused", extra=kv(listener=listener, client=client, dst=dst))
    abort(conn)


class Readiness:
    """A reader or writer callback on one fd, registered with the loop only while it is wanted: relays flip it on
    every would-block and every drain, and each real change is an epoll_ctl, so an unchanged wish costs nothing."""

    __slots__ = ("_add", "_callback", "_fd", "_remove", "watching")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, callback: Callable[[], None], *, write: bool) -> None:
        self._add = loop.add_writer if write else loop.add_reader
        self._remove = loop.remove_writer if write else loop.remove_reader
        self._fd = fd
        self._callback = callback
        self.watching = False

    def watch(self, want: bool) -> None:
        if want != self.watching:
            self.watching = want
            if want:
                self._add(self._fd, self._callback)
            else:
                self._remove(self._fd)


class Listener:
    """Accepts on `sock` and runs `handler(conn, original_destination(conn))` as a task per connection.

    Accepting runs from a reader callback that drains the backlog until it would block: a connection costs one
    accept(2) and a task, not a future and two epoll registrations per accept as `loop.sock_accept` does.
    A handler's exception is logged and its socket closed; it never stops the accept loop.

    ``gone(client, orig_dst)`` is told of a connection its client reset before the handler ran, with the address
    accept(2) gave: the socket no longer knows its peer (ENOTCONN), and handlers drop such a connection unlogged.
    A pod that connects and resets at once (a connect scan) otherwise left no trace.

    ``max_per_client``: at most that many connections of one client address handled at once; more are reset at
    accept. Every pod of a node shares its agent's descriptors (two sockets and, spliced, two pipes per connection:
    a pod's flood of 4402 connections took a lab agent's 20000, and accept's EMFILE then refused every pod), and
    ztunnel has no such bound either; off by default. ``refused(client, orig_dst, reason)`` is told of what the
    listener resets itself: ``client_connection_limit``, and ``forged_loopback`` (see refuse_forged_loopback).
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        name: str,
        orig_dst: Callable[[socket.socket], Address] = original_destination,
        gone: Gone | None = None,
        *,
        max_per_client: int | None = None,
        refused: Refused | None = None,
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.name = name
        self.orig_dst = orig_dst
        self.gone = gone
        self.max_per_client = max_per_client
        self.refused = refused
        self.per_client: dict[str, int] = {}  # connections being handled, by client address (with max_per_client)
        self.tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backoff: asyncio.TimerHandle | None = None

    @property
    def address(self) -> Address:
        return original_destination(self.sock)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._accept_ready)

    def _accept_ready(self) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            try:
                conn, client = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                log.error("accept failed", extra=kv(listener=self.name, error=str(e)))
                # out of descriptors (EMFILE/ENFILE/ENOBUFS/ENOMEM): let connections finish instead of spinning
                loop.remove_reader(self.sock.fileno())
                self._backoff = loop.call_later(0.1, self._resume)
                return
            conn.setblocking(False)
            limit = self.max_per_client
            if limit is not None:
                held = self.per_client.get(client[0], 0)
                if held >= limit:
                    self._turn_away(conn, client)
                    continue
                self.per_client[client[0]] = held + 1
            # Like the upstream side: a proxy must not hold a small write back for the client's delayed ACK.
            with contextlib.suppress(OSError):  # a client that already reset; its handler finds out
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._run(conn, client))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            if limit is not None:
                task.add_done_callback(functools.partial(self._release, client[0]))

    def _turn_away(self, conn: socket.socket, client: Address) -> None:
        """Reset a connection over ``max_per_client``, reported to ``refused`` (logged at DEBUG otherwise)."""
        peer = (canonical_ip(client[0]), int(client[1]))
        try:
            dst = self.orig_dst(conn)
        except OSError:  # reset already: nothing to tell about where it went
            dst = ("", 0)
        abort(conn)
        if self.refused is not None:
            self.refused(peer, dst, "client_connection_limit")
        else:
            log.debug("connection over the per-client limit refused", extra=kv(listener=self.name, client=peer))

    def _release(self, ip: str, _task: object) -> None:
        left = self.per_client[ip] - 1
        if left:
            self.per_client[ip] = left
        else:
            del self.per_client[ip]

    def _resume(self) -> None:
        self._backoff = None
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.add_reader(self.sock.fileno(), self._accept_ready)

    async def _run(self, conn: socket.socket, client: Address) -> None:
        try:
            dst = self.orig_dst(conn)
            if is_loopback(dst[0]) and not is_loopback(canonical_ip(client[0])):
                if self.refused is not None:  # logged and counted there, once
                    abort(conn)
                    self.refused((canonical_ip(client[0]), int(client[1])), dst, "forged_loopback")
                else:
                    refuse_forged_loopback(conn, self.name, client, dst)
                return
            if self.gone is not None:
                peer = (canonical_ip(client[0]), int(client[1]))
                if not _connected(conn):
                    self.gone(peer, dst)
                    conn.close()
                    return
                _ACCEPTED.set((conn.fileno(), peer))  # this task's own context: handlers skip getpeername
            await self.handler(conn, dst)
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as e:
            log.exception("connection handler failed", extra=kv(listener=self.name, error=repr(e)))
            conn.close()

    async def stop_accepting(self) -> None:
        """Close the listening socket but leave connections being handled alone (graceful drain)."""
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        if self._loop is not None and self.sock.fileno() >= 0:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    async def close(self) -> None:
        """Stop accepting and cut every connection still being handled."""
        await self.stop_accepting()
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


def read_waiting(sock: socket.socket, limit: int) -> bytes:
    """Up to `limit` bytes the peer has already sent, without waiting: b"" when nothing has arrived yet (or at
    EOF, which the next read sees again), and without a syscall when `limit` is 0. Raises OSError when the
    connection failed."""
    if limit <= 0:
        return b""
    try:
        return sock.recv(limit, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return b""


class Dial(Protocol):
    """How an upstream connection is made: connect_upstream, or from inside the source pod (agent/inpod.py)."""

    async def __call__(
        self, addr: Address, *, source_ip: str | None = None, connect_timeout: float = 5.0
    ) -> socket.socket: ...


async def connect_upstream(
    addr: Address, *, source_ip: str | None = None, connect_timeout: float = 5.0, mark: int | None = None
) -> socket.socket:
    """Connect to `addr`, from `source_ip` (transparent bind) when given and the node allows it.

    Keeping the client's address needs the redirect program on the destination pod's veth to bring replies
    back to this socket; where binding is not possible (no such local route, no privilege) the connection is
    made from the node's own address instead of failing. The source port is left to `connect`
    (IP_BIND_ADDRESS_NO_PORT): a port picked at bind time must be free for every destination, which makes the
    kernel search its bind table on each connection (measured ~5% of the inbound agent's CPU per connection) and
    runs out of ports sooner under many connections from one client.
    """
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    if source_ip is not None and (":" in source_ip) == (family == socket.AF_INET6):
        try:
            set_transparent(sock, ipv6=family == socket.AF_INET6)
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
        except OSError as e:
            log.debug("source address not kept", extra=kv(source=source_ip, upstream=addr, error=str(e)))
            sock.close()
            return await connect_upstream(addr, connect_timeout=connect_timeout, mark=mark)
        except BaseException:
            sock.close()
            raise
    await connect_socket(sock, addr, connect_timeout=connect_timeout, mark=mark)
    return sock


async def connect_socket(
    sock: socket.socket, addr: Address, *, connect_timeout: float = 5.0, mark: int | None = None
) -> None:
    """Connect a fresh non-blocking socket (bound or not) with the upstream options: no Nagle, keepalive, `mark`.
    Closes it when anything fails, and re-raises."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keep_alive(sock)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        await _connect(sock, addr, connect_timeout)
    except BaseException:
        sock.close()
        raise


async def _connect(sock: socket.socket, addr: Address, limit: float) -> None:
    """A non-blocking connect to a numeric address.

    Not `loop.sock_connect`: uvloop resolves every address, numeric ones too, through libuv's getaddrinfo thread
    pool, so each upstream connection paid two thread hand-offs on the connection's critical path (measured
    ~0.2 ms idle, milliseconds on a loaded node). A pod on this node (or across a veth pair) usually answers the
    SYN inside the connect call itself, so the socket is checked once before waiting for it to become writable.
    """
    err = sock.connect_ex(socket_address(addr))  # an IPv6 zone (fe80::1%3) as the scope id
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0 and not _connected(sock):
            await _writable(sock, limit)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


async def _writable(sock: socket.socket, limit: float) -> None:
    """Wait for `sock` to become writable, raising TimeoutError after `limit` seconds."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _settle, ready, None)
    timer = loop.call_later(limit, _settle, ready, TimeoutError(f"connect timed out after {limit:g} s"))
    try:
        await ready
    finally:
        timer.cancel()
        loop.remove_writer(fd)


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
