"""Network namespace primitives: named netns, `ip` commands inside them, and switching the calling thread into one.

The lab drives iproute2 (`ip -n NS -batch -`) rather than a netlink library: one process per namespace applies a
whole batch, errors come back as the exact command and kernel message, and what the lab does can be replayed by
hand. :func:`enter` is what tests use to open sockets inside a pod or node from the test process itself.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common.netns import setns
from lab.errors import NetnsError

NETNS_DIR = Path("/var/run/netns")


def path(name: str) -> Path:
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return path(name).exists()


def list_names(prefix: str = "") -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def ip(*args: str, netns: str | None = None) -> str:
    """Run one `ip` command (inside ``netns`` if given); return stdout or raise NetnsError with the kernel's reason."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def batch(netns: str, commands: list[str]) -> None:
    """Apply many `ip` commands in one process; stop at the first failure and name it."""
    if not commands:
        return
    argv = ["ip", "-n", netns, "-batch", "-"]
    proc = subprocess.run(argv, input="\n".join(commands) + "\n", capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetnsError(f"`ip -n {netns}` batch failed: {proc.stderr.strip()}")


def add(name: str) -> None:
    ip("netns", "add", name)
    batch(name, ["link set lo up"])


def delete(name: str) -> None:
    """Remove a named netns; a no-op when it is already gone (so cleanup can be repeated)."""
    if exists(name):
        ip("netns", "delete", name)


def _identity(p: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (like `ip netns pids`), excluding this process."""
    target = _identity(path(name))
    if target is None:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and _identity(entry / "ns" / "net") == target:
            found.append(int(entry.name))
    return found


def _setns(fd: int) -> None:
    try:
        setns(fd)
    except OSError as e:
        raise NetnsError(f"setns failed: {e.strerror}") from e


@contextmanager
def enter(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside netns ``name``; sockets created there stay in it afterwards.

    Only this thread moves (setns on a thread), so an asyncio loop running elsewhere is unaffected; do not await
    inside the block.
    """
    try:
        target = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NetnsError(f"netns {name!r} does not exist: {e}") from e
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(original)
        finally:
            os.close(original)
    finally:
        os.close(target)


def write_sysctl(netns: str, key: str, value: str) -> None:
    """Set a net.* sysctl inside ``netns`` (``/proc/sys/net`` resolves against the opening thread's netns)."""
    with enter(netns), open(f"/proc/sys/{key.replace('.', '/')}", "w") as f:
        f.write(value)


def nsenter_argv(netns: str, argv: list[str]) -> list[str]:
    """Prefix a command so it runs in ``netns``; unlike `ip netns exec` it keeps /sys (and bpffs pins) visible."""
    return ["nsenter", f"--net={path(netns)}", "--", *argv]
