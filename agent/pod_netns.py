"""Upstream sockets created inside a local pod's network namespace ("in-pod" sockets, as ztunnel's).

The agent runs in the node's netns. A passthrough connection it opens there leaves through the node's OUTPUT hook,
so a CNI's egress NetworkPolicy, which matches the pod's interface in the node's FORWARD hook, never sees it. A
socket created inside the pod's netns leaves through the pod's own interface instead, as the pod's connection would
have. istio/ztunnel does the same (src/inpod/netns.rs `InpodNetns::run`: setns into the pod netns on the current
thread, create the socket, setns back; the return "must never fail"). ztunnel is handed each pod's netns by its CNI
plugin; this agent finds it by itself in the directories where runtimes bind-mount pod namespaces, by asking each
namespace whether it can bind the pod's address.

setns(2) moves only the calling thread, and every enter is followed by a leave with no await in between, so the
asyncio loop thread is never seen in a pod's netns by anything else. Only socket() runs inside: a socket keeps the
netns it was created in, and bind() on it resolves addresses there wherever the thread is afterwards.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from common import netns
from common.log import kv

log = logging.getLogger("agent.pod_netns")

STRANDED_EXIT_CODE = 70  # EX_SOFTWARE: the DaemonSet restarts the agent
_SELF_NETNS = "/proc/thread-self/ns/net"
_MAX_MISSES = 1024
_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC

NetnsId = tuple[int, int]  # (st_dev, st_ino) of a netns file: the same namespace under any name


class PodNetnsError(Exception):
    """A namespace the agent cannot enter or leave (setns not permitted, or the way back failed)."""


@dataclass(frozen=True)
class PodNetnsConfig:
    # where runtimes bind-mount pod netns (containerd: cni-<uuid>; CRI-O; the lab's `ip netns add`)
    dirs: tuple[str, ...] = ("/var/run/netns", "/run/netns")
    prefix: str = ""  # only entries whose name starts with it (the lab passes "<lab>-pod-"; Kubernetes: "")
    rescan_interval: float = 1.0  # a miss rescans the dirs at most this often per address (misses cached as long)


@dataclass
class _Netns:
    fd: int
    path: str
    ident: NetnsId
    ips: set[str]


class PodNetworks:
    """Finds the netns holding a local pod's address and makes that pod's upstream sockets in it.

    Holds one fd per namespace that holds a cached address (an fd keeps a deleted namespace alive, so fds are
    dropped with the last address: `forget`, a stale bind, or the entry vanishing from the dirs at a rescan).
    """

    def __init__(
        self,
        config: PodNetnsConfig = PodNetnsConfig(),  # frozen: one shared default is safe
        *,
        clock: Callable[[], float] = time.monotonic,
        setns: Callable[[int], None] | None = None,
        exit_process: Callable[[int], object] = os._exit,
    ) -> None:
        self.config = config
        # /var/run is a symlink to /run on most distributions: list that directory once, not twice
        self._dirs = tuple(dict.fromkeys(os.path.realpath(d) for d in config.dirs))
        self._clock = clock
        self._setns = setns or netns.setns
        self._exit = exit_process
        self._home = os.open(_SELF_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._home)
        self._home_id: NetnsId = (st.st_dev, st.st_ino)
        try:  # a no-op switch, as ztunnel's InpodNetns::capable: fail at start, not on the first connection
            self._setns(self._home)
        except OSError as e:
            os.close(self._home)
            raise PodNetnsError(f"cannot switch network namespaces (setns: {e.strerror})") from e
        self._held: dict[NetnsId, _Netns] = {}
        self._by_ip: dict[str, _Netns] = {}
        self._missed: dict[str, float] = {}  # ip -> when a scan last failed to find it

    def __len__(self) -> int:
        return len(self._held)

    def bound_socket(self, ip: str) -> socket.socket | None:
        """A non-blocking TCP socket created inside the network namespace that holds `ip` (a local pod's address),
        already bound to (ip, 0) so its source port is known before connect; None when no namespace in the dirs
        holds it. OSError when the socket cannot be made or bound for another reason (EMFILE, no free port)."""
        if self._home < 0:
            raise PodNetnsError("bound_socket after close")
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        ns = self._by_ip.get(ip)
        if ns is not None:
            sock = self._bind_in(ns, ip, family)
            if sock is not None:
                return sock
            log.info("cached pod netns lost the address; rescanning", extra=kv(ip=ip, netns=ns.path))
            self.forget(ip)  # the pod was replaced or its address moved: one rescan, whatever the miss cache says
        else:
            missed = self._missed.get(ip)
            if missed is not None and self._clock() - missed < self.config.rescan_interval:
                return None
        return self._scan(ip, family)

    def forget(self, ip: str) -> None:
        """The workload left: drop its namespace, closing the fd when no other cached address uses it."""
        self._missed.pop(ip, None)
        ns = self._by_ip.pop(ip, None)
        if ns is not None:
            ns.ips.discard(ip)
            if not ns.ips:
                self._release(ns)

    def close(self) -> None:
        """Close every fd it holds (the agent's own netns too): no bound_socket after this."""
        for ns in list(self._held.values()):
            self._release(ns)
        self._by_ip.clear()
        self._missed.clear()
        if self._home >= 0:
            os.close(self._home)
            self._home = -1

    def _scan(self, ip: str, family: int) -> socket.socket | None:
        """Ask every namespace in the dirs whether `ip` is local there: new namespaces first, then those already
        holding another address (the other family of a dual-stack pod)."""
        seen: dict[NetnsId, str] = {}
        for entry in self._entries():
            try:
                st = os.stat(entry)
            except OSError:
                continue  # deleted while listing
            ident = (st.st_dev, st.st_ino)
            if stat.S_ISREG(st.st_mode) and ident != self._home_id:
                seen.setdefault(ident, entry)
        for ident in [i for i in self._held if i not in seen]:  # its entry is gone: the pod was deleted
            for gone in list(self._held[ident].ips):
                self.forget(gone)
        fresh = [(i, p) for i, p in seen.items() if i not in self._held]
        for ident, path in fresh + [(i, p) for i, p in seen.items() if i in self._held]:
            ns = self._held.get(ident) or self._open(path, ident)
            if ns is None:
                continue
            try:
                sock = self._bind_in(ns, ip, family, check_nonlocal=True)
            except BaseException:
                if not ns.ips:
                    self._release(ns)
                raise
            if sock is not None:
                ns.ips.add(ip)
                self._held[ident] = ns
                self._by_ip[ip] = ns
                self._missed.pop(ip, None)
                log.debug("pod netns found", extra=kv(ip=ip, netns=path, scanned=len(seen)))
                return sock
            if not ns.ips:
                self._release(ns)
        now = self._clock()
        if len(self._missed) >= _MAX_MISSES:  # a crowd of unknown addresses: keep only the unexpired
            self._missed = {k: t for k, t in self._missed.items() if now - t < self.config.rescan_interval}
        self._missed[ip] = now
        log.debug("no pod netns holds the address", extra=kv(ip=ip, scanned=len(seen)))
        return None

    def _entries(self) -> list[str]:
        found = []
        for d in self._dirs:
            try:
                names = os.listdir(d)
            except OSError:
                continue  # a runtime that uses the other directory
            found += [os.path.join(d, n) for n in names if n.startswith(self.config.prefix)]
        return found

    def _open(self, path: str, ident: NetnsId) -> _Netns | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            log.debug("cannot open a netns", extra=kv(netns=path, error=e.strerror))
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != ident:  # replaced between stat and open
            os.close(fd)
            return None
        return _Netns(fd, path, ident, set())

    def _release(self, ns: _Netns) -> None:
        for ip in ns.ips:
            self._by_ip.pop(ip, None)
        ns.ips.clear()
        if self._held.get(ns.ident) is ns:
            del self._held[ns.ident]
        if ns.fd >= 0:
            os.close(ns.fd)
            ns.fd = -1

    def _bind_in(self, ns: _Netns, ip: str, family: int, check_nonlocal: bool = False) -> socket.socket | None:
        """A socket made in `ns` and bound to (ip, 0) there; None when `ip` is not local in `ns` or `ns` cannot be
        entered (then it is released). No IP_BIND_ADDRESS_NO_PORT: the caller needs the port before connect. No
        IP_TRANSPARENT or IP_FREEBIND either: they would make the bind succeed in any namespace."""
        try:
            self._setns(ns.fd)
        except OSError as e:  # EPERM, or not a netns file at all (EINVAL)
            log.debug("cannot enter a netns; skipping it", extra=kv(netns=ns.path, ip=ip, error=e.strerror))
            self._release(ns)
            return None
        try:
            sock = socket.socket(family, _STREAM)
        finally:
            self._leave(ns)
        try:
            sock.bind((ip, 0))
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRNOTAVAIL:
                return None
            raise
        if check_nonlocal and self._binds_anything(ns, family):
            log.debug("netns binds non-local addresses; not trusting it", extra=kv(netns=ns.path, ip=ip))
            sock.close()
            return None
        return sock

    def _binds_anything(self, ns: _Netns, family: int) -> bool:
        """ip_nonlocal_bind=1 in a namespace lets every bind succeed there, so a successful bind proves nothing.
        /proc/sys/net resolves against the opening thread's netns, so it is read from inside."""
        key = "ipv6" if family == socket.AF_INET6 else "ipv4"
        try:
            self._setns(ns.fd)
        except OSError:
            return True
        try:
            with open(f"/proc/sys/net/{key}/ip_nonlocal_bind") as f:
                return f.read().strip() != "0"
        except OSError:
            return False  # no /proc/sys here: the bind's answer is all there is
        finally:
            self._leave(ns)

    def _leave(self, ns: _Netns) -> None:
        """Back to the agent's netns. A failure strands this thread in a pod's netns, where every later socket,
        listener and route lookup would be wrong: the process must end (the DaemonSet restarts it)."""
        try:
            self._setns(self._home)
        except OSError as e:
            log.critical(
                "cannot return to the agent's network namespace; exiting",
                extra=kv(netns=ns.path, error=e.strerror, errno=e.errno),
            )
            self._exit(STRANDED_EXIT_CODE)
            raise PodNetnsError(f"stranded in {ns.path}: {e.strerror}") from e
