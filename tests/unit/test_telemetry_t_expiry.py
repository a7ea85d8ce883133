"""Series of workloads gone from the agent's state leave /metrics once they stopped changing for the expiry
interval; a live workload's series stay, however idle, and its counters keep counting from where they were.

Real store (xDS deltas removing workloads), real Metrics and exposition; the clock is the test's."""

from __future__ import annotations

import pytest

from agent import metrics_expiry
from agent.main import AgentConfig
from agent.metrics import Metrics, sample_value, traffic_label_values
from agent.metrics_expiry import SeriesExpiry
from agent.prometheus import render
from agent.state import ADDRESS_TYPE, WorkloadStore
from common import flags
from common.spiffe import Identity
from tests.support.waiting import LoopTurns
from tests.support.workloads import pod_workload

INTERVAL = 300.0
CLIENT = pod_workload("sleep-1", "client", "10.0.0.1", sa="sleep", deployment="sleep")
SERVER = pod_workload("echo-1", "server", "10.0.0.2", sa="echo", deployment="echo")
GONE = pod_workload("batch-7", "jobs", "10.0.0.3", sa="batch", deployment="batch-7")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _labels(src: object, dst: object) -> tuple[str, ...]:
    return traffic_label_values(reporter="destination", src=src, dst=dst, mtls=True)


def _connection(m: Metrics, labels: tuple[str, ...], up: int = 10, down: int = 20) -> None:
    m.connection_opened(labels)
    m.connection_closed(labels, up, down)


def _received(m: Metrics, src_workload: str) -> float:
    return sample_value(m, "istio_tcp_received_bytes_total", {"source_workload": src_workload})


@pytest.fixture
def env() -> tuple[Metrics, WorkloadStore, SeriesExpiry, Clock]:
    m, store, clock = Metrics(), WorkloadStore(), Clock()
    store.put([CLIENT, SERVER, GONE])
    return m, store, SeriesExpiry(m, store.all_workloads, INTERVAL, clock=clock), clock


def _delete(store: WorkloadStore, wl: object) -> None:
    store.apply(ADDRESS_TYPE, {}, removed=[wl.uid])  # type: ignore[attr-defined]


async def test_a_deleted_workloads_idle_series_expire_and_live_ones_stay(
    env: tuple[Metrics, WorkloadStore, SeriesExpiry, Clock],
) -> None:
    m, store, expiry, clock = env
    live, gone = _labels(CLIENT, SERVER), _labels(GONE, SERVER)
    _connection(m, live)
    _connection(m, gone)
    _delete(store, GONE)

    assert await expiry.sweep() == 0  # first seen idle now
    clock.now += INTERVAL - 1
    assert await expiry.sweep() == 0
    clock.now += 1
    assert await expiry.sweep() == 4  # opened, closed, received, sent
    text = render(m.registry)[0].decode()
    assert 'source_workload="batch-7"' not in text
    assert _received(m, "sleep") == 10, "the live workload's series stayed, however idle"
    assert sample_value(m, "ambit_metric_series_expired_total") == 0  # not registered in this registry
    m.registry.register(expiry)
    assert sample_value(m, "ambit_metric_series_expired_total") == 4

    clock.now += 10 * INTERVAL
    assert await expiry.sweep() == 0
    _connection(m, live)
    assert _received(m, "sleep") == 20, "and keeps counting from where it was"


async def test_a_change_restarts_the_idle_time(env: tuple[Metrics, WorkloadStore, SeriesExpiry, Clock]) -> None:
    m, store, expiry, clock = env
    gone = _labels(SERVER, GONE)  # a live client of a server that went
    _connection(m, gone)
    _delete(store, GONE)
    await expiry.sweep()
    clock.now += INTERVAL - 1
    _connection(m, gone)  # a late connection (labels the client's agent still held)
    await expiry.sweep()
    clock.now += INTERVAL - 1
    assert await expiry.sweep() == 0
    assert sample_value(m, "istio_tcp_connections_opened_total", {"destination_workload": "batch-7"}) == 2
    clock.now += 1
    assert await expiry.sweep() == 4


async def test_a_relaying_connection_keeps_its_series(env: tuple[Metrics, WorkloadStore, SeriesExpiry, Clock]) -> None:
    m, store, expiry, clock = env
    labels = _labels(GONE, SERVER)
    _connection(m, labels)
    m.connection_opened(labels)
    m.relaying("conn", labels, lambda: (5, 0))  # still open: bytes to come on its series
    _delete(store, GONE)
    await expiry.sweep()
    clock.now += INTERVAL
    assert await expiry.sweep() == 0, "a connection with its labels is open: bytes still to come"
    assert sample_value(m, "istio_tcp_received_bytes_total", {"source_workload": "batch-7"}) == 15
    m.relay_ended("conn")
    m.connection_closed(labels, 5, 0)
    assert await expiry.sweep() == 2, "opened and sent did not change at the close: idle long enough"
    clock.now += INTERVAL
    assert await expiry.sweep() == 2  # closed and received, idle since the close


async def test_a_workload_back_before_expiry_keeps_its_series(
    env: tuple[Metrics, WorkloadStore, SeriesExpiry, Clock],
) -> None:
    m, store, expiry, clock = env
    _connection(m, _labels(GONE, SERVER))
    _delete(store, GONE)
    await expiry.sweep()
    store.put([GONE])
    clock.now += INTERVAL
    assert await expiry.sweep() == 0
    assert _received(m, "batch-7") == 10


async def test_an_agent_that_knows_no_workload_expires_nothing() -> None:
    m, store, clock = Metrics(), WorkloadStore(), Clock()
    expiry = SeriesExpiry(m, store.all_workloads, INTERVAL, clock=clock)
    _connection(m, _labels(GONE, SERVER))
    await expiry.sweep()
    clock.now += 2 * INTERVAL
    assert await expiry.sweep() == 0
    assert _received(m, "batch-7") == 10


async def test_on_demand_dns_series_of_a_gone_source_expire(
    env: tuple[Metrics, WorkloadStore, SeriesExpiry, Clock],
) -> None:
    m, store, expiry, clock = env
    m.on_demand_dns_requested(GONE, Identity("cluster.local", "jobs", "batch"), "api.example.com")
    m.on_demand_dns_requested(CLIENT, Identity("cluster.local", "client", "sleep"), "api.example.com")
    _delete(store, GONE)
    await expiry.sweep()
    clock.now += INTERVAL
    assert await expiry.sweep() == 1
    assert sample_value(m, "istio_on_demand_dns_total", {"source_workload": "batch-7"}) == 0
    assert sample_value(m, "istio_on_demand_dns_total", {"source_workload": "sleep"}) == 1


async def test_a_large_sweep_hands_the_loop_back(
    env: tuple[Metrics, WorkloadStore, SeriesExpiry, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    m, _store, expiry, clock = env
    monkeypatch.setattr(metrics_expiry, "ROWS_PER_TURN", 100)
    for i in range(1000):
        _connection(m, _labels(pod_workload(f"job-{i}", "jobs", "10.0.1.1", deployment=f"job-{i}"), SERVER))
    async with LoopTurns() as loop:
        await expiry.sweep()
        clock.now += INTERVAL
        start = loop.turns
        assert await expiry.sweep() == 4000
        assert loop.turns - start >= 4000 // 100 - 4  # between every two chunks of a table


def test_the_expiry_flag() -> None:
    assert flags.parse(AgentConfig, []).metrics_expiry == metrics_expiry.SERIES_EXPIRY
    assert flags.parse(AgentConfig, ["--metrics-expiry", "0"]).metrics_expiry == 0  # never, as ztunnel
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ValueError, match="--metrics-expiry"):
            AgentConfig(metrics_expiry=float(bad))
