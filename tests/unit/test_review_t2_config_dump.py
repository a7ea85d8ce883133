"""/config_dump does not stop the event loop while it is made: every agent holds every workload of the mesh, and
with 10,000 the store's snapshot and its JSON took 2 s of CPU here, during which nothing else on the loop ran (every
relay of the node, the metrics scrape, and the readiness probe, which has a server of its own so that /config_dump
"never sits in its queue", but not a loop of its own). ztunnel's admin server runs on a runtime of its own.

The test sends a probe to the readiness server once the dump has begun and checks the probe was answered before
the dump's snapshot ended: an order of events, not a timing. The dump's content is the same whole (checked against
the synchronous assembler)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any

import pytest

from agent import admin as admin_module
from agent.admin import admin_server, config_dump, readiness_server
from agent.state import WorkloadStore
from tests.support.workloads import pod_workload

WORKLOADS = 10_000


class Certs:
    def snapshot(self) -> list[dict[str, str]]:
        return [{"identity": "spiffe://cluster.local/ns/a/sa/b", "state": "Available"}]


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


async def test_the_readiness_probe_is_answered_while_a_large_config_dump_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = WorkloadStore()
    base = ipaddress.ip_address("10.0.0.0")
    store.put(
        pod_workload(f"p-{i}", f"ns{i % 50}", str(base + i), sa="sa", deployment=f"d{i % 300}", node=f"n{i % 100}")
        for i in range(WORKLOADS)
    )
    events: list[str] = []
    snapshot = admin_module.ztunnel_dump  # the store's part of the dump (agent.config_dump), made off the loop
    loop, begun = asyncio.get_running_loop(), asyncio.Event()

    def recorded_snapshot(*args: Any) -> dict[str, Any]:
        events.append("dump begins")
        loop.call_soon_threadsafe(begun.set)  # from whichever thread makes the dump
        try:
            return snapshot(*args)
        finally:
            events.append("dump ends")

    monkeypatch.setattr(admin_module, "ztunnel_dump", recorded_snapshot)

    def ready() -> tuple[bool, str]:
        events.append("probe")
        return True, ""

    dump = config_dump(store, Certs(), ("config", lambda: {"node": "n1"}))
    admin = admin_server(dump, Certs().snapshot, lambda: None)
    readiness = readiness_server(ready)
    await admin.start("127.0.0.1", 0)
    await readiness.start("127.0.0.1", 0)
    try:
        fetching = asyncio.create_task(_get(admin.port, "/config_dump"))
        await begun.wait()
        assert await _get(readiness.port, "/healthz/ready") == b"ready\n"
        body = await fetching
    finally:
        await admin.close()
        await readiness.close()
    assert events == ["dump begins", "probe", "dump ends"], "the probe waited for the dump"

    got = json.loads(body)
    monkeypatch.setattr(admin_module, "ztunnel_dump", snapshot)
    assert got == json.loads(json.dumps(dump(), default=str))
    assert len(got["workloads"]) == WORKLOADS and got["config"] == {"node": "n1"}
    assert list(got) == ["workloads", "services", "policies", "stagedServices", "certificates", "config"]
