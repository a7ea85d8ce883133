"""The inbound HBONE access-log line's addresses, as ztunnel's build_inbound_request logs them (istio/ztunnel
src/proxy/inbound.rs: "For consistency with outbound logs, report the original destination (with 15008 port) as
dst.addr, and the target address as dst.hbone_addr"): the two sides of one connection name the same pair, and
an early refusal (log_early_deny) names the connection's own destination too."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from agent.accesslog import AccessLog
from agent.inbound import InboundProxy
from agent.tunnel import RelayResult
from common.spiffe import Identity
from tests.unit.test_proxy_connections import CURL, SERVER, _Certs, _FakeRequest, fake_pod_and_relay, server_registry

SERVER_ID = Identity("cluster.local", "server", "default")
ORIG_DST = ("10.2.0.7", 15008)


async def _access_line(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, authority: str) -> Any:
    store, metrics, registry = server_registry()
    proxy = InboundProxy(store, _Certs(), "n2", metrics, AccessLog(metrics), registry)

    fake_pod_and_relay(monkeypatch, RelayResult(3, 4))
    with caplog.at_level(logging.INFO, logger="access"):
        await proxy._connect(_FakeRequest(authority, CURL), SERVER, SERVER_ID, ORIG_DST, ("10.1.0.6", 1))  # type: ignore[arg-type]
    [line] = [r for r in caplog.records if r.name == "access"]
    return line


async def test_dst_addr_is_the_tunnels_and_hbone_addr_the_authority(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    line = await _access_line(monkeypatch, caplog, "10.2.0.7:8080")
    assert line.getMessage() == "connection complete"
    assert (line.fields["dst.addr"], line.fields["dst.hbone_addr"]) == ("10.2.0.7:15008", "10.2.0.7:8080")


async def test_an_early_refusal_names_the_connections_destination(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A CONNECT to one of the agent's own ports (ztunnel: SelfCall, from find_inbound_upstream) is refused before
    the record exists: log_early_deny(src, conn.dst), the address the tunnel reached."""
    line = await _access_line(monkeypatch, caplog, "10.2.0.7:15001")
    assert (line.getMessage(), line.fields["error"]) == ("connection failed", "self_call")
    assert line.fields["dst.addr"] == "10.2.0.7:15008"
