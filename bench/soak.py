"""Soak: mixed connections through a mesh lab for minutes or hours, watching both agents for leaks.

A benchmark run lasts minutes and measures speed; what a platform team fears after a rollout is the slow kind of
failure: memory, descriptors or buffered bytes that grow with every odd connection until the agent is killed. This
drives the kinds of connection that leave state behind when a path forgets to clean up (hash-checked echoes of
1 B-256 KiB cross-node and same-node, a reader that stalls while its peer keeps sending, a reset right after
connecting) and samples each agent's RSS, open descriptors, bytes its relays keep and connections open. After a
warm-up it drains and takes a baseline; at the end it drains again and compares. Exit status 1 when an echo failed,
an agent did not drain, or it kept more than it held after the warm-up.

    python -m bench.soak [--minutes 10] [--concurrency 20] [--interval 5] [--out DIR]

Writes soak.json (every sample) and soak.png (the agents' RSS and descriptors over time) to the results directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import secrets
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.cpu import rss_bytes
from bench.progress import Progress
from lab import Lab, netns
from lab.observe import metrics

TOPOLOGY = Path(__file__).resolve().parent / "topology" / "mesh"
CLIENT_POD = "bench-mesh/client"
TARGETS = {"cross": "bench-mesh/server", "same": "bench-mesh/server-local"}  # from the client pod on node1
ECHO_PORT = 9000  # every lab pod's workload echoes here
ECHO_SIZES = (1, 100, 4096, 65536, 262144)
STALL_BYTES = 4 * 1024 * 1024  # more than the windows and socket buffers along the path hold
STALL_SECONDS = 1.0
OP_TIMEOUT = 30.0
DRAIN_TIMEOUT = 30.0
SETTLE_SECONDS = 12.0  # after a drain, before the sample that counts: the agent's heap trimmer looks every 5 s
# What an agent may keep after the final drain beyond what it held after the warm-up: sockets of pooled HBONE
# connections that were not open at the baseline, and the allocator's high-water marks. Pipes are not compared: the
# same-node relay keeps up to 64 empty ones for reuse (agent/relay.py), as many as its busiest moment needed.
FD_SLACK = 4
RSS_SLACK_MB = 8.0
RSS_SLACK_FRACTION = 0.15


@dataclass
class Sample:
    t: float  # seconds since the start
    node: str
    rss_mb: float
    sockets: int  # descriptors: sockets, pipes, everything else (maps, files, eventfds)
    pipes: int
    other_fds: int
    buffered_bytes: float  # ambit_relay_buffered_bytes
    sockets_open: float  # istio_tcp_sockets_open, both reporters
    # Where the RSS is (resident_by_kind): a heap that grows while Python's own objects do not is fragmentation or
    # C allocations (OpenSSL); anonymous mappings are Python's object arenas and blocks glibc mmapped.
    heap_mb: float = 0.0
    anon_mb: float = 0.0
    file_mb: float = 0.0
    threads: int = 0


@dataclass
class Tally:
    ok: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    first_failures: list[str] = field(default_factory=list)

    def fail(self, kind: str, reason: str) -> None:
        self.failed[kind] += 1
        if len(self.first_failures) < 10:
            self.first_failures.append(f"{kind}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.ok.values()) + sum(self.failed.values())


def metric_sum(text: str, name: str) -> float:
    """Sum of every series of ``name`` in a Prometheus text exposition (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def open_fds(pid: int) -> Counter[str]:
    """The process's descriptors by kind: "socket", "pipe", "other"."""
    kinds: Counter[str] = Counter()
    fd_dir = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                target = os.readlink(f"{fd_dir}/{fd}")
                kinds[target.split(":", 1)[0] if target.startswith(("socket:", "pipe:")) else "other"] += 1
    return kinds


def resident_by_kind(pid: int) -> Counter[str]:
    """The process's resident bytes by mapping, from /proc/<pid>/smaps: "heap" (glibc's main arena, grown with brk),
    "anon" (other anonymous mappings: Python's 1 MiB object arenas, blocks glibc mmapped, other threads' arenas),
    "file" (the interpreter, libraries, mapped files) and "other" (stacks, vdso). Empty when the process is gone."""
    kinds: Counter[str] = Counter()
    kind = "other"
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("Rss:"):
                kinds[kind] += int(line.split()[1]) * 1024
            elif not line[0].isupper():  # a mapping's header: address range, perms, offset, device, inode, name
                name = fields[5].strip() if len(fields := line.split(maxsplit=5)) == 6 else ""
                if name == "[heap]":
                    kind = "heap"
                elif not name:
                    kind = "anon"
                else:
                    kind = "file" if name.startswith("/") else "other"
    return kinds


def threads(pid: int) -> int:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/task"))
    return 0


def verdict(baseline: list[Sample], final: list[Sample], drained: bool, tally: Tally) -> list[str]:
    """What went wrong, one line each; empty when the soak passed. ``baseline`` and ``final`` hold one sample per
    agent, taken after the warm-up's drain and after the last one."""
    problems = []
    if tally.failed:
        done = tally.total
        problems.append(f"{sum(tally.failed.values())} of {done} connections failed: {'; '.join(tally.first_failures)}")
    if not drained:
        left = ", ".join(f"{s.node}: {s.sockets_open:.0f} open, {s.buffered_bytes:.0f} B buffered" for s in final)
        problems.append(f"the agents did not drain within {DRAIN_TIMEOUT:.0f} s of the traffic stopping ({left})")
    before = {s.node: s for s in baseline}
    for s in final:
        b = before.get(s.node)
        if b is None:
            problems.append(f"{s.node}: no baseline sample")
            continue
        held, had = s.sockets + s.other_fds, b.sockets + b.other_fds
        if held > had + FD_SLACK:
            problems.append(
                f"{s.node}: {held} descriptors other than pipes at the end ({s.sockets} sockets), {had} after the "
                f"warm-up ({b.sockets} sockets)"
            )
        allowed = b.rss_mb + max(RSS_SLACK_MB, b.rss_mb * RSS_SLACK_FRACTION)
        if s.rss_mb > allowed:
            problems.append(f"{s.node}: RSS {s.rss_mb:.1f} MB at the end, {b.rss_mb:.1f} MB after the warm-up")
    return problems


def rss_slope(samples: list[Sample], node: str) -> float:
    """Least-squares RSS trend of one agent over the second half of the run, in MB per hour (a leak that the end
    comparison's slack hides still shows as a steady climb here)."""
    points = [(s.t, s.rss_mb) for s in samples if s.node == node]
    points = points[len(points) // 2 :]
    if len(points) < 3:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mr = sum(r for _, r in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mt) * (r - mr) for t, r in points) / var * 3600


class Driver:
    """Connections from the client pod, created inside its netns and run on this process's event loop."""

    def __init__(self, lab: Lab, tally: Tally, rng: random.Random) -> None:
        self.client_netns = lab.pod(CLIENT_POD).netns
        self.targets = {kind: lab.pod(key).ip for kind, key in TARGETS.items()}
        self.tally = tally
        self.rng = rng

    async def _connect(self, ip: str) -> socket.socket:
        with netns.enter(self.client_netns):
            sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (ip, ECHO_PORT))
        except BaseException:
            sock.close()
            raise
        return sock

    async def echo(self, where: str) -> None:
        loop = asyncio.get_running_loop()
        payload = self.rng.randbytes(self.rng.choice(ECHO_SIZES))
        sock = await self._connect(self.targets[where])
        with sock:

            async def send() -> None:
                await loop.sock_sendall(sock, payload)
                sock.shutdown(socket.SHUT_WR)

            async def receive() -> bytes:
                got = bytearray()
                while chunk := await loop.sock_recv(sock, 65536):
                    got += chunk
                return bytes(got)

            _, back = await asyncio.gather(send(), receive())
        if hashlib.sha256(back).digest() != hashlib.sha256(payload).digest():
            raise ValueError(f"echo of {len(payload)} bytes came back as {len(back)} different bytes")

    async def stall(self) -> None:
        """Send far more than the path buffers without reading the echo, then close with the echo unread (RST)."""
        sock = await self._connect(self.targets["cross"])
        with sock:
            sending = asyncio.ensure_future(asyncio.get_running_loop().sock_sendall(sock, bytes(STALL_BYTES)))
            await asyncio.sleep(STALL_SECONDS)
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sending

    async def reset(self) -> None:
        sock = await self._connect(self.targets[self.rng.choice(("cross", "same"))])
        with sock:
            sock.send(b"x" * 100)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def pick(self) -> tuple[str, Callable[[], object]]:
        roll = self.rng.random()
        if roll < 0.45:
            return "echo_cross", lambda: self.echo("cross")
        if roll < 0.8:
            return "echo_same", lambda: self.echo("same")
        if roll < 0.9:
            return "stall", self.stall
        return "reset", self.reset

    async def run(self, seconds: float, concurrency: int) -> None:
        end = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < end:
                kind, op = self.pick()
                try:
                    await asyncio.wait_for(op(), OP_TIMEOUT)  # type: ignore[arg-type]
                    self.tally.ok[kind] += 1
                except (OSError, ValueError, TimeoutError) as exc:
                    self.tally.fail(kind, f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


class Watcher:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.start = time.monotonic()
        self.samples: list[Sample] = []
        self.pids = {
            r.name.removeprefix("agent-"): r.pid for r, alive in lab.processes() if r.role == "agent" and alive
        }
        if set(self.pids) != {"node1", "node2"}:
            raise RuntimeError(f"expected a live agent on node1 and node2, found {sorted(self.pids)}")

    def sample(self) -> list[Sample]:
        now = []
        for node, pid in sorted(self.pids.items()):
            text = metrics(self.lab, node)
            fds = open_fds(pid)
            resident = resident_by_kind(pid)
            now.append(
                Sample(
                    t=round(time.monotonic() - self.start, 1),
                    node=node,
                    rss_mb=round(rss_bytes(pid) / 1e6, 1),
                    sockets=fds["socket"],
                    pipes=fds["pipe"],
                    other_fds=fds["other"],
                    buffered_bytes=metric_sum(text, "ambit_relay_buffered_bytes"),
                    sockets_open=metric_sum(text, "istio_tcp_sockets_open"),
                    heap_mb=round(resident["heap"] / 1e6, 1),
                    anon_mb=round(resident["anon"] / 1e6, 1),
                    file_mb=round(resident["file"] / 1e6, 1),
                    threads=threads(pid),
                )
            )
        self.samples.extend(now)
        return now

    async def drain(self) -> tuple[bool, list[Sample]]:
        """Sample until no agent holds a connection or a buffered byte, or DRAIN_TIMEOUT passed; then, once
        SETTLE_SECONDS are over, the sample that counts."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            now = self.sample()
            drained = all(s.sockets_open == 0 and s.buffered_bytes == 0 for s in now)
            if drained or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        await asyncio.sleep(SETTLE_SECONDS)
        return drained, self.sample()


def _status(tally: Tally, now: list[Sample]) -> str:
    agents = "  ".join(f"{s.node} {s.rss_mb:.0f} MB {s.sockets_open:.0f} conns {s.sockets} sockets" for s in now)
    return f"{tally.total:,} conns, {sum(tally.failed.values())} failed  {agents}"


async def soak(lab: Lab, minutes: float, concurrency: int, interval: float, warmup: float) -> dict[str, object]:
    tally = Tally()
    driver = Driver(lab, tally, random.Random(secrets.randbits(32)))
    watcher = Watcher(lab)
    progress = Progress(warmup + minutes * 60 + 2 * SETTLE_SECONDS)
    watcher.sample()
    progress.step(f"soak warm-up ({warmup:.0f} s)", warmup)
    await driver.run(warmup, concurrency)
    drained, baseline = await watcher.drain()
    if not drained:
        progress.note("the agents did not drain after the warm-up; the baseline is taken anyway")

    traffic = asyncio.ensure_future(driver.run(minutes * 60, concurrency))
    while not traffic.done():
        await asyncio.wait({traffic}, timeout=interval)
        progress.step(_status(tally, watcher.sample()), interval)
    await traffic
    drained, final = await watcher.drain()
    progress.finish()
    problems = verdict(baseline, final, drained, tally)
    return {
        "minutes": minutes,
        "concurrency": concurrency,
        "connections": dict(tally.ok),
        "failed": dict(tally.failed),
        "first_failures": tally.first_failures,
        "baseline": [asdict(s) for s in baseline],
        "final": [asdict(s) for s in final],
        "rss_slope_mb_per_hour": {node: round(rss_slope(watcher.samples, node), 2) for node in watcher.pids},
        "problems": problems,
        "samples": [asdict(s) for s in watcher.samples],
    }


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [Sample(**s) for s in result["samples"]]  # type: ignore[attr-defined]
    fig, (ax_rss, ax_fds) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for i, node in enumerate(sorted({s.node for s in samples})):
        mine = [s for s in samples if s.node == node]
        t = [s.t / 60 for s in mine]
        color = f"C{i}"
        ax_rss.plot(t, [s.rss_mb for s in mine], color=color, label=f"agent {node}")
        ax_rss.plot(t, [s.heap_mb for s in mine], color=color, linestyle="--", label=f"agent {node} heap")
        ax_fds.plot(t, [s.sockets for s in mine], color=color, label=f"agent {node} sockets")
        ax_fds.plot(t, [s.pipes for s in mine], color=color, linestyle=":", label=f"agent {node} pipes")
    baseline_t = max(s["t"] for s in result["baseline"]) / 60  # type: ignore[attr-defined]
    for ax in (ax_rss, ax_fds):
        ax.axvline(baseline_t, color="grey", linewidth=0.8, linestyle="--")
    ax_rss.set_ylabel("RSS (MB)")
    ax_fds.set_ylabel("descriptors")
    ax_fds.set_xlabel("minutes")
    for ax in (ax_rss, ax_fds):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(f"soak: {sum(result['connections'].values()):,} connections")  # type: ignore[attr-defined]
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(result: dict[str, object]) -> str:
    lines = [f"connections: {result['connections']}, failed: {result['failed']}"]
    final = {s["node"]: s for s in result["final"]}  # type: ignore[attr-defined]
    slopes: dict[str, float] = result["rss_slope_mb_per_hour"]  # type: ignore[assignment]
    lines.append("agent   RSS MB (warm-up -> end)   heap MB        sockets   pipes   RSS trend, 2nd half")
    for b in result["baseline"]:  # type: ignore[attr-defined]
        f = final[b["node"]]
        lines.append(
            f"{b['node']:<7} {b['rss_mb']:>6.1f} -> {f['rss_mb']:<6.1f}"
            f"{'':13}{b['heap_mb']:>5.1f} -> {f['heap_mb']:<5.1f}"
            f"{b['sockets']:>12} -> {f['sockets']:<4}{b['pipes']:>4} -> {f['pipes']:<4}"
            f"{slopes.get(b['node'], 0.0):>+10.1f} MB/h"
        )
    lines += [f"problem: {p}" for p in result["problems"]]  # type: ignore[attr-defined]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic after the warm-up (default 10)")
    parser.add_argument("--concurrency", type=int, default=20, help="connections in flight (default 20)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of traffic before the baseline")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results/soak-<time>)")
    args = parser.parse_args(argv)
    out: Path = args.out or Path(__file__).resolve().parent / "results" / time.strftime("soak-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    lab = Lab.up(TOPOLOGY, name=f"soak-{secrets.token_hex(2)}", mesh=True)
    try:
        result = asyncio.run(soak(lab, args.minutes, args.concurrency, args.interval, args.warmup))
    finally:
        lab.down()
    (out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "soak.png")
    print(_summary(result))
    print(f"soak {'FAILED' if result['problems'] else 'passed'}; samples and plot in {out}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
