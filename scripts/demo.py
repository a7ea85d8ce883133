"""`make demo`: the Ambit story on a local lab, one narrated step at a time.

Each step is a function taking the running lab; later stages of the project append their steps (enroll, mTLS,
policy, metrics) to STEPS. The lab is always removed at the end, also when a step fails or on Ctrl-C.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cli.lab import format_status
from lab import Lab, LabError, client, netns
from lab.cluster import WORKLOAD_ECHO_PORT, WORKLOAD_HTTP_PORT

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "basic"
LAB_NAME = "ambit-demo"


def say(title: str) -> None:
    print(f"\n\033[1;36m== {title}\033[0m", flush=True)


def note(text: str) -> None:
    print(f"   {text}", flush=True)


def run_in(lab: Lab, target: str, argv: list[str]) -> str:
    """Run a real command inside a pod and show it, as a user would with `ambitctl lab exec`."""
    print(f"   $ ambitctl lab exec {target} -- {' '.join(argv)}", flush=True)
    out = lab.exec(target, argv).stdout.strip()
    print(f"   {out}", flush=True)
    return out


def who_called(lab: Lab, caller: str, target: str) -> None:
    src, dst = lab.pod(caller), lab.pod(target)
    answer = json.loads(run_in(lab, src.key, ["curl", "-s", f"http://{dst.ip}:{WORKLOAD_HTTP_PORT}/"]))
    seen = answer["client"].split(":")[0]
    if answer["pod"] != dst.name or seen != src.ip:
        raise LabError(f"unexpected answer from {dst.key}: {answer}")
    note(f"{dst.key} on {dst.node} answered and saw the caller as {seen} ({src.key} on {src.node})")


def step_cross_node_http(lab: Lab) -> None:
    say("Cross-node HTTP: demo/client (node1) -> demo/server-1 (node2)")
    who_called(lab, "demo/client", "demo/server-1")


def step_same_node_http(lab: Lab) -> None:
    say("Same-node HTTP: demo/client (node1) -> demo/server-2 (node1)")
    who_called(lab, "demo/client", "demo/server-2")


def step_tcp_echo(lab: Lab) -> None:
    say("TCP echo: 1 MiB from demo/client to demo/server-1 and back")
    src, dst = lab.pod("demo/client"), lab.pod("demo/server-1")
    payload = secrets.token_bytes(1 << 20)
    start = time.monotonic()
    echoed = client.tcp_echo(src.netns, dst.ip, WORKLOAD_ECHO_PORT, payload)
    elapsed = time.monotonic() - start
    if echoed != payload:
        raise LabError(f"echo mismatch: sent {len(payload)} bytes, got {len(echoed)} back")
    note(
        f"{len(payload)} bytes sent, the same {len(echoed)} bytes back via {dst.ip}:{WORKLOAD_ECHO_PORT} "
        f"in {elapsed * 1000:.0f} ms"
    )


def step_legacy_to_demo(lab: Lab) -> None:
    say("Not-enrolled namespace: legacy/web (node2) -> demo/server-2 (node1), plain TCP for now")
    who_called(lab, "legacy/web", "demo/server-2")


STEPS: list[Callable[[Lab], None]] = [step_cross_node_http, step_same_node_http, step_tcp_echo, step_legacy_to_demo]


def lab_up() -> Lab:
    say(f"Lab up from {EXAMPLE.relative_to(ROOT)}: one netns per node and per pod, a sample workload in every pod")
    if LAB_NAME in Lab.names():
        note(f"removing {LAB_NAME} left over from an earlier interrupted demo")
        Lab.load(LAB_NAME).down()
    start = time.monotonic()
    lab = Lab.up(EXAMPLE, name=LAB_NAME)
    note(f"ready in {time.monotonic() - start:.1f} s\n")
    print(format_status(lab.status()), flush=True)
    return lab


def main() -> int:
    lab: Lab | None = None
    try:
        lab = lab_up()
        for step in STEPS:
            step(lab)
        say("Demo complete")
        return 0
    except LabError as e:
        print(f"\n\033[31mdemo failed:\033[0m {e}", file=sys.stderr)
        return 1
    finally:
        if lab is not None:
            say(f"Lab down: removing {lab.name} (processes, namespaces, state)")
            lab.down()
            leftovers = netns.list_names(f"{lab.name}-")
            note(f"left behind: {', '.join(leftovers)}" if leftovers else "no lab namespaces left")


if __name__ == "__main__":
    sys.exit(main())
