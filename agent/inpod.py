"""Connections the agent opens from inside a local pod's network namespace, as ztunnel's in-pod sockets do.

The agent lives in the node's namespace; a connection it made there for a pod left through the node's OUTPUT hook,
past the forward hook where CNIs that enforce egress NetworkPolicy with iptables or nftables match a pod by its
interface, so such a policy never applied to an enrolled pod's passthrough. Made from inside the pod's namespace
(agent/pod_netns.py finds it), the connection crosses the pod's interface and the node forwards it as the pod's own:
egress policy, the node's masquerade and a Service's DNAT apply to it as to the pod, and its replies reach it with no
help from the capture program or the DNAT table's reply rule.

Its SYN crosses the pod's interface like one of the pod's, where the capture program would take it to the outbound
listener again. The agent binds the socket first, so its source port is its own in the pod (no process of the pod
can hold that port meanwhile), and writes the connection's addresses and ports into the program's
``ambit_agent_conns`` map until the connect is done: that SYN, and its retransmissions, are let through. Where the
pod's namespace is not found (the runtime keeps it elsewhere, the directory is not mounted into the agent's pod) or
capture is not running, the caller connects from the node as before.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from typing import Protocol

from agent.addressing import Address
from agent.pod_netns import PodNetworks
from agent.redirect_errors import RedirectKernelError
from agent.sockets import connect_socket, connect_upstream
from common.log import kv

log = logging.getLogger("agent.inpod")


class CaptureExemption(Protocol):
    """What the capture program offers (agent.redirect.Redirector)."""

    def allow_agent_conn(self, src: Address, dst: Address) -> bool: ...

    def forget_agent_conn(self, src: Address, dst: Address) -> None: ...


class InPodConnector:
    def __init__(
        self, networks: PodNetworks, capture: CaptureExemption, is_local: Callable[[str], bool] = lambda ip: False
    ) -> None:
        self.networks = networks
        self.capture = capture
        # Whether an address is a pod of this node: HBONE to one (the same-node path turned off) is not let through
        # the source pod's interface, it must be captured as that pod's inbound there.
        self.is_local = is_local
        self._asked: set[str] = set()  # pod addresses asked for: their namespaces may be held open
        self._unfound: set[str] = set()  # warned about once, until the pod leaves

    async def connect(self, pod_ip: str, addr: Address, *, connect_timeout: float) -> socket.socket | None:
        """A connection to ``addr`` from inside the namespace of the local pod that owns ``pod_ip``; None when that
        namespace is unknown or capture cannot let its SYN pass (nothing was sent: connect from the node instead).
        Raises OSError / TimeoutError when the connect itself fails, as connect_upstream does."""
        if (":" in pod_ip) != (":" in addr[0]) or "%" in addr[0]:  # a zone names one of the node's interfaces
            return None
        self._asked.add(pod_ip)
        sock = self.networks.bound_socket(pod_ip)
        if sock is None:
            if pod_ip not in self._unfound:
                self._unfound.add(pod_ip)
                log.warning(
                    "pod network namespace not found: its connections leave from the node's",
                    extra=kv(pod_ip=pod_ip, dirs=",".join(self.networks.config.dirs)),
                )
            return None
        src: Address = sock.getsockname()[:2]
        try:
            allowed = self.capture.allow_agent_conn(src, addr)
        except RedirectKernelError as exc:
            log.warning("capture cannot let the agent's SYN pass", extra=kv(src=src, dst=addr, error=str(exc)))
            allowed = False
        except BaseException:
            sock.close()
            raise
        if not allowed:
            sock.close()
            return None
        try:
            await connect_socket(sock, addr, connect_timeout=connect_timeout)
        finally:
            self.capture.forget_agent_conn(src, addr)
        return sock

    async def dial(self, addr: Address, *, source_ip: str | None = None, connect_timeout: float = 5.0) -> socket.socket:
        """The HBONE pool's dial (agent.sockets.Dial): from inside the source pod, so the node forwards the tunnel as
        the pod's own traffic to the peer's 15008 (as ztunnel's in-pod sockets: an egress NetworkPolicy sees it);
        from the node's namespace where that cannot be (see :meth:`connect`) and to this node's own pods."""
        if source_ip is not None and not self.is_local(addr[0]):
            sock = await self.connect(source_ip, addr, connect_timeout=connect_timeout)
            if sock is not None:
                return sock
        return await connect_upstream(addr, source_ip=source_ip, connect_timeout=connect_timeout)

    def retain(self, pod_ips: Iterable[str]) -> None:
        """Let go of the namespaces of pods no longer enrolled here: an open descriptor keeps a deleted pod's
        namespace, and what is left in it, alive."""
        keep = set(pod_ips)
        for ip in self._asked - keep:
            self.networks.forget(ip)
        self._asked &= keep
        self._unfound &= keep

    def close(self) -> None:
        self.networks.close()
        self._asked.clear()
