"""The admin port's POST /logging takes what ztunnel's takes and `istioctl ztunnel-config log` sends
(istio/istio istioctl/pkg/ztunnelconfig/ztunnelconfig.go logCmd: ``level=<level>`` with ``warning`` sent as
``warn``, ``level=<logger>:<level>,<level>``, ``level=info&reset`` for -r, and ``level=`` with no --level, which
ztunnel answers with the current levels: src/admin.rs handle_logging, levels error|warn|info|debug|trace|off).

Before, only Python's level names were known (``warn``, ``trace`` and ``off`` were 400), the ``level`` value was
one level for the root logger (``access:debug,info`` was 400), a request with no level was 400 instead of the
current levels, and a request naming several loggers set the ones before a bad one and then answered 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from agent.admin import admin_server

NAMES = ("t2.access", "t2.xds", "t2.proxy")


@pytest.fixture(autouse=True)
def levels() -> Iterator[None]:
    """The root logger's and the test loggers' levels, put back afterwards."""
    root = logging.getLogger().level
    try:
        yield
    finally:
        logging.getLogger().setLevel(root)
        for name in NAMES:
            logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.fixture
async def admin() -> AsyncIterator[int]:
    """The admin server's port, on loopback."""
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("t2.access").setLevel(logging.WARNING)  # as --log-level info,t2.access=warning at start
    server = admin_server(lambda: {}, lambda: [], lambda: None)
    await server.start("127.0.0.1", 0)
    try:
        yield server.port
    finally:
        await server.close()


async def _post(port: int, query: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /logging?{query} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n".encode())
    head, _, body = (await reader.read()).partition(b"\r\n\r\n")
    writer.close()
    return int(head.split()[1]), body.decode()


def _level(name: str | None = None) -> int:
    return logging.getLogger(name).level


@pytest.mark.parametrize(
    ("level", "expected"),
    [("warn", logging.WARNING), ("WARN", logging.WARNING), ("trace", logging.DEBUG), ("error", logging.ERROR)],
)
async def test_ztunnels_level_names(admin: int, level: str, expected: int) -> None:
    status, body = await _post(admin, f"level={level}")
    assert status == 200, body
    assert _level() == expected


async def test_off_silences(admin: int) -> None:
    status, _ = await _post(admin, "level=off")
    assert status == 200
    assert not logging.getLogger("t2.proxy").isEnabledFor(logging.CRITICAL)


async def test_per_logger_levels_in_the_level_value(admin: int) -> None:
    status, body = await _post(admin, "level=t2.xds:debug,t2.proxy=error,warn")
    assert status == 200, body
    assert (_level("t2.xds"), _level("t2.proxy"), _level()) == (logging.DEBUG, logging.ERROR, logging.WARNING)
    assert json.loads(body)["t2.xds"] == "debug"


async def test_no_level_answers_the_current_levels(admin: int) -> None:
    for query in ("", "level="):
        status, body = await _post(admin, query)
        assert status == 200, body
        assert json.loads(body)["level"] == "info" and json.loads(body)["t2.access"] == "warning"


async def test_a_bad_level_changes_nothing(admin: int) -> None:
    status, body = await _post(admin, "t2.xds=debug&t2.proxy=loud")
    assert status == 400 and "loud" in body
    assert _level("t2.xds") == logging.NOTSET, "the valid part was not applied either"
    status, _ = await _post(admin, "level=t2.xds:debug,loud")
    assert status == 400
    assert _level("t2.xds") == logging.NOTSET and _level() == logging.INFO


async def test_reset_puts_back_the_levels_the_agent_started_with(admin: int) -> None:
    assert (await _post(admin, "level=t2.access:debug,t2.xds:error,debug"))[0] == 200
    status, body = await _post(admin, "level=info&reset=1")
    assert status == 200, body
    assert (_level(), _level("t2.access"), _level("t2.xds")) == (logging.INFO, logging.WARNING, logging.NOTSET)


async def test_off_is_named_off(admin: int) -> None:
    status, body = await _post(admin, "level=t2.proxy:off")
    assert status == 200 and json.loads(body)["t2.proxy"] == "off"
