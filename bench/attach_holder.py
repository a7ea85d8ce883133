"""Holds Ambit's capture program on a node's uplink with no pod enrolled, for the attached-not-enrolled benchmark.

Runs inside the node netns (`nsenter --net=...`): the Redirector acts on the netns it starts in. It uses the
agent's own loader (agent/redirect.py) exactly as the agent does at start-up, minus enrollment, so the measured
cost is the program every packet of a non-enrolled pod crosses. SIGTERM removes everything it installed.

    python -m bench.attach_holder --instance NAME --uplink eth0 --ready-file PATH
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from agent.redirect import RedirectConfig, RedirectError, Redirector, cleanup
from common import log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attach_holder", description=__doc__.splitlines()[0])
    parser.add_argument("--instance", required=True, help="unique per node netns (pins live in the host's bpffs)")
    parser.add_argument("--uplink", required=True)
    parser.add_argument("--ready-file", required=True, type=Path)
    args = parser.parse_args(argv)
    log.setup("INFO")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    config = RedirectConfig(instance=args.instance, uplinks=(args.uplink,))
    redirector = Redirector(config)
    try:
        redirector.start()
        failures = redirector.reconcile(set())
        if failures:
            print(f"reconcile failures: {failures}", file=sys.stderr)
            return 1
        args.ready_file.write_text("ready\n")
        stop.wait()
    except RedirectError as exc:
        print(f"capture did not start: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        redirector.close()
        print(f"removed: {cleanup(config)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
