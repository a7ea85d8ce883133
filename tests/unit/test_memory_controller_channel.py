"""The agent's own gRPC client (agent/controller_channel.py) against a real grpcio server on 127.0.0.1: unary and
streaming calls, status codes and details, deadlines, flow control beyond the windows, one shared connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest as Delta
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryResponse as DeltaReply
from hyperframe.frame import GoAwayFrame

from agent.controller_channel import ControllerChannel, RpcError, StatusCode
from agent.xds import ADS_METHOD, resets_backoff
from api.istio.v1.auth.ca_pb2 import IstioCertificateRequest as Request
from api.istio.v1.auth.ca_pb2 import IstioCertificateResponse as Reply
from tests.support.xds_controller import free_port

CA = "/istio.v1.auth.IstioCertificateService/CreateCertificate"


async def create_certificate(req: Request, ctx: grpc.aio.ServicerContext) -> Reply:
    md = dict(ctx.invocation_metadata() or ())
    if req.csr == "deny":
        await ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "node n1 runs no pod with ns/sa 100% ünïcode")
    if req.csr == "slow":
        await asyncio.sleep(5)
    return Reply(cert_chain=[req.csr, md.get("authorization", ""), ctx.peer()])


async def delta(requests: AsyncIterator[Delta], ctx: grpc.aio.ServicerContext) -> AsyncIterator[DeltaReply]:
    async for req in requests:
        if req.type_url == "end":
            return
        # The reply carries the request's size (flow control on the way in) and as many bytes back (on the way out).
        size = len(req.response_nonce)
        yield DeltaReply(type_url=req.type_url, nonce="x" * size, system_version_info=ctx.peer())


async def start_server(address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    srv = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                                   ("grpc.max_send_message_length", 64 * 1024 * 1024)])  # fmt: skip
    srv.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "istio.v1.auth.IstioCertificateService",
                {"CreateCertificate": grpc.unary_unary_rpc_method_handler(
                    create_certificate, Request.FromString, Reply.SerializeToString)},
            ),
            grpc.method_handlers_generic_handler(
                "envoy.service.discovery.v3.AggregatedDiscoveryService",
                {"DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    delta, Delta.FromString, DeltaReply.SerializeToString)},
            ),
        ]
    )  # fmt: skip
    port = srv.add_insecure_port(address)
    await srv.start()
    return srv, port


@pytest.fixture
async def server() -> AsyncIterator[int]:
    srv, port = await start_server()
    try:
        yield port
    finally:
        await srv.stop(None)


@pytest.fixture
async def channel(server: int) -> AsyncIterator[ControllerChannel]:
    ch = ControllerChannel(f"127.0.0.1:{server}")
    try:
        yield ch
    finally:
        await ch.close()


async def test_unary_call_carries_metadata_and_decodes_the_reply(channel: ControllerChannel) -> None:
    reply = await channel.unary(CA, Request(csr="pem"), Reply, [("authorization", "Bearer t")], 5.0)
    assert list(reply.cert_chain[:2]) == ["pem", "Bearer t"]


async def test_error_status_and_details_reach_the_caller(channel: ControllerChannel) -> None:
    with pytest.raises(RpcError) as exc:
        await channel.unary(CA, Request(csr="deny"), Reply, [], 5.0)
    assert exc.value.code() == StatusCode.PERMISSION_DENIED
    assert exc.value.details() == "node n1 runs no pod with ns/sa 100% ünïcode"
    # The connection survives a failed call.
    assert (await channel.unary(CA, Request(csr="ok"), Reply, [], 5.0)).cert_chain[0] == "ok"


async def test_deadline_exceeded(channel: ControllerChannel) -> None:
    with pytest.raises(RpcError) as exc:
        await channel.unary(CA, Request(csr="slow"), Reply, [], 0.3)
    assert exc.value.code() == StatusCode.DEADLINE_EXCEEDED
    assert resets_backoff(exc.value)


async def test_unreachable_controller_is_unavailable() -> None:
    channel = ControllerChannel(f"127.0.0.1:{free_port()}")
    with pytest.raises(RpcError) as exc:
        await channel.unary(CA, Request(csr="x"), Reply, [], 5.0)
    assert exc.value.code() == StatusCode.UNAVAILABLE
    assert not resets_backoff(exc.value)


async def test_stream_moves_messages_larger_than_every_window_both_ways(channel: ControllerChannel) -> None:
    async with channel.stream(ADS_METHOD, DeltaReply) as call:
        for size in (10, 3_000_000, 20_000_000):
            await call.send(Delta(type_url=f"t{size}", response_nonce="n" * size))
            reply = await call.read()
            assert reply is not None and reply.type_url == f"t{size}" and len(reply.nonce) == size
        await call.send(Delta(type_url="end"))
        assert await call.read() is None  # status OK ends the iteration


async def test_xds_stream_and_ca_calls_share_one_connection_until_retired(channel: ControllerChannel) -> None:
    async with channel.stream(ADS_METHOD, DeltaReply) as call:
        await call.send(Delta(type_url="a"))
        first = await call.read()
        assert first is not None
        peer = first.system_version_info
        assert (await channel.unary(CA, Request(csr="x"), Reply, [], 5.0)).cert_chain[2] == peer
        channel.retire()  # e.g. new trust: new calls go to a new connection, the stream stays where it is
        assert (await channel.unary(CA, Request(csr="x"), Reply, [], 5.0)).cert_chain[2] != peer
        await call.send(Delta(type_url="b"))
        again = await call.read()
        assert again is not None and again.system_version_info == peer


async def test_cancelled_stream_reports_cancelled(channel: ControllerChannel) -> None:
    async with channel.stream(ADS_METHOD, DeltaReply) as call:
        call.cancel()
        with pytest.raises(RpcError) as exc:
            await call.read()
        assert exc.value.code() == StatusCode.CANCELLED


async def test_controller_restart_fails_the_stream_and_the_next_call_reconnects() -> None:
    srv, port = await start_server()
    channel = ControllerChannel(f"127.0.0.1:{port}")
    try:
        async with channel.stream(ADS_METHOD, DeltaReply) as call:
            await call.send(Delta(type_url="a"))
            assert await call.read() is not None
            await srv.stop(None)
            with pytest.raises(RpcError) as exc:
                while await call.read() is not None:
                    pass
            assert exc.value.code() in (StatusCode.UNAVAILABLE, StatusCode.CANCELLED)
        srv, _ = await start_server(f"127.0.0.1:{port}")
        assert (await channel.unary(CA, Request(csr="again"), Reply, [], 5.0)).cert_chain[0] == "again"
    finally:
        await channel.close()
        await srv.stop(None)


async def test_goaway_ends_the_open_stream_at_once() -> None:
    """After a GOAWAY h2 takes no further frame, so a stream the server had seen could never finish; it used to wait
    for the peer to close the socket (an Envoy in front drains for minutes: no config meanwhile), the keepalive task
    dying on its first PING. It now ends at once, in the words that make the xDS client reconnect without backoff."""
    goaway_sent = asyncio.Event()

    async def drain_silently(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while not goaway_sent.is_set():
            data = await reader.read(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    conn.send_headers(event.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
                    writer.write(conn.data_to_send())
                    goaway = GoAwayFrame(0)
                    goaway.last_stream_id = event.stream_id  # this stream may finish; then nothing more is sent
                    writer.write(goaway.serialize())
                    goaway_sent.set()
            writer.write(conn.data_to_send())
        await reader.read()  # stay silent until the client hangs up

    server = await asyncio.start_server(drain_silently, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    channel = ControllerChannel(f"127.0.0.1:{port}", keepalive=0.2, keepalive_timeout=0.2)
    try:
        async with channel.stream(ADS_METHOD, DeltaReply) as call:
            with pytest.raises(RpcError) as exc:
                await asyncio.wait_for(call.read(), 10)
        assert exc.value.code() == StatusCode.UNAVAILABLE and resets_backoff(exc.value)
        assert "received prior goaway" in exc.value.details()
    finally:
        await channel.close()
        server.close()
