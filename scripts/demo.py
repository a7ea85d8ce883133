"""`make demo`: the Ambit story on a local lab, one narrated step at a time.

A two-node cluster of network namespaces with the controller and an agent per node: enrolled pods' traffic is
captured by eBPF and carried in HBONE mTLS, checked on the wire, denied by a policy, enrolled and released live,
and counted in Istio's metrics. Each step is a function taking the running lab; the lab is always removed at the
end, also when a step fails or on Ctrl-C.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cli.lab import format_status
from lab import Lab, LabError, client, netns, observe
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


def access_line(lab: Lab, node: str, **match: str) -> dict[str, object]:
    """The newest access-log record matching ``match`` (agents write it when the connection closes)."""
    deadline = time.monotonic() + 10
    while True:
        records = [r for r in observe.agent_log(lab, node) if r.get("scope") == "access"]
        hits = [r for r in records if all(r.get(k) == v for k, v in match.items())]
        if hits:
            return hits[-1]
        if time.monotonic() > deadline:
            raise LabError(f"no access-log record on {node} matching {match}")
        time.sleep(0.2)


def show_access(record: dict[str, object]) -> None:
    keys = ("direction", "path", "src.identity", "dst.identity", "dst.hbone_addr", "policy.decision", "bytes_recv")
    note("access log: " + json.dumps({k: record[k] for k in keys if k in record}))


def step_cross_node_mtls(lab: Lab) -> None:
    say("Cross-node: demo/client (node1) -> demo/server-1 (node2), captured by eBPF, carried in HBONE mTLS")
    who_called(lab, "demo/client", "demo/server-1")
    show_access(access_line(lab, "node2", direction="inbound", path="hbone"))


def step_on_the_wire(lab: Lab) -> None:
    say("On the node-to-node link: only TLS to port 15008 for enrolled pods, plaintext for the others")
    marker = b"SECRET-" + secrets.token_hex(6).encode()
    legacy = b"LEGACY-" + secrets.token_hex(6).encode()
    with observe.sniff(lab.plan.core_netns, lab.node("node1").core_link) as wire:
        client.tcp_echo(lab.pod("demo/client").netns, lab.pod("demo/server-1").ip, WORKLOAD_ECHO_PORT, marker)
        client.tcp_echo(lab.pod("legacy/web").netns, lab.pod("demo/server-2").ip, WORKLOAD_ECHO_PORT, legacy)
    tls = sum(1 for s, d, p in wire.tcp_payloads() if p and 15008 in (s, d))
    note(f"captured {len(wire.frames)} frames on node1's link: {tls} TLS segments to/from :15008")
    note(f"demo payload {marker.decode()!r} seen in plaintext: {wire.saw(marker)}")
    note(f"legacy payload {legacy.decode()!r} (not enrolled) seen in plaintext: {wire.saw(legacy)}")
    if wire.saw(marker) or not wire.saw(legacy):
        raise LabError("the link capture does not show what the mesh promises")


def step_same_node(lab: Lab) -> None:
    say("Same node: demo/client -> demo/server-2 (node1): same identity and policy, relayed with os.splice")
    who_called(lab, "demo/client", "demo/server-2")
    show_access(access_line(lab, "node1", direction="outbound", path="same_node"))


def step_service_vip(lab: Lab) -> None:
    say("Service VIP: demo/client -> server.demo (10.96.0.10:80), load-balanced by the agent over both servers")
    seen = set()
    for _ in range(8):
        _, body = client.http_get(lab.pod("demo/client").netns, "10.96.0.10", 80)
        seen.add(json.loads(body)["pod"])
    note(f"answered by: {', '.join(sorted(seen))}")


def step_not_enrolled(lab: Lab) -> None:
    say("A pod in a non-ambient namespace is untouched: only demo pods are captured")
    for node in ("node1", "node2"):
        status = observe.capture_status(lab, node)
        captured = ", ".join(status.get("enrolled", [])) or "nothing"
        note(f"{node}: capturing {captured} (legacy/web is {lab.pod('legacy/web').ip})")


def step_policy(lab: Lab) -> None:
    say("AuthorizationPolicy: only demo/client may call app=server; legacy/web (no identity) is denied")
    policy = (ROOT / "examples" / "policies" / "server-allow-client.yaml").read_text()
    web, server = lab.pod("legacy/web"), lab.pod("demo/server-1")
    with observe.config_file(lab, "server-allow-client.yaml", policy):
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _reaches(web.netns, server.ip):
            time.sleep(0.3)
        for caller in ("legacy/web", "demo/client"):
            verdict = "allowed" if _reaches(lab.pod(caller).netns, server.ip) else "denied"
            note(f"{caller} -> demo/server-1: {verdict}")
        show_access(access_line(lab, "node2", direction="inbound", response_flags="DENY"))
    note("policy removed")


def _reaches(ns: str, ip: str) -> bool:
    try:
        return client.tcp_echo(ns, ip, WORKLOAD_ECHO_PORT, b"hello", timeout=2) == b"hello"
    except OSError:
        return False


def step_live_enrollment(lab: Lab) -> None:
    say("Live enrollment: un-label namespace demo, then label it again (no pod restarts)")
    ns_file = Path(lab.config_dir) / "namespaces.yaml"
    original = ns_file.read_text()
    client_ip = lab.pod("demo/client").ip
    try:
        ns_file.write_text(original.replace("istio.io/dataplane-mode: ambient", "istio.io/dataplane-mode: none"))
        _wait_capture(lab, client_ip, False)
        note(f"demo un-enrolled: node1 captures {observe.capture_status(lab, 'node1').get('enrolled') or 'nothing'}")
    finally:
        ns_file.write_text(original)
    _wait_capture(lab, client_ip, True)
    note(f"demo enrolled again: node1 captures {', '.join(observe.capture_status(lab, 'node1')['enrolled'])}")


def _wait_capture(lab: Lab, ip: str, captured: bool) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if (ip in observe.capture_status(lab, "node1").get("enrolled", [])) == captured:
            return
        time.sleep(0.3)
    raise LabError(f"{ip} capture did not become {captured}")


def step_metrics_and_certs(lab: Lab) -> None:
    say("Metrics (Istio's names and labels, node2's agent on :15020) and certificates (node1's agent)")
    text = observe.metrics(lab, "node2")
    for line in observe.metric_lines(text, "istio_tcp_connections_opened_total", reporter="destination")[:3]:
        labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1 : line.rindex("}")].split('",'))
        short = {
            k: labels[k].strip('"') for k in ("source_workload", "destination_workload", "connection_security_policy")
        }
        note(f"istio_tcp_connections_opened_total {short} = {line.rsplit(' ', 1)[1]}")
    print(
        lab.exec("core", [sys.executable, "-m", "cli.ambitctl", "certs", "--lab", lab.name, "--node", "node1"]).stdout
    )


STEPS: list[Callable[[Lab], None]] = [
    step_cross_node_mtls,
    step_on_the_wire,
    step_same_node,
    step_service_vip,
    step_not_enrolled,
    step_policy,
    step_live_enrollment,
    step_metrics_and_certs,
]


def lab_up() -> Lab:
    say(f"Lab up from {EXAMPLE.relative_to(ROOT)}: nodes and pods as netns, the controller, an agent per node")
    if LAB_NAME in Lab.names():
        note(f"removing {LAB_NAME} left over from an earlier interrupted demo")
        Lab.load(LAB_NAME).down()
    start = time.monotonic()
    lab = Lab.up(EXAMPLE, name=LAB_NAME, mesh=True)
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
