"""A deleted Service's series leave /metrics as a deleted workload's do, under the same rules: the service is gone
from the agent's state (by its destination_service, _namespace and _name labels), no open connection carries the
series, and it has not changed for the expiry interval. Its workloads may live on (a Service deleted or renamed
while its pods stay, or a ServiceEntry removed): before, the series they carried with its name stayed for good.

ztunnel keeps every series (src/proxy/metrics.rs: prometheus_client Families that nothing removes from, by workload
or service; istio/ztunnel#1719, open). Real store (xDS deltas), real Metrics and exposition; the clock is the test's.
"""

from __future__ import annotations

import ipaddress

import pytest

from agent.metrics import Metrics, sample_value, traffic_label_values
from agent.metrics_expiry import SeriesExpiry
from agent.prometheus import render
from agent.state import ADDRESS_TYPE, WorkloadStore, address_name
from api.istio.workload import workload_pb2 as wpb
from tests.support.workloads import pod_workload

INTERVAL = 300.0
CLIENT = pod_workload("sleep-1", "client", "10.0.0.1", sa="sleep", deployment="sleep")
SERVER = pod_workload("echo-1", "server", "10.0.0.2", sa="echo", deployment="echo")


def _service(name: str, vip: str) -> wpb.Service:
    return wpb.Service(
        name=name,
        namespace="server",
        hostname=f"{name}.server.svc.cluster.local",
        addresses=[wpb.NetworkAddress(address=ipaddress.ip_address(vip).packed)],
    )


OLD = _service("echo-old", "10.96.0.1")
NEW = _service("echo", "10.96.0.2")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Env = tuple[Metrics, WorkloadStore, SeriesExpiry, Clock]


@pytest.fixture
def env() -> Env:
    m, store, clock = Metrics(), WorkloadStore(), Clock()
    store.put([CLIENT, SERVER, OLD, NEW])
    expiry = SeriesExpiry(m, store.all_workloads, INTERVAL, clock=clock, services=store.all_services)
    return m, store, expiry, clock


def _labels(service: wpb.Service | None) -> tuple[str, ...]:
    return traffic_label_values(reporter="source", src=CLIENT, dst=SERVER, service=service, mtls=True)


def _connection(m: Metrics, labels: tuple[str, ...]) -> None:
    m.connection_opened(labels)
    m.connection_closed(labels, 10, 20)


def _opened(m: Metrics, service: str) -> float:
    return sample_value(m, "istio_tcp_connections_opened_total", {"destination_service_name": service})


def _delete(store: WorkloadStore, svc: wpb.Service) -> None:
    store.apply(ADDRESS_TYPE, {}, removed=[address_name(wpb.Address(service=svc))])


async def test_a_deleted_services_idle_series_expire_while_its_workloads_live_on(env: Env) -> None:
    m, store, expiry, clock = env
    _connection(m, _labels(OLD))
    _connection(m, _labels(NEW))
    _connection(m, _labels(None))  # the pod called by its own address: no service, `unknown`
    _delete(store, OLD)
    assert store.workload_by_ip("10.0.0.2") is not None, "its workloads stay"

    assert await expiry.sweep() == 0  # first seen idle now
    clock.now += INTERVAL - 1
    assert await expiry.sweep() == 0
    clock.now += 1
    assert await expiry.sweep() == 4  # opened, closed, received, sent
    text = render(m.registry)[0].decode()
    assert 'destination_service_name="echo-old"' not in text
    assert _opened(m, "echo") == 1, "a live service's series stay, however idle"
    assert _opened(m, "unknown") == 1, "a series naming no service is not a gone service's"
    m.registry.register(expiry)
    assert sample_value(m, "ambit_metric_series_expired_total") == 4


async def test_a_deleted_services_series_stay_while_a_connection_carries_them_or_they_change(env: Env) -> None:
    m, store, expiry, clock = env
    labels = _labels(OLD)
    _connection(m, labels)
    m.connection_opened(labels)
    m.relaying("conn", labels, lambda: (5, 0))  # opened before the delete, still relaying
    _delete(store, OLD)
    await expiry.sweep()
    clock.now += INTERVAL
    assert await expiry.sweep() == 0, "a connection with its labels is open: bytes still to come"
    m.relay_ended("conn")
    m.connection_closed(labels, 5, 0)
    assert await expiry.sweep() == 2, "opened and sent did not change at the close: idle long enough"
    clock.now += INTERVAL - 1
    assert await expiry.sweep() == 0, "closed and received changed at the close: idle again from then"
    clock.now += 1
    assert await expiry.sweep() == 2


async def test_a_service_back_before_expiry_keeps_its_series(env: Env) -> None:
    m, store, expiry, clock = env
    _connection(m, _labels(OLD))
    _delete(store, OLD)
    await expiry.sweep()
    store.put([OLD])
    clock.now += INTERVAL
    assert await expiry.sweep() == 0
    assert _opened(m, "echo-old") == 1
