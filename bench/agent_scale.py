"""The node agent at large-cluster scale: what a wildcard subscription to a big cluster costs one agent.

The controller's synthetic cluster (controller/synthetic.py: 10,000 pods on 50 nodes, 1,000 services, 1,000
policies) is served by the controller's own Translator and XdsServer in a child process (`python -m bench.agent_scale
serve`, changes asked on its stdin), so that its work shares no event loop and no CPU time account with the agent.
This process runs the agent's real components on uvloop, as the agent wires them: XdsClient, WorkloadStore and
ConnectionRegistry, plus the outbound and rbac lookups a connection makes. A probe callback every millisecond records
the longest event-loop stall of each step: what a relay on the agent would wait. Figures are CPU seconds of this
process where they say so; stalls and times are wall clock, so they include whatever else the machine runs.

`python -m bench.agent_scale [--out DIR]` (about 30 s) writes agent_scale.json to bench/results/agent-scale-<time>/.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.progress import Progress

NODE = "node-0"
BIG_SERVICE_ENDPOINTS = 1_000
NAMESPACE_POLICIES = 60  # added to ns-0: 50 ALLOW by principal, 10 DENY by address range
ROOT_POLICIES = 10  # mesh-wide (GLOBAL) policies in the root namespace: 5 ALLOW, 5 DENY
TRACKED_CONNECTIONS = 10_000
STEPS: tuple[tuple[str, float], ...] = (
    ("start the controller with the synthetic cluster", 8.0),
    ("full sync", 3.0),
    ("1,000-pod updates", 2.0),
    ("per-connection lookups", 10.0),
    ("policy updates with 10,000 tracked connections", 4.0),
)


# ---- the controller (child process) --------------------------------------------------------------------------------


async def _serve() -> None:
    """Serve the synthetic cluster; stdin lines: ``pods N`` (N pods change a label), ``policy`` (policy-0 flips
    dry-run), ``quit``. Prints one JSON line per command once the change is handed to the server."""
    from dataclasses import replace
    from types import MappingProxyType

    from controller.model import AuthorizationPolicy, Pod
    from controller.synthetic import Scale, documents
    from controller.translate import Translator
    from controller.validation import parse_documents
    from controller.xds_server import XdsServer

    parsed = parse_documents("agent-scale", documents(Scale(nodes=50)))
    if parsed.errors:
        raise SystemExit(f"synthetic cluster invalid: {parsed.errors[0]}")
    pods = [o for o in parsed.objects if isinstance(o, Pod)]
    policies = [o for o in parsed.objects if isinstance(o, AuthorizationPolicy)]
    translator = Translator()
    translator.apply(parsed.objects)
    server = XdsServer(translator)
    port = await server.serve(0, "127.0.0.1")
    addresses, authorizations = len(translator.addresses()), len(translator.authorizations())
    print(json.dumps({"port": port, "addresses": addresses, "authorizations": authorizations}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    generation = 0
    while words := (await reader.readline()).decode().split():
        generation += 1
        if words[0] == "pods":
            changed = []
            for i in range(int(words[1])):
                labels = MappingProxyType({**pods[i].meta.labels, "version": f"g{generation}"})
                pods[i] = replace(pods[i], meta=replace(pods[i].meta, labels=labels))
                changed.append(pods[i])
            delta = translator.apply(changed)
        elif words[0] == "policy":
            policies[0] = replace(policies[0], dry_run=not policies[0].dry_run)
            delta = translator.apply([policies[0]])
        else:
            break
        server.apply_delta(delta)
        print(json.dumps({"addresses": len(delta.addresses), "authorizations": len(delta.authorizations)}), flush=True)
    await server.stop(0.1)


# ---- the agent side --------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _StallProbe:
    """A callback every millisecond; the longest gap between two runs since the last :meth:`take`."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._last = time.perf_counter()
        self._longest = 0.0
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        self._longest = max(self._longest, now - self._last)
        self._last = now
        self._handle = self._loop.call_later(0.001, self._tick)

    def take(self) -> float:
        """The longest stall since the last call, in ms."""
        longest, self._longest = self._longest, 0.0
        return round(longest * 1000, 1)

    def stop(self) -> None:
        self._handle.cancel()


def _per_call_us(f: Callable[[int], object], n: int, repeats: int = 3) -> float:
    """CPU microseconds per call of ``f(i)``, the best of ``repeats`` runs of ``n`` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for i in range(n):
            f(i)
        best = min(best, time.process_time() - start)
    return round(best / n * 1e6, 2)


def _ip(raw: bytes) -> str:
    return str(ipaddress.ip_address(bytes(raw)))


class _Controller:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{command}\n".encode())
        await self.proc.stdin.drain()
        answer: dict[str, Any] = json.loads(await self.proc.stdout.readline())
        return answer

    async def stop(self) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            self.proc.stdin.write(b"quit\n")
            await self.proc.stdin.drain()
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def _measure(progress: Progress, log_path: Path) -> dict[str, Any]:
    from agent import outbound, rbac
    from agent.connections import ConnectionRegistry
    from agent.metrics import Metrics
    from agent.prometheus import Registry
    from agent.state import WorkloadStore
    from agent.xds import XdsClient

    out: dict[str, Any] = {"rss_components_imported_mb": round(_rss_mb(), 1)}
    progress.step(f"agent-scale  {STEPS[0][0]}", STEPS[0][1])
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.agent_scale",
            "serve",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    controller = _Controller(proc)
    assert proc.stdout is not None
    served = json.loads(await proc.stdout.readline())
    out["addresses"], out["authorizations"] = served["addresses"], served["authorizations"]
    store = WorkloadStore()
    registry = ConnectionRegistry(store, Metrics())
    changed = asyncio.Event()
    store.subscribe(lambda _change: changed.set())
    client = XdsClient(store, f"127.0.0.1:{served['port']}", NODE, registry=Registry())
    probe = _StallProbe()
    task = asyncio.create_task(client.run())

    async def change(command: str) -> dict[str, Any]:
        """Ask for a change and wait until it is applied; its CPU and longest stall."""
        await asyncio.sleep(0.1)
        probe.take()
        changed.clear()
        cpu = _cpu_s()
        await controller.ask(command)
        await asyncio.wait_for(changed.wait(), 30)
        await asyncio.sleep(0.1)  # the rest of the response, in its chunks
        return {"cpu_s": round(_cpu_s() - cpu, 3), "stall_ms": probe.take()}

    try:
        progress.step(f"agent-scale  {STEPS[1][0]}", STEPS[1][1])
        probe.take()
        started, cpu = time.perf_counter(), _cpu_s()
        await asyncio.wait_for(client.ready.wait(), 120)
        out["ready_s"] = round(time.perf_counter() - started, 3)
        out["full_sync_cpu_s"] = round(_cpu_s() - cpu, 3)
        out["full_sync_stall_ms"] = probe.take()
        gc.collect()
        out["rss_synced_mb"] = round(_rss_mb(), 1)
        out["rss_state_mb"] = round(out["rss_synced_mb"] - out["rss_components_imported_mb"], 1)

        progress.step(f"agent-scale  {STEPS[2][0]}", STEPS[2][1])
        out["update_1000_pods"] = [await change("pods 1000") for _ in range(3)]

        progress.step(f"agent-scale  {STEPS[3][0]}", STEPS[3][1])
        out.update(_lookups(store, outbound, rbac))

        progress.step(f"agent-scale  {STEPS[4][0]}", STEPS[4][1])
        out.update(_track(store, registry, rbac))
        out["policy_update_tracked"] = await change("policy")
        out.update(await _policy_updates(store, rbac, probe))
    finally:
        probe.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await controller.stop()
    out["notes"] = [
        "agent components in one process (XdsClient, WorkloadStore, ConnectionRegistry, outbound and rbac lookups), "
        "the controller in another; RSS is this process's (no listeners, certificates or capture)",
        "*_us: CPU microseconds per call, best of 3; *_cpu_s: CPU seconds of this process; *_stall_ms: the longest "
        "gap between two runs of a 1 ms callback, wall clock",
    ]
    return out


def _lookups(store: Any, outbound: Any, rbac: Any) -> dict[str, Any]:
    """Per-connection costs: address lookups, a VIP's endpoint pick, policies_for + evaluate."""
    from api.istio.security import authorization_pb2 as az
    from api.istio.workload import workload_pb2 as wl
    from common.spiffe import Identity

    out: dict[str, Any] = {}
    workloads = store.all_workloads()
    services = store.all_services()
    ips = [_ip(w.addresses[0]) for w in workloads]
    vips = [_ip(s.addresses[0].address) for s in services]
    src = next(w for w in workloads if w.node == NODE)
    out["workload_by_ip_us"] = _per_call_us(lambda i: store.workload_by_ip(ips[i % len(ips)]), 20_000)
    out["service_by_vip_us"] = _per_call_us(
        lambda i: store.service_by_vip(vips[i % len(vips)], src.namespace, src.network), 20_000
    )
    config = outbound.OutboundConfig(is_node_address=lambda _ip: False)
    rng = random.Random(1)
    out["endpoints_per_service"] = len(store.endpoints(services[0]))
    out["route_vip_us"] = _per_call_us(
        lambda i: outbound.route(store, NODE, src, (vips[i % len(vips)], 80), config, rng), 20_000
    )
    big_key = "ns-0/big.ns-0.svc.cluster.local"
    big = wl.Service(
        name="big",
        namespace="ns-0",
        hostname="big.ns-0.svc.cluster.local",
        addresses=[wl.NetworkAddress(address=ipaddress.ip_address("172.31.0.1").packed)],
        ports=[wl.Port(service_port=80, target_port=8080)],
    )
    endpoints = []
    for j in range(BIG_SERVICE_ENDPOINTS):
        pod = wl.Workload(
            uid=f"bench//Pod/ns-0/big-{j}",
            name=f"big-{j}",
            namespace="ns-0",
            node=f"node-{j % 50}",
            addresses=[ipaddress.ip_address(f"10.200.{j // 250}.{j % 250 + 1}").packed],
            tunnel_protocol=wl.HBONE,
            service_account="big",
            status=wl.HEALTHY,
        )
        pod.services[big_key].ports.add(service_port=80, target_port=8080)
        endpoints.append(pod)
    store.put([big, *endpoints])
    out["route_vip_1000_endpoints_us"] = _per_call_us(
        lambda i: outbound.route(store, NODE, src, ("172.31.0.1", 80), config, rng), 20_000
    )
    unrelated = [
        wl.Workload(
            uid=f"bench//Pod/ns-7/u{j}", name=f"u{j}", namespace="ns-7", addresses=[bytes([11, 0, j // 250, j % 250])]
        )
        for j in range(2_000)
    ]
    out["unrelated_update_us"] = _per_call_us(lambda i: store.put([unrelated[i % 1000]]), 300)
    out["route_vip_1000_endpoints_after_an_unrelated_update_us"] = _per_call_us(
        lambda i: (
            store.put([unrelated[1000 + i % 1000]]),
            outbound.route(store, NODE, src, ("172.31.0.1", 80), config, rng),
        ),
        300,
    )
    client = Identity("cluster.local", "ns-1", "sa-1")
    sample = [(w, rbac.Connection("10.9.9.9", ips[k], 8080, client)) for k, w in enumerate(workloads[:1000])]
    out["policies_per_workload_mean"] = round(statistics.mean(len(store.policies_for(w)) for w, _ in sample), 2)
    out["policies_for_evaluate_us"] = _per_call_us(
        lambda i: rbac.evaluate(store.policies_for(sample[i % 1000][0]), sample[i % 1000][1]), 20_000
    )

    def policy(ns: str, name: str, action: Any, scope: Any, principal: str = "", cidr: str = "") -> Any:
        p = az.Authorization(name=name, namespace=ns, scope=scope, action=action)
        m = p.groups.add().rules.add().matches.add()
        if principal:
            m.principals.add(exact=principal)
            m.destination_ports.append(8080)
        else:
            m.source_ips.add(address=ipaddress.ip_address(cidr).packed, length=24)
        return p

    extra = [
        policy("ns-0", f"allow-{i}", az.ALLOW, az.NAMESPACE, f"cluster.local/ns/ns-{i}/sa/sa-{i}") for i in range(50)
    ]
    extra += [policy("ns-0", f"deny-{i}", az.DENY, az.NAMESPACE, cidr=f"192.168.{i}.0") for i in range(10)]
    extra += [
        policy("istio-system", f"g-allow-{i}", az.ALLOW, az.GLOBAL, f"cluster.local/ns/x/sa/g{i}") for i in range(5)
    ]
    extra += [policy("istio-system", f"g-deny-{i}", az.DENY, az.GLOBAL, cidr=f"192.169.{i}.0") for i in range(5)]
    store.put(policies=extra)
    target = next(w for w in workloads if w.namespace == "ns-0")
    out["policies_ns0_workload"] = len(store.policies_for(target))
    last = rbac.Connection("10.9.9.9", _ip(target.addresses[0]), 8080, Identity("cluster.local", "ns-49", "sa-49"))
    out["policies_for_evaluate_ns0_us"] = _per_call_us(lambda i: rbac.evaluate(store.policies_for(target), last), 5_000)
    return out


def _track(store: Any, registry: Any, rbac: Any) -> dict[str, Any]:
    """TRACKED_CONNECTIONS connections, four to each of 2,500 workloads from one client each, all allowed."""
    workloads = store.all_workloads()[:2500]
    for i in range(TRACKED_CONNECTIONS):
        k = i % len(workloads)
        w = workloads[k]
        conn = rbac.Connection(f"10.9.{k // 250}.{k % 250}", _ip(w.addresses[0]), 8080, _allowed(store, w), 40000 + i)
        if rbac.evaluate(store.policies_for(w), conn).allowed:
            registry.track(conn, w.uid, "inbound", lambda: None)
    return {"tracked_connections": len(registry)}


def _allowed(store: Any, w: Any) -> Any:
    """An identity the workload's selector ALLOW admits (the synthetic cluster's policies name one principal)."""
    from common.spiffe import Identity

    for p in store.policies_for(w):
        if p.action == 0 and p.groups and p.groups[0].rules[0].matches[0].principals:
            _domain, _ns, ns, _sa, sa = p.groups[0].rules[0].matches[0].principals[0].exact.split("/")
            return Identity("cluster.local", ns, sa)
    return Identity("cluster.local", "client", "client")


async def _policy_updates(store: Any, rbac: Any, probe: _StallProbe) -> dict[str, Any]:
    """A selector, a namespace and a mesh-wide policy update with the connections tracked: CPU, evaluations and the
    longest stall until the re-check is done (it goes on over several loop turns past a budget)."""
    from api.istio.security import authorization_pb2 as az

    out: dict[str, Any] = {}
    evaluations = 0
    original = rbac.evaluate

    def counting(policies: Any, conn: Any) -> Any:
        nonlocal evaluations
        evaluations += 1
        return original(policies, conn)

    async def update(name: str, policy: Any) -> None:
        nonlocal evaluations
        await asyncio.sleep(0.1)
        probe.take()
        evaluations = 0
        cpu = _cpu_s()
        store.put(policies=[policy])
        await asyncio.sleep(0.2)
        out[name] = {"cpu_s": round(_cpu_s() - cpu, 3), "evaluations": evaluations, "stall_ms": probe.take()}

    tracked = store.all_workloads()[:2500]  # as _track chose them
    named = next(n for w in tracked for n in w.authorization_policies if "static" not in n)
    selector = az.Authorization()
    selector.CopyFrom(next(p for p in store.all_policies() if f"{p.namespace}/{p.name}" == named))
    selector.dry_run = not selector.dry_run
    namespaced = az.Authorization(name="bench-ns", namespace="ns-3", scope=az.NAMESPACE, action=az.DENY)
    namespaced.groups.add().rules.add().matches.add().source_ips.add(address=bytes([192, 170, 0, 0]), length=24)
    mesh_wide = az.Authorization(name="bench-global", namespace="istio-system", scope=az.GLOBAL, action=az.DENY)
    mesh_wide.groups.add().rules.add().matches.add().source_ips.add(address=bytes([192, 171, 0, 0]), length=24)
    rbac.evaluate = counting
    try:
        await update("selector_policy_update", selector)
        await update("namespace_policy_update", namespaced)
        await update("mesh_wide_policy_update", mesh_wide)
    finally:
        rbac.evaluate = original
    return out


def run(out_dir: Path) -> dict[str, Any]:
    """Never raises for a failed measurement: the reason goes into the result."""
    import uvloop

    progress = Progress(sum(expected for _, expected in STEPS))
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = uvloop.run(_measure(progress, out_dir / "controller.log"))
    except (OSError, RuntimeError, TimeoutError, ValueError, StopIteration) as exc:
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        progress.finish()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_scale", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="the controller side (started by the bench)")
    parser.add_argument(
        "--out", type=Path, default=None, help="results directory (default bench/results/agent-scale-<time>)"
    )
    args = parser.parse_args(argv)
    if args.command == "serve":
        asyncio.run(_serve())
        return 0
    out: Path = args.out or Path(__file__).resolve().parent / "results" / time.strftime("agent-scale-%Y%m%d-%H%M%S")
    result = run(out)
    (out / "agent_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 1 if result.get("status") == "failed" else 0


if __name__ == "__main__":
    raise SystemExit(main())
