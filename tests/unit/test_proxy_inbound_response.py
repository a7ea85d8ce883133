"""What inbound HBONE answers a CONNECT with: as ztunnel's build_response (ENABLE_RESPONSE_BAGGAGE, on by
default), the 200 carries the destination workload's `baggage`; refusals carry no headers."""

from __future__ import annotations

import pytest

from agent.accesslog import AccessLog
from agent.inbound import InboundProxy
from agent.tunnel import RelayResult
from api.istio.workload import workload_pb2 as wpb
from common.spiffe import Identity
from tests.unit.test_proxy_connections import (
    CURL,
    SERVER,
    _Certs,
    _FakeRequest,
    deny,
    fake_pod_and_relay,
    server_registry,
)

SERVER_ID = Identity("cluster.local", "server", "default")


async def answer(monkeypatch: pytest.MonkeyPatch, server: wpb.Workload, deny_curl: bool = False) -> _FakeRequest:
    store, metrics, registry = server_registry()
    store.put([server], policies=[deny(CURL.principal)] if deny_curl else [])
    proxy = InboundProxy(store, _Certs(), "n2", metrics, AccessLog(metrics), registry)

    fake_pod_and_relay(monkeypatch, RelayResult(0, 0, None))
    req = _FakeRequest("10.2.0.7:8080", CURL)
    await proxy._connect(req, server, SERVER_ID, ("10.2.0.7", 15008), ("10.1.0.6", 1))  # type: ignore[arg-type]
    return req


async def test_the_200_carries_the_destinations_baggage(monkeypatch: pytest.MonkeyPatch) -> None:
    described = wpb.Workload()
    described.CopyFrom(SERVER)
    described.workload_name, described.canonical_name, described.cluster_id = "echo", "echo", "Kubernetes"
    req = await answer(monkeypatch, described)
    assert req.statuses == [200]
    expected = "k8s.cluster.name=Kubernetes,k8s.namespace.name=server,k8s.deployment.name=echo,service.name=echo"
    assert req.response_headers == [[("baggage", expected)]]


async def test_no_baggage_when_nothing_describes_the_destination_or_on_a_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bare = wpb.Workload()
    bare.CopyFrom(SERVER)
    bare.namespace = ""  # nothing at all to say
    assert (await answer(monkeypatch, bare)).response_headers == [None]
    denied = await answer(monkeypatch, SERVER, deny_curl=True)
    assert denied.statuses == [401] and denied.response_headers == [None]
