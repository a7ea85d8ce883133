"""The controller's /debug/ dumps (every workload, address, identity and policy of the mesh) answer local clients only:
any pod can reach the monitoring port, which Prometheus must scrape (security review: a pod read
/debug/config_dump). istiod guards its debug endpoints likewise (ENABLE_DEBUG_ENDPOINT_AUTH: a token or localhost).
/metrics and readiness stay open; --open-debug-endpoints opens the dumps."""

from __future__ import annotations

import asyncio

import pytest

from common import flags
from common.http import Request, Response
from controller.main import ControllerConfig
from controller.monitoring import monitoring_server

ROUTES = {"/debug/config_dump": lambda: Response.json({"mesh": "secrets"}), "/metrics": lambda: Response.text("m\n")}


def _request(path: str, from_loopback: bool) -> Request:
    return Request("GET", path, {}, {}, "HTTP/1.1", from_loopback)


@pytest.mark.parametrize(
    ("path", "from_loopback", "open_debug", "status"),
    [
        ("/debug/config_dump", False, False, 403),
        ("/debug/config_dump", True, False, 200),
        ("/debug/config_dump", False, True, 200),
        ("/metrics", False, False, 200),
    ],
)
async def test_debug_dumps_answer_local_clients_only(
    path: str, from_loopback: bool, open_debug: bool, status: int
) -> None:
    server = monitoring_server(ROUTES, open_debug=open_debug)
    resp = await server.routes[("GET", path)](_request(path, from_loopback))
    assert resp.status == status, resp.body
    if status == 403:
        assert b"kubectl port-forward" in resp.body and b"secrets" not in resp.body


async def test_a_loopback_peer_is_told_apart_by_the_server() -> None:
    server = monitoring_server(ROUTES)
    await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /debug/config_dump HTTP/1.1\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
    finally:
        await server.close()
    assert answer.startswith(b"HTTP/1.1 200") and b"secrets" in answer


def test_the_flag_opens_them() -> None:
    assert flags.parse(ControllerConfig, ["--config-dir", "x"]).open_debug_endpoints is False
    assert flags.parse(ControllerConfig, ["--config-dir", "x", "--open-debug-endpoints"]).open_debug_endpoints is True
