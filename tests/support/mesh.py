"""Helpers for end-to-end tests on a mesh lab: wait for convergence and talk as a pod (many streams at once).
Observing agents, links and the live config lives in lab.observe (the demo uses it too)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lab import Lab, netns
from lab.mesh import wait_ready
from lab.observe import metric_lines, metrics

ETH_P_ALL = 0x0003


STRICT_DEMO = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec:
  mtls: {mode: STRICT}
"""
"""examples/basic's (and examples/dualstack's) enrolled namespace in STRICT mode, for lab.observe.config_file."""


def echo_on(sock: socket.socket, size: int = 1000) -> tuple[str, str]:
    """Echo ``size`` random bytes on a connected ``sock`` (closed after): ("ok" or what went wrong, the address
    that answered)."""
    data = os.urandom(size)
    try:
        with sock:
            peer = sock.getpeername()[0]
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
    except OSError as e:
        return f"failed: {e}", ""
    return ("ok" if got == data else f"{len(got)} bytes back"), peer


def echo_from(lab: Lab, pod: str, ip: str, port: int) -> tuple[str, str]:
    """(outcome, the address that answered) of an echo from ``pod`` (or the core netns, the lab's outside world, for
    "core") to ``ip``:``port``; see :func:`echo_on`."""
    try:
        if pod == "core":
            with netns.enter(lab.core_netns):
                sock = socket.create_connection((ip, port), timeout=5)
        else:
            sock = connect(lab, pod, ip, port, timeout=5)
    except OSError as e:
        return f"failed: {e}", ""
    return echo_on(sock)


def nft_in(netns_name: str, *args: str, script: str | None = None) -> str:
    """Run nft in a named netns (``script`` on stdin for ``-f -``); its output. Raises when nft refuses."""
    argv = ["nsenter", f"--net=/run/netns/{netns_name}", "nft", *args]
    return subprocess.run(argv, input=script, capture_output=True, text=True, check=True).stdout


def nft(lab: Lab, node: str, *args: str, script: str | None = None) -> str:
    """:func:`nft_in` a lab node's netns."""
    return nft_in(lab.node(node).netns, *args, script=script)


@contextlib.contextmanager
def table_held_elsewhere(netns_name: str, table: str) -> Iterator[None]:
    """Someone else's nftables table ``inet <table>`` in ``netns_name`` that the kernel lets no one else change (nft's
    ``owner`` flag: it belongs to the netlink socket of the process that made it, and goes when that process exits).
    An agent's write of its DNAT table there fails for real (EPERM) for as long as this lasts."""
    holder = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{netns_name}", "nft", "-i"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert holder.stdin is not None
    try:
        holder.stdin.write(f"delete table inet {table}\nadd table inet {table} {{ flags owner; }}\n")
        holder.stdin.flush()
        wait_for(lambda: "flags owner" in nft_in(netns_name, "list", "table", "inet", table), "the table")
        yield
    finally:
        holder.stdin.close()  # nft -i exits at the end of its input, and the kernel drops the table it owned
        try:
            holder.wait(10)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0, interval: float = 0.2) -> None:
    """Poll until ``predicate()`` holds. The timeout is a liveness bound for a hung system, not a measurement."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as e:  # the condition may raise while the system converges (e.g. a refused connection)
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last_error!r})" if last_error else ""))


def connect(lab: Lab, pod: str, ip: str, port: int, timeout: float = 5.0) -> socket.socket:
    with netns.enter(lab.pod(pod).netns):
        return socket.create_connection((ip, port), timeout=timeout)


async def _echo_one(sock: socket.socket, payload: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    received = bytearray()

    async def send() -> None:
        await loop.sock_sendall(sock, payload)
        sock.shutdown(socket.SHUT_WR)

    sender = asyncio.ensure_future(send())
    while chunk := await loop.sock_recv(sock, 1 << 18):
        received += chunk
    await sender
    sock.close()
    return bytes(received)


def parallel_echo(lab: Lab, pod: str, ip: str, port: int, streams: int, size: int) -> list[tuple[str, str]]:
    """Open ``streams`` connections from ``pod`` at once, echo ``size`` random bytes on each; returns
    (sent sha256, received sha256) pairs."""
    payloads = [os.urandom(size) for _ in range(streams)]
    socks = [connect(lab, pod, ip, port) for _ in range(streams)]

    async def run() -> list[bytes]:
        return await asyncio.wait_for(
            asyncio.gather(*(_echo_one(s, p) for s, p in zip(socks, payloads, strict=True))), 120
        )

    results = asyncio.run(run())
    return [
        (hashlib.sha256(p).hexdigest(), hashlib.sha256(r).hexdigest()) for p, r in zip(payloads, results, strict=True)
    ]


async def echo_through(lab: Lab, pod: str, dst: tuple[str, int], payload: bytes) -> str:
    """One connection from ``pod`` to an echo server at ``dst``: "ok", or what went wrong. The timeout is a liveness
    bound (SYNs dropped while no agent listens are sent again after 1 and 3 s), not a measurement."""
    loop = asyncio.get_running_loop()
    with netns.enter(lab.pod(pod).netns):
        sock = socket.socket(socket.AF_INET6 if ":" in dst[0] else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(30):
            await loop.sock_connect(sock, dst)
            await loop.sock_sendall(sock, payload)
            sock.shutdown(socket.SHUT_WR)
            got = bytearray()
            while chunk := await loop.sock_recv(sock, 65536):
                got += chunk
        return "ok" if got == payload else f"echo differs ({len(got)} of {len(payload)} bytes)"
    except (OSError, TimeoutError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        sock.close()


def kill_and_reap(pid: int) -> None:
    """kill -9, returning once the process has exited with all its threads (they share its descriptors): a SYN its
    dying listener still took would be reset by the kernel whatever the next agent does."""
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _exited(pid), f"process {pid} to exit", interval=0.01)


def _exited(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status and threads == [str(pid)]


def connect_through_restart(
    lab: Lab, agent: str, dst: tuple[str, int], while_down: Callable[[], None] = lambda: None
) -> list[str]:
    """Kill ``agent`` (-9: no drain), run ``while_down``, start it again, and open a connection from bench-mesh's
    client pod to the echo server ``dst`` every 50 ms from before the new process exists until it reports ready;
    returns each connection's outcome (see :func:`echo_through`)."""
    old = lab.process(agent)
    node = lab.node(agent.removeprefix("agent-"))

    async def run() -> list[str]:
        attempts: list[asyncio.Task[str]] = []
        kill_and_reap(old.pid)
        while_down()
        new = lab.spawn(old.netns, list(old.argv), old.name, role=old.role)
        ready = asyncio.create_task(asyncio.to_thread(wait_ready, node.netns, node.ip, 15021, new))
        while not ready.done():
            attempts.append(asyncio.create_task(echo_through(lab, "client", dst, os.urandom(2048))))
            await asyncio.sleep(0.05)
        await ready
        return list(await asyncio.gather(*attempts))

    return asyncio.run(run())


def fail_closed_drops(lab: Lab, node: str, ip: str) -> float:
    """What ``node``'s agent exports as dropped for want of a listener (fail closed) for the enrolled ``ip``."""
    lines = metric_lines(metrics(lab, node), "ambit_capture_fail_closed_drops_total", ip=ip)
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0
