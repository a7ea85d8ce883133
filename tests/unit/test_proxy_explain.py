"""`/explain` on the agent's admin port: the live store's policy decision for a hypothetical connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from agent.admin import admin_server
from agent.state import WorkloadStore
from api.istio.security import authorization_pb2 as apb
from common.http import HttpServer
from tests.support.http_get import http_get
from tests.support.workloads import pod_workload


@pytest.fixture
async def admin() -> AsyncIterator[HttpServer]:
    store = WorkloadStore()
    store.put(
        [
            pod_workload("sleep-1", "client", "10.1.0.5", sa="sleep"),
            pod_workload("curl-1", "client", "10.1.0.6", sa="curl"),
            pod_workload("echo-1", "server", "10.2.0.7", sa="echo", authorization_policies=["server/deny-curl"]),
        ],
        [
            apb.Authorization(
                name="deny-curl",
                namespace="server",
                scope=apb.WORKLOAD_SELECTOR,
                action=apb.DENY,
                groups=[
                    apb.Group(
                        rules=[
                            apb.Rules(
                                matches=[
                                    apb.Match(principals=[apb.StringMatch(exact="cluster.local/ns/client/sa/curl")])
                                ]
                            )
                        ]
                    )
                ],
            ),
            apb.Authorization(
                name="allow-client-ns",
                namespace="server",
                scope=apb.NAMESPACE,
                groups=[
                    apb.Group(rules=[apb.Rules(matches=[apb.Match(namespaces=[apb.StringMatch(exact="client")])])])
                ],
            ),
        ],
    )
    server = admin_server(dict, list, lambda: None, store, "cluster.local")
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()


async def get(server: HttpServer, query: str) -> tuple[int, str]:
    return await http_get(f"http://127.0.0.1:{server.port}/explain?{query}")


async def test_explain_decisions(admin: HttpServer) -> None:
    status, body = await get(admin, "src=10.1.0.5&dst=10.2.0.7:8080")
    got = json.loads(body)
    assert status == 200
    assert (got["decision"], got["policy"]) == ("allow", "server/allow-client-ns")
    assert got["connection"].startswith("10.1.0.5:0(spiffe://cluster.local/ns/client/sa/sleep)")
    assert sorted(got["applicable_policies"]) == ["server/allow-client-ns", "server/deny-curl"]

    got = json.loads((await get(admin, "src=10.1.0.6&dst=10.2.0.7:8080"))[1])
    assert (got["decision"], got["policy"]) == ("deny", "server/deny-curl")

    got = json.loads((await get(admin, "src=10.1.0.5&dst=10.2.0.7:8080&plaintext=1"))[1])
    assert (got["decision"], got["reason"]) == ("deny", "denied: no allow policy matched")

    got = json.loads(
        (await get(admin, "src=192.0.2.1&dst=10.2.0.7:8080&identity=spiffe://cluster.local/ns/client/sa/x"))[1]
    )
    assert got["decision"] == "allow" and got["source_workload"] is None


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("dst=10.2.0.7:8080", 400),
        ("src=10.1.0.5", 400),
        ("src=nope&dst=10.2.0.7:8080", 400),
        ("src=10.1.0.5&dst=10.2.0.7", 400),
        ("src=10.1.0.5&dst=10.2.0.7:8080&identity=bogus", 400),
        ("src=10.1.0.5&dst=10.9.9.9:80", 404),
    ],
)
async def test_explain_bad_queries(admin: HttpServer, query: str, status: int) -> None:
    assert (await get(admin, query))[0] == status


async def test_ambitctl_explain(admin: HttpServer, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.ambitctl import build_parser

    def run(*argv: str) -> int:
        args = build_parser().parse_args(["explain", "--admin", f"127.0.0.1:{admin.port}", *argv])
        return int(args.func(args))

    assert await asyncio.to_thread(run, "--src", "10.1.0.6", "--dst", "10.2.0.7:8080") == 3
    out = capsys.readouterr().out
    assert out.startswith("DENY: denied by deny policy (server/deny-curl)")
    assert "spiffe://cluster.local/ns/client/sa/curl" in out
    assert await asyncio.to_thread(run, "--src", "10.1.0.5", "--dst", "10.2.0.7:8080") == 0
    assert capsys.readouterr().out.startswith("ALLOW: allowed by policy (server/allow-client-ns)")
    assert await asyncio.to_thread(run, "--src", "10.1.0.5", "--dst", "10.9.9.9:80") == 1
    assert "not the address of any workload" in capsys.readouterr().err
