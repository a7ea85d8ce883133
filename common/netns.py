"""setns(2) for network namespaces, which Python 3.11's os module lacks.

One primitive for the agent (sockets made inside a pod's namespace, agent/pod_netns.py), the lab (its `enter`) and
the test topologies: it moves only the calling thread, so callers switch back before any await.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace ``fd`` refers to; OSError with the kernel's errno."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
