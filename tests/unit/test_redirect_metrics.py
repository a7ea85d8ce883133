"""The capture collector turns the program's counters into Prometheus families; the per-interface spoofing count is
what lets an operator find the pod that sends as another, so it must come out labelled by interface."""

from __future__ import annotations

from typing import Any, cast

from agent.capture_metrics import CaptureCollector
from agent.prometheus import Registry, render_text
from agent.redirect import Redirector, WorkloadCounters


class _FakeRedirector:
    def counters(self) -> dict[str, WorkloadCounters]:
        return {"10.0.1.5": WorkloadCounters(packets=10, bytes=600, connections_out=2, connections_in=1, drops=0)}

    def stats(self) -> dict[str, int]:
        return {"capture_outbound": 2, "drop_spoofed": 5}

    def spoofed_drops(self) -> dict[str, int]:
        return {"vethA": 4, "vethC": 1}


class _NotStarted:
    def counters(self) -> Any:
        raise RuntimeError("Redirector.start() has not completed")


def _scrape(redirector: object) -> str:
    registry = Registry()
    registry.register(CaptureCollector(cast(Redirector, redirector)))
    return render_text(registry)


def test_spoofed_drops_are_exported_per_interface_next_to_the_node_total() -> None:
    text = _scrape(_FakeRedirector())
    assert 'ambit_capture_spoofed_drops_total{interface="vethA"} 4.0' in text
    assert 'ambit_capture_spoofed_drops_total{interface="vethC"} 1.0' in text
    assert 'ambit_capture_events_total{event="drop_spoofed"} 5.0' in text
    assert 'ambit_capture_connections_total{direction="outbound",ip="10.0.1.5"} 2.0' in text


def test_capture_not_started_yields_no_capture_families() -> None:
    assert "ambit_capture_" not in _scrape(_NotStarted())
