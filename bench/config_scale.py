"""Config scale: how fast the controller turns a large cluster into workload-API resources and pushes them.

The controller's own Translator and XdsServer run in this process (as in the controller); 50 simulated agents run in
a child process (`python -m bench.config_scale clients ...`) so they do not share an event loop with the server,
each with its own gRPC channel and delta ADS stream, ACKing every response as an agent does. All times come from
the server's clock: a change's delivery latency runs from the moment the changed object is handed to the translator
to the moment the server receives the ACK of the response that carried it. The server's push debounce (20 ms quiet
period) is part of that latency, as it is in production.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

from bench.options import FULL, Durations
from bench.progress import Progress

CLIENT_READY_TIMEOUT_S = 120.0
BUILD_AND_DELIVER_ESTIMATE_S = 10.0
CHANGE_ESTIMATE_S = 0.15
CHANGE_TIMEOUT_S = 10.0


def build_objects(d: Durations) -> tuple[list[Any], list[Any], float]:
    """The controller's synthetic cluster (controller/synthetic.py) at the bench's scale, validated into model objects.

    Returns (objects, pods, validation seconds). One node per simulated agent.
    """
    from controller.model import Pod
    from controller.synthetic import Scale, documents
    from controller.validation import parse_documents

    scale = Scale(
        workloads=d.scale_workloads, services=d.scale_services, policies=d.scale_policies, nodes=d.scale_clients
    )
    docs = documents(scale)
    t0 = time.perf_counter()
    parsed = parse_documents("bench-config-scale", docs)
    validate_s = time.perf_counter() - t0
    if parsed.errors:
        raise ValueError(f"synthetic config has {len(parsed.errors)} errors, first: {parsed.errors[0]}")
    pods = [o for o in parsed.objects if isinstance(o, Pod)]
    return parsed.objects, pods, validate_s


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


async def _measure(d: Durations, log: BinaryIO, progress: Progress) -> dict[str, Any]:
    from controller.translate import Translator
    from controller.xds_server import ADDRESS_TYPE, PUSH_ORDER, AckEvent, XdsServer

    objects, pods, validate_s = build_objects(d)
    translator = Translator()
    t0 = time.perf_counter()
    delta = translator.apply(objects)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    acks: list[AckEvent] = []
    server = XdsServer(translator, on_ack=acks.append)
    encode_s = time.perf_counter() - t0
    state_bytes = sum(len(e.frame) for t in server.tables.values() for e in t.entries.values())
    port = await server.serve(0, "127.0.0.1")
    argv = [sys.executable, "-m", "bench.config_scale", "clients", "--target", f"127.0.0.1:{port}"]
    argv += ["--count", str(d.scale_clients)]
    clients = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        full = await _wait_full_state(acks, d.scale_clients, len(PUSH_ORDER), clients)
        progress.step(f"config-scale  {d.scale_changes} single changes", d.scale_changes * CHANGE_ESTIMATE_S)
        changes = await _single_changes(translator, server, pods, acks, d, ADDRESS_TYPE)
    finally:
        if clients.returncode is None:
            clients.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(clients.wait(), 10)
            if clients.returncode is None:
                clients.kill()
                await clients.wait()
        await server.stop(0.5)
    fleet = [c["fleet_s"] for c in changes]
    per_client = [lat for c in changes for lat in c["per_client_s"]]
    return {
        "status": "ok",
        "full_size": (d.scale_workloads, d.scale_services, d.scale_policies, d.scale_clients)
        == (FULL.scale_workloads, FULL.scale_services, FULL.scale_policies, FULL.scale_clients),
        "workloads": d.scale_workloads,
        "services": d.scale_services,
        "policies": d.scale_policies,
        "clients": d.scale_clients,
        "addresses": len(translator.addresses()),
        "authorizations": len(translator.authorizations()),
        "translated_changes": len(delta.addresses) + len(delta.authorizations),
        "state_mb": round(state_bytes / 1e6, 2),
        "validate_s": round(validate_s, 3),
        "build_s": round(build_s, 3),
        "encode_s": round(encode_s, 3),
        **full,
        "changes": len(changes),
        "change_p50_s": round(statistics.median(fleet), 4),
        "change_p99_s": round(_percentile(fleet, 0.99), 4),
        "change_max_s": round(max(fleet), 4),
        "change_per_client_p50_s": round(statistics.median(per_client), 4),
        "change_per_client_p99_s": round(_percentile(per_client, 0.99), 4),
        "figures": {
            "validate_s": "validation of the YAML-shaped documents into typed objects (s)",
            "build_s": "Translator full build (s)",
            "encode_s": "XdsServer encoding of the full state, once for all clients (s)",
            "deliver_s": "full state delivered and ACKed by every client, first subscribe to last ACK (s)",
            "deliver_per_client_p50_s": "per client, subscribe to ACK of the full state, p50 (s)",
            "change_p50_s": "single change to ACK by all clients, p50 (s)",
            "change_p99_s": "single change to ACK by all clients, p99 (s)",
            "change_per_client_p99_s": "single change to ACK, per client, p99 (s)",
        },
        "notes": [
            f"controller/synthetic.py cluster: {d.scale_workloads} pods on {d.scale_clients} nodes, "
            f"{d.scale_services} services, {d.scale_policies} policies -> {len(translator.addresses())} "
            f"Address and {len(translator.authorizations())} Authorization resources ({state_bytes / 1e6:.1f} MB)",
            f"{d.scale_clients} delta ADS clients (one gRPC channel each) in a separate process, ACKing every response",
            f"{len(changes)} single changes (one pod's version label), one at a time; the change p99 over "
            f"{len(changes)} samples is close to their maximum",
        ],
    }


async def _wait_full_state(
    acks: list[Any], clients: int, types: int, process: asyncio.subprocess.Process
) -> dict[str, float]:
    """Wait until every client ACKed its first response of every type (the full state)."""
    deadline = time.monotonic() + CLIENT_READY_TIMEOUT_S
    first: dict[tuple[str, str], Any] = {}
    while len(first) < clients * types:
        for event in acks:
            if event.error is None:
                first.setdefault((event.connection, event.type_url), event)
        if process.returncode is not None:
            raise RuntimeError(f"the simulated xDS clients exited with {process.returncode} (see xds-clients.log)")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(first)} of {clients * types} full-state ACKs after {CLIENT_READY_TIMEOUT_S} s"
            )
        await asyncio.sleep(0.01)
    events = list(first.values())
    per_conn: dict[str, list[Any]] = {}
    for event in events:
        per_conn.setdefault(event.connection, []).append(event)
    per_client = [max(e.acked_at for e in evs) - min(e.changed_at for e in evs) for evs in per_conn.values()]
    return {
        "deliver_s": round(max(e.acked_at for e in events) - min(e.changed_at for e in events), 3),
        "deliver_per_client_p50_s": round(statistics.median(per_client), 3),
        "deliver_per_client_max_s": round(max(per_client), 3),
    }


async def _single_changes(
    translator: Any, server: Any, pods: list[Any], acks: list[Any], d: Durations, address_type: str
) -> list[dict[str, Any]]:
    results = []
    for i in range(d.scale_changes):
        pod = pods[(i * 197) % len(pods)]
        changed = replace(
            pod, meta=replace(pod.meta, labels=MappingProxyType({**pod.meta.labels, "version": f"bench-{i}"}))
        )
        mark = len(acks)
        t0 = time.monotonic()
        delta = translator.apply([changed])
        if not delta.addresses:
            raise ValueError(f"changing {changed.key} produced no Address change; nothing to deliver")
        server.apply_delta(delta)
        pods[(i * 197) % len(pods)] = changed
        deadline = t0 + CHANGE_TIMEOUT_S
        acked: dict[str, float] = {}
        while len(acked) < d.scale_clients:
            for event in acks[mark:]:
                if event.type_url == address_type and event.error is None and event.changed_at >= t0:
                    acked.setdefault(event.connection, event.acked_at)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"change {i}: {len(acked)} of {d.scale_clients} clients ACKed in {CHANGE_TIMEOUT_S} s"
                )
            await asyncio.sleep(0.001)
        results.append({"fleet_s": max(acked.values()) - t0, "per_client_s": [t - t0 for t in acked.values()]})
        await asyncio.sleep(0.05)
    return results


def expected_seconds(d: Durations) -> float:
    return BUILD_AND_DELIVER_ESTIMATE_S + d.scale_changes * CHANGE_ESTIMATE_S


def run(durations: Durations, progress: Progress, log_dir: Path) -> dict[str, Any]:
    """Never raises for a failed measurement: the report shows the reason as FAILED."""
    progress.step(
        f"config-scale  build {durations.scale_workloads} workloads, deliver to {durations.scale_clients} clients",
        BUILD_AND_DELIVER_ESTIMATE_S,
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        with (log_dir / "xds-clients.log").open("wb") as log:
            return asyncio.run(_measure(durations, log, progress))
    except (ImportError, RuntimeError, TimeoutError, OSError, ValueError, AttributeError, TypeError) as exc:
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}


# ---- the simulated agents (child process) ---------------------------------------------------------------------------


async def _client(target: str, index: int, stats: dict[str, int]) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
    from google.protobuf import struct_pb2

    from controller.xds_server import PUSH_ORDER

    node_name = f"scale-node-{index:02d}"
    queue: asyncio.Queue[discovery_pb2.DeltaDiscoveryRequest] = asyncio.Queue()
    metadata = struct_pb2.Struct(fields={"NODE_NAME": struct_pb2.Value(string_value=node_name)})
    node = base_pb2.Node(id=f"ztunnel~10.0.0.{index}~{node_name}.istio-system~istio-system.svc", metadata=metadata)
    for type_url in PUSH_ORDER:
        queue.put_nowait(discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=type_url))

    async def requests() -> AsyncIterator[discovery_pb2.DeltaDiscoveryRequest]:
        while True:
            yield await queue.get()

    options = [("grpc.max_receive_message_length", -1), ("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        async for response in stub.DeltaAggregatedResources(requests()):
            stats["responses"] += 1
            stats["resources"] += len(response.resources)
            queue.put_nowait(
                discovery_pb2.DeltaDiscoveryRequest(type_url=response.type_url, response_nonce=response.nonce)
            )


async def _clients_main(target: str, count: int) -> None:
    stats = {"responses": 0, "resources": 0}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(_client(target, i, stats)) for i in range(count)]
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        if task in done and task.exception() is not None:
            print(f"client failed: {task.exception()!r}", file=sys.stderr)
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(stats))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.config_scale")
    sub = parser.add_subparsers(dest="command", required=True)
    clients = sub.add_parser("clients", help="simulated delta-xDS agents (started by the bench)")
    clients.add_argument("--target", required=True)
    clients.add_argument("--count", type=int, default=50)
    args = parser.parse_args(argv)
    asyncio.run(_clients_main(args.target, args.count))


if __name__ == "__main__":
    main()
