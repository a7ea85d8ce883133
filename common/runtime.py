"""Process entry: run a service's main coroutine on the selected event loop.

uvloop is the default for its lower relay latency; the standard loop stays one flag away because uvloop has been
seen to crash under heavy connection churn (ENVIRONMENT.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

EVENT_LOOPS = ("uvloop", "asyncio")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if name == "asyncio":
        return None
    raise SystemExit(f"--event-loop: {name!r} is not one of {', '.join(EVENT_LOOPS)}")


def run(main: Callable[[], Coroutine[Any, Any, int]], event_loop: str) -> NoReturn:
    """Exit with ``main()``'s return code; Ctrl-C ends quietly (the service's own signal handler drains first)."""
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
