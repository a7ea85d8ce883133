"""Compressed scrapes: the metrics server gzips /metrics when the scraper takes gzip (Prometheus always asks), the
body decodes to what an uncompressed scrape says, and a large scrape hands the loop back while it is rendered and
compressed."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
from collections.abc import AsyncIterator, Mapping

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from agent.admin import metrics_server
from agent.metrics import TRAFFIC_LABELS, Metrics
from agent.prometheus import gzip_accepted, render, render_async
from common.http import HttpServer
from tests.support.waiting import LoopTurns

# What Prometheus 2.x sends with every scrape (scrape/scrape.go: acceptHeader, Accept-Encoding, the timeout header).
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
    "User-Agent": "Prometheus/2.42.0",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
}


def _populated(workloads: int) -> Metrics:
    m = Metrics()
    for i in range(workloads):
        labels = tuple(
            f"wl-{i}" if name in ("source_workload", "destination_workload") else "tcp" for name in TRAFFIC_LABELS
        )
        m.connection_opened(labels)
        m.connection_closed(labels, 100 + i, 200 + i)
    return m


@pytest.fixture
async def server() -> AsyncIterator[tuple[HttpServer, Metrics]]:
    m = _populated(300)
    srv = metrics_server(m)
    await srv.start("127.0.0.1", 0)
    try:
        yield srv, m
    finally:
        await srv.close()


async def _get(port: int, headers: Mapping[str, str]) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: t\r\n{head}\r\n".encode())
    raw = await reader.read()
    writer.close()
    top, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = top.decode().split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert int(fields["content-length"]) == len(body)
    return status, fields, body


def _samples(text: str, openmetrics: bool) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample but the process's open descriptors (the scrape's own socket is one of them)."""
    families = parse_openmetrics(text) if openmetrics else parse_text(text)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families
        for s in f.samples
        if s.name != "process_open_fds"
    }


async def test_a_prometheus_scrape_is_gzipped_and_decodes_to_the_plain_scrape(
    server: tuple[HttpServer, Metrics],
) -> None:
    srv, m = server
    status, fields, body = await _get(srv.port, PROMETHEUS_HEADERS)
    assert status.startswith("HTTP/1.1 200")
    assert fields["content-encoding"] == "gzip"
    assert fields["vary"] == "Accept-Encoding"
    assert fields["content-type"].startswith("application/openmetrics-text")
    text = gzip.decompress(body).decode()
    plain, _ = render(m.registry, PROMETHEUS_HEADERS["Accept"])
    samples = _samples(text, openmetrics=True)
    assert samples == _samples(plain.decode(), openmetrics=True)
    labels = tuple(sorted((n, "wl-7" if n.endswith("_workload") else "tcp") for n in TRAFFIC_LABELS))
    assert samples[("istio_tcp_received_bytes_total", labels)] == 107.0
    assert len(body) * 5 < len(plain)  # compressed, not only wrapped


async def test_no_gzip_unless_asked(server: tuple[HttpServer, Metrics]) -> None:
    srv, m = server
    for encoding in (None, "identity", "gzip;q=0", "br, deflate"):
        headers = {} if encoding is None else {"Accept-Encoding": encoding}
        status, fields, body = await _get(srv.port, headers)
        assert status.startswith("HTTP/1.1 200") and "content-encoding" not in fields, encoding
        assert _samples(body.decode(), openmetrics=False) == _samples(render(m.registry)[0].decode(), False)


async def test_curl_compressed_reads_the_gzipped_scrape(server: tuple[HttpServer, Metrics]) -> None:
    srv, m = server
    done = await asyncio.to_thread(
        subprocess.run,
        ["curl", "-sS", "--compressed", "-D", "-", f"http://127.0.0.1:{srv.port}/stats/prometheus"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    head, _, text = done.stdout.partition(b"\r\n\r\n")
    assert b"content-encoding: gzip" in head.lower()
    assert _samples(text.decode(), openmetrics=False) == _samples(render(m.registry)[0].decode(), openmetrics=False)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("gzip", True),
        ("deflate, gzip", True),
        ("GZIP;q=0.5", True),
        ("gzip;q=0", False),
        ("gzip; q=0.000", False),
        ("gzip;q=bad", False),
        ("x-gzip", False),
        ("*", False),
        ("", False),
    ],
)
def test_gzip_accepted(header: str, expected: bool) -> None:
    assert gzip_accepted(header) is expected


async def test_a_large_gzipped_scrape_hands_the_loop_back() -> None:
    m = _populated(2000)  # 8,000 traffic series
    async with LoopTurns() as loop:
        start = loop.turns
        body, _ = await render_async(m.registry, gzip=True, lines_per_turn=250)
        during = loop.turns - start
    assert _samples(gzip.decompress(body).decode(), False) == _samples(render(m.registry)[0].decode(), False)
    assert during >= 8000 // 250  # the ticker ran between every two turns of rendering and compressing
