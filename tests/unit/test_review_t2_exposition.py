"""The metrics server's answer depends on the request's Accept (OpenMetrics or the 0.0.4 text) as much as on its
Accept-Encoding, so its Vary names both (RFC 9110 12.5.5: a response chosen by content negotiation lists the
fields that chose it). With Accept-Encoding alone, a cache between the scraper and the agent (a proxy of a
federation or a remote scrape) could answer a text scraper with an OpenMetrics body it stored for another."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from agent.admin import metrics_server
from agent.metrics import Metrics
from agent.prometheus import wants_openmetrics
from common.http import HttpServer


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    srv = metrics_server(Metrics())
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.close()


async def _head(port: int, accept: str) -> dict[str, str]:
    """The response's header fields, the values of a field given on several lines joined by commas, as a
    recipient combines them (RFC 9110 5.3)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: {accept}\r\n\r\n".encode())
    top, _, _ = (await reader.read()).partition(b"\r\n\r\n")
    writer.close()
    fields: dict[str, str] = {}
    for name, _, value in (line.partition(":") for line in top.decode().split("\r\n")[1:]):
        key = name.lower()
        fields[key] = f"{fields[key]}, {value.strip()}" if key in fields else value.strip()
    return fields


async def test_vary_names_accept_and_accept_encoding(server: HttpServer) -> None:
    text = await _head(server.port, "text/plain")
    openmetrics = await _head(server.port, "application/openmetrics-text;version=1.0.0")
    assert text["content-type"] != openmetrics["content-type"], "Accept chooses the body"
    for fields in (text, openmetrics):
        assert {v.strip().lower() for v in fields["vary"].split(",")} == {"accept", "accept-encoding"}


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        # Prometheus 3's and 2's own headers (scrape/scrape.go acceptHeader) ask for OpenMetrics first
        (
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
            "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
            "text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
            True,
        ),
        ("application/openmetrics-text; version=0.0.1,text/plain;version=0.0.4;q=0.5,*/*;q=0.1", True),
        # q=0 is 'not acceptable' (RFC 9110 12.4.2): a client that refuses OpenMetrics gets the text
        ("application/openmetrics-text;q=0, text/plain", False),
        ("application/openmetrics-text; Q=0.000, text/plain", False),
        ("application/openmetrics-text;q=0.001", True),
        ("text/plain, application/openmetrics-text", True),  # listed at all, with a non-zero weight, as ztunnel
    ],
)
def test_openmetrics_negotiation(accept: str, openmetrics: bool) -> None:
    assert wants_openmetrics(accept) is openmetrics
