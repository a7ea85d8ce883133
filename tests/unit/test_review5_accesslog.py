"""Review of issue 5: the access log's byte fields mean what ztunnel's mean.

ztunnel (src/proxy/metrics.rs, ConnectionResult::record_internal) logs `bytes_sent` as what the *reporting side's
workload* sent: the client's request bytes for the source reporter (outbound), the pod's response bytes for the
destination reporter (inbound). The Istio metrics do not flip: `istio_tcp_received_bytes_total` is the request
direction for both reporters.
"""

from __future__ import annotations

import logging

import pytest

from agent.accesslog import AccessLog
from agent.metrics import Metrics, sample_value


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_bytes_sent_is_what_the_reporting_workload_sent(direction: str, caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    report = AccessLog(m).start(direction, ("10.1.0.5", 40000), ("10.2.0.7", 8080))
    with caplog.at_level(logging.INFO, logger="access"):
        report.finish(1000, 20)  # 1000 request bytes (client -> server), 20 response bytes
    [rec] = [r for r in caplog.records if r.name == "access"]
    fields = rec.fields  # type: ignore[attr-defined]
    reporter_sent, reporter_received = (1000, 20) if direction == "outbound" else (20, 1000)
    assert (fields["bytes_sent"], fields["bytes_recv"]) == (reporter_sent, reporter_received)
    # metrics stay in the request/response convention for both reporters
    assert sample_value(m, "istio_tcp_received_bytes_total") == 1000
    assert sample_value(m, "istio_tcp_sent_bytes_total") == 20
