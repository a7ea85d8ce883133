"""`ambitctl certs`: reading an agent's /certs over HTTP and printing the table."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from typing import Any

import pytest

from cli import ambitctl
from cli.certs import format_table
from tests.support.json_endpoint import serve_json

ROWS = [
    {
        "identity": "spiffe://cluster.local/ns/default/sa/web",
        "serial": "7d671f2aa88a043512a8148096ba1cfc933644bc",
        "not_before": "2026-11-27T11:00:00Z",
        "expiry": "2026-11-28T11:00:00Z",
        "refresh_at": "2026-11-27T23:00:00Z",
        "state": "valid",
        "last_error": "",
    },
    {
        "identity": "spiffe://cluster.local/ns/default/sa/db",
        "serial": "",
        "not_before": "",
        "expiry": "",
        "refresh_at": "",
        "state": "error",
        "last_error": "PERMISSION_DENIED: node node1 runs no pod with service account default/db",
    },
]


@pytest.fixture
def admin() -> Iterator[tuple[str, list[Any]]]:
    served: list[Any] = [ROWS]
    with serve_json("/certs", served) as address:
        yield address, served


def test_table_shows_identity_state_serial_and_remaining_time() -> None:
    now = datetime.datetime(2026, 11, 27, 12, 30, tzinfo=datetime.UTC)
    lines = format_table(ROWS, now).splitlines()
    assert lines[0].split() == ["IDENTITY", "STATE", "SERIAL", "EXPIRY", "REMAINING", "LAST", "ERROR"]
    web = lines[1].split()
    assert web[:5] == [
        "spiffe://cluster.local/ns/default/sa/web",
        "valid",
        "7d671f2aa88a0435",
        "2026-11-28T11:00:00Z",
        "22h30m",
    ]
    assert "runs no pod" in lines[2] and lines[2].split()[1] == "error"


def test_table_marks_expired() -> None:
    now = datetime.datetime(2026, 11, 29, tzinfo=datetime.UTC)
    assert "EXPIRED" in format_table(ROWS[:1], now)


def test_ambitctl_certs_against_admin_port(admin: tuple[str, list[Any]], capsys: pytest.CaptureFixture[str]) -> None:
    address, _ = admin
    assert ambitctl.main(["certs", "--admin", address]) == 0
    out = capsys.readouterr().out
    assert "spiffe://cluster.local/ns/default/sa/web" in out and "spiffe://cluster.local/ns/default/sa/db" in out
    assert ambitctl.main(["certs", "--admin", address, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ROWS


def test_ambitctl_certs_reports_unreachable_agent(capsys: pytest.CaptureFixture[str]) -> None:
    assert ambitctl.main(["certs", "--admin", "127.0.0.1:9"]) == 1
    assert "ambitctl certs: agent admin 127.0.0.1:9" in capsys.readouterr().err


def test_ambitctl_certs_rejects_non_list(admin: tuple[str, list[Any]], capsys: pytest.CaptureFixture[str]) -> None:
    address, served = admin
    served[0] = {"certificates": "nope"}
    assert ambitctl.main(["certs", "--admin", address]) == 1
    assert "did not return a list" in capsys.readouterr().err
