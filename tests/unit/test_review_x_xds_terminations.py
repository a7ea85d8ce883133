"""istio_xds_connection_terminations{reason} labelled as ztunnel labels it (src/xds/client.rs run_loop,
src/xds/metrics.rs): a stream the server ended cleanly is "Complete"; one that failed before it was established
(no connection, or a status in place of the stream: tonic's Error::Connection) "ConnectionError", whatever the
code; on an established stream, ztunnel's expected disconnects "Reconnect" and any other status "Error".
Dashboards and alerts written for ztunnel read these values. The agent counts a stream established once it
delivered a response (gRPC servers send the response headers with the first message)."""

from __future__ import annotations

import pytest

from agent.controller_channel import RpcError, StatusCode
from agent.xds import termination_reason


@pytest.mark.parametrize(
    ("error", "established", "reason"),
    [
        (None, True, "Complete"),  # the server ended the stream with status OK
        (RpcError(StatusCode.UNAVAILABLE, "cannot connect to the controller at x: refused"), False, "ConnectionError"),
        (RpcError(StatusCode.UNAVAILABLE, "connection to the controller closed"), True, "Error"),
        (RpcError(StatusCode.UNAVAILABLE, "received prior goaway: code: NO_ERROR"), True, "Reconnect"),
        (RpcError(StatusCode.UNAVAILABLE, "transport is closing"), True, "Reconnect"),
        (RpcError(StatusCode.UNKNOWN, ""), True, "Reconnect"),
        (RpcError(StatusCode.CANCELLED, ""), True, "Reconnect"),
        (RpcError(StatusCode.DEADLINE_EXCEEDED, ""), True, "Reconnect"),
        (RpcError(StatusCode.UNKNOWN, ""), False, "ConnectionError"),
        (RpcError(StatusCode.INTERNAL, "cannot decode"), True, "Error"),
        (RpcError(StatusCode.UNAUTHENTICATED, "bad token"), False, "ConnectionError"),
        (RpcError(StatusCode.PERMISSION_DENIED, "not this node"), True, "Error"),
    ],
)
def test_termination_reasons_are_ztunnels(error: RpcError | None, established: bool, reason: str) -> None:
    assert termination_reason(error, established) == reason
