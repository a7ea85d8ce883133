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

WEB_SERIAL = 0x7D671F2AA88A043512A8148096BA1CFC933644BC
ROOT: dict[str, str] = {
    "pem": "",
    "serialNumber": "1",
    "validFrom": "2026-01-01T00:00:00Z",
    "expirationTime": "2036-01-01T00:00:00Z",
}
# What an agent's /certs serves: ztunnel's certificates shape plus Ambit's refreshAt and lastError.
ROWS: list[dict[str, Any]] = [
    {
        "identity": "spiffe://cluster.local/ns/default/sa/web",
        "state": "Available",
        "certChain": [
            {
                "pem": "",
                "serialNumber": str(WEB_SERIAL),
                "validFrom": "2026-11-27T11:00:00Z",
                "expirationTime": "2026-11-28T11:00:00Z",
            }
        ],
        "rootCerts": [ROOT],
        "refreshAt": "2026-11-27T23:00:00Z",
        "lastError": "",
    },
    {
        "identity": "spiffe://cluster.local/ns/default/sa/db",
        "state": "Unavailable: PERMISSION_DENIED: node node1 runs no pod with service account default/db",
        "certChain": [],
        "rootCerts": [],
        "refreshAt": "",
        "lastError": "PERMISSION_DENIED: node node1 runs no pod with service account default/db",
    },
    {
        "identity": "spiffe://cluster.local/ns/default/sa/api",
        "state": "Initializing",
        "certChain": [],
        "rootCerts": [],
        "refreshAt": "",
        "lastError": "",
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
    assert web == [
        "spiffe://cluster.local/ns/default/sa/web",
        "Available",
        "7d671f2aa88a0435",  # the decimal serialNumber in hex, as the agent logs it
        "2026-11-28T11:00:00Z",
        "22h30m",
        "-",
    ]
    db = lines[2].split()
    assert db[:5] == ["spiffe://cluster.local/ns/default/sa/db", "Unavailable", "-", "-", "-"]
    assert " ".join(db[5:]) == "PERMISSION_DENIED: node node1 runs no pod with service account default/db"
    assert lines[3].split() == ["spiffe://cluster.local/ns/default/sa/api", "Initializing", "-", "-", "-", "-"]


def test_table_shows_a_failing_refresh_of_a_held_certificate() -> None:
    now = datetime.datetime(2026, 11, 27, 12, 30, tzinfo=datetime.UTC)
    failing = {**ROWS[0], "lastError": "UNAVAILABLE: controller down"}
    assert format_table([failing], now).splitlines()[1].split()[1:] == [
        "Available",
        "7d671f2aa88a0435",
        "2026-11-28T11:00:00Z",
        "22h30m",
        "UNAVAILABLE:",
        "controller",
        "down",
    ]


def test_table_reads_a_ztunnel_dump_without_our_extra_keys() -> None:
    """ztunnel's entries have no lastError: an Unavailable one's reason is in its state."""
    ztunnel = [{k: v for k, v in r.items() if k not in ("refreshAt", "lastError")} for r in ROWS]
    now = datetime.datetime(2026, 11, 27, 12, 30, tzinfo=datetime.UTC)
    lines = format_table(ztunnel, now).splitlines()
    assert lines[1].split()[1:5] == ["Available", "7d671f2aa88a0435", "2026-11-28T11:00:00Z", "22h30m"]
    assert lines[2].split()[1] == "Unavailable" and lines[2].endswith("service account default/db")


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


def test_expiry_is_the_chains_earliest() -> None:
    """A leaf signed past its intermediate's expiry (istiod does) is refused by peers from that expiry on."""
    now = datetime.datetime(2026, 11, 27, 12, 30, tzinfo=datetime.UTC)
    intermediate = {**ROOT, "serialNumber": "2", "expirationTime": "2026-11-27T18:00:00Z"}
    entry = {**ROWS[0], "certChain": [*ROWS[0]["certChain"], intermediate]}
    assert format_table([entry], now).splitlines()[1].split()[3:5] == ["2026-11-27T18:00:00Z", "5h30m"]
    garbled = {**entry, "certChain": [*ROWS[0]["certChain"], {**intermediate, "expirationTime": "soon"}]}
    assert format_table([garbled], now).splitlines()[1].split()[3:5] == ["2026-11-28T11:00:00Z", "22h30m"]
