"""Process entry: run a service's main coroutine on the selected event loop.

uvloop is the default for its lower relay latency; the standard loop stays one flag away because uvloop has been
seen to crash under heavy connection churn (ENVIRONMENT.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

from common.log import kv

log = logging.getLogger(__name__)

EVENT_LOOPS = ("uvloop", "asyncio")


def freeze_startup_heap() -> None:
    """Put what start-up made out of the collector's sight: modules, classes, the gRPC (and in the agent the BPF)
    machinery and the first full state live as long as the process, and every full collection walked them all,
    holding the event loop: ~45 ms per gen-2 pass on a loaded lab agent (~1 ms frozen), 117-382 ms on a controller
    holding 10,000 pods during a relist (43-73 ms frozen). Frozen objects are still freed when their last reference
    goes; only cycles among them stay. Called once the service has started."""
    gc.collect()
    gc.freeze()


def raise_open_files_limit(nr_open: Path = Path("/proc/sys/fs/nr_open")) -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit, as ztunnel does when it starts; (before, after).

    A proxy holds two descriptors per connection it carries (a pipe pair more on the same-node path), and container
    runtimes still start processes with a soft limit of 1024, which caps a node's agent at a few hundred
    connections. An unlimited hard limit is capped at the kernel's per-process maximum (fs.nr_open).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        try:
            target = int(nr_open.read_text())
        except (OSError, ValueError):
            return soft, soft
    if target <= soft:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        log.warning("cannot raise the open files limit", extra=kv(soft=soft, hard=hard, error=str(e)))
        return soft, soft
    return soft, target


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if name == "asyncio":
        return None
    raise SystemExit(f"--event-loop: {name!r} is not one of {', '.join(EVENT_LOOPS)}")


def run(main: Callable[[], Coroutine[Any, Any, int]], event_loop: str) -> NoReturn:
    """Exit with ``main()``'s return code; Ctrl-C ends quietly (the service's own signal handler drains first)."""
    before, after = raise_open_files_limit()
    if after != before:
        log.info("open files limit raised", extra=kv(before=before, after=after))
    code = 130
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
        code = runner.run(main())
    if any(t.daemon and t.is_alive() for t in threading.enumerate()):
        # A daemon thread still blocked in I/O (the Kubernetes client's HTTP, which cannot be interrupted) may log
        # while the interpreter finalizes, which aborts the process (SIGABRT) instead of exiting cleanly: the
        # service has stopped, so flush and leave without finalization.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
