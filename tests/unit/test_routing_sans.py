"""The identities an endpoint reached through a service may prove (agent.outbound.accepted_sans): the service's
subject_alt_names as SPIFFE IDs, as ztunnel's upstream_sans; the pool side is in test_pool_behaviour.py."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from agent.outbound import accepted_sans
from agent.state import WorkloadStore
from api.istio.workload import workload_pb2 as wpb
from common.spiffe import Identity


def entry(*sans: str) -> wpb.Service:
    return wpb.Service(
        name="db",
        namespace="data",
        hostname="db.example.com",
        addresses=[wpb.NetworkAddress(address=ipaddress.ip_address("10.96.0.30").packed)],
        ports=[wpb.Port(service_port=5432, target_port=5432)],
        subject_alt_names=list(sans),
    )


def test_sans_are_parsed_and_a_non_spiffe_one_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    s = WorkloadStore()
    s.put([entry("spiffe://cluster.local/ns/data/sa/db-vm", "db.example.com", "spiffe://other.td/ns/x/sa/y")])
    svc = s.service_by_vip("10.96.0.30")
    with caplog.at_level(logging.WARNING, logger="agent.outbound"):
        assert accepted_sans(s, svc) == {Identity("cluster.local", "data", "db-vm"), Identity("other.td", "x", "y")}
        accepted_sans(s, svc)
    assert [r.getMessage() for r in caplog.records] == ["ignoring subject_alt_names that are no SPIFFE ID"]
    assert accepted_sans(s, None) == frozenset()


def test_a_changed_service_is_read_again() -> None:
    s = WorkloadStore()
    s.put([entry("spiffe://cluster.local/ns/data/sa/a")])
    assert accepted_sans(s, s.service_by_vip("10.96.0.30")) == {Identity("cluster.local", "data", "a")}
    s.put([entry()])
    assert accepted_sans(s, s.service_by_vip("10.96.0.30")) == frozenset()
