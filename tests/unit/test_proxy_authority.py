"""HBONE :authority and forwarded header parsing/validation (agent.addressing, agent.inbound)."""

from __future__ import annotations

import pytest

from agent.addressing import BadAuthority, format_address, parse_authority
from agent.inbound import forwarded, original_client, validate_authority

GOOD = [
    ("10.0.0.1:8080", ("10.0.0.1", 8080)),
    ("10.0.0.1:1", ("10.0.0.1", 1)),
    ("10.0.0.1:65535", ("10.0.0.1", 65535)),
    ("[fd00::1]:80", ("fd00::1", 80)),
    ("[FD00:0::1]:80", ("fd00::1", 80)),  # normalised, so it compares equal to the local address text
]

BAD = [
    "",
    "10.0.0.1",
    "10.0.0.1:",
    "10.0.0.1:0",
    "10.0.0.1:65536",
    "10.0.0.1:123456",
    "10.0.0.1:-1",
    "10.0.0.1:8o",
    "svc.ns.svc.cluster.local:80",
    "fd00::1:80",
    "[10.0.0.1]:80",
    "10.0.0.256:80",
    ":80",
    "10.0.0.1:80 ",
    "10.0.0.1:\u00b9",  # superscript one: str.isdigit() but not int()-able (latin-1 header bytes decode to it)
    "10.0.0.1:\uff18\uff10",  # fullwidth "80": int() takes it, an HTTP authority does not
    "[fd00::1]:\u00b2\u00b3",
]


@pytest.mark.parametrize(("text", "addr"), GOOD)
def test_parse_good(text: str, addr: tuple[str, int]) -> None:
    assert parse_authority(text) == addr


@pytest.mark.parametrize("text", BAD)
def test_parse_bad(text: str) -> None:
    with pytest.raises(BadAuthority):
        parse_authority(text)


def test_format_roundtrip() -> None:
    for _, addr in GOOD:
        assert parse_authority(format_address(addr)) == addr


@pytest.mark.parametrize(
    ("authority", "local", "ok"),
    [
        ("10.0.0.1:8080", "10.0.0.1", True),
        ("10.0.0.2:8080", "10.0.0.1", False),  # IP mismatch: 400 as ztunnel's validate_destination
        ("[fd00::1]:80", "fd00::1", True),
        ("garbage", "10.0.0.1", False),
    ],
)
def test_validate_authority(authority: str, local: str, ok: bool) -> None:
    if ok:
        assert validate_authority(authority, local)[0] == local
    else:
        with pytest.raises(BadAuthority):
            validate_authority(authority, local)


PEER4, PEER6 = ("10.1.0.5", 9), ("fd00::5", 9)  # the tunnel's TCP source


@pytest.mark.parametrize(
    ("peer", "headers", "client"),
    [
        (PEER4, [("forwarded", 'for="10.1.0.5:40000"')], ("10.1.0.5", 40000)),
        (PEER4, [("Forwarded", 'for="10.1.0.5:40000";host=svc.ns')], ("10.1.0.5", 40000)),
        (PEER6, [("forwarded", 'proto=http;for="[fd00::5]:1234"')], ("fd00::5", 1234)),
        (PEER6, [("forwarded", 'for="[FD00:0::5]:1234"')], ("fd00::5", 1234)),
        (PEER4, [("forwarded", "for=10.1.0.5:1")], ("10.1.0.5", 1)),
        # another address than the peer's is never believed: judged by its own (ztunnel: for= only from a waypoint)
        (PEER4, [("forwarded", 'for="10.1.0.6:40000"')], PEER4),
        (PEER6, [("forwarded", 'for="10.1.0.5:40000"')], PEER6),
        (PEER4, [("forwarded", 'for="unknown"')], PEER4),
        (PEER4, [("forwarded", 'for="10.1.0.5:\u00b2"')], PEER4),  # malformed: ignored, never raised
        (PEER4, [("forwarded", 'for="_hidden"')], PEER4),
        (PEER4, [("baggage", "x=1")], PEER4),
        (PEER4, [], PEER4),
    ],
)
def test_the_client_is_the_peer_with_the_port_it_forwarded(
    peer: tuple[str, int], headers: list[tuple[str, str]], client: tuple[str, int]
) -> None:
    assert original_client(peer, forwarded(headers)) == client


def test_forwarded_params() -> None:
    assert forwarded([("forwarded", 'for="10.1.0.5:1";host=echo.server.svc.cluster.local')]) == {
        "for": "10.1.0.5:1",
        "host": "echo.server.svc.cluster.local",
    }
    assert forwarded([("forwarded", "for=a;Host=b, for=c")]) == {"for": "a", "host": "b"}  # first element only
    assert forwarded([("forwarded", "garbage")]) == {}
    assert forwarded([]) == {}
