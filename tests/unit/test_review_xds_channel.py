"""The agent's controller channel against bytes no gRPC server should send: the calls fail at once with a status,
the reader never dies leaving them waiting."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events
import pytest
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryResponse

from agent.controller_channel import ControllerChannel, RpcError, StatusCode
from agent.xds import ADS_METHOD


@pytest.mark.parametrize(
    ("headers", "end", "status", "words"),
    [
        # h2 decodes header values as UTF-8 and raised UnicodeDecodeError out of the reader task, which nothing
        # caught: the task died, the connection stayed open and the xDS stream waited for responses that could
        # never be read (until a keepalive PING went unanswered, 40 s by default).
        (
            [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"x-proxy", b"caf\xe9")],
            False,
            StatusCode.UNAVAILABLE,
            "not UTF-8",
        ),
        # A trailers-only answer whose :status is not a number: int() raised ValueError in the reader, same end.
        ([(b":status", b"abc"), (b"content-type", b"text/html")], True, StatusCode.UNKNOWN, "HTTP status abc"),
    ],
)
async def test_a_malformed_response_fails_the_call_instead_of_killing_the_reader(
    headers: list[tuple[bytes, bytes]], end: bool, status: StatusCode, words: str
) -> None:

    async def bad_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    conn.send_headers(event.stream_id, headers, end_stream=end)
            writer.write(conn.data_to_send())

    server = await asyncio.start_server(bad_header, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    channel = ControllerChannel(f"127.0.0.1:{port}", keepalive=3600)  # no PING would ever come to the rescue
    try:
        async with channel.stream(ADS_METHOD, DeltaDiscoveryResponse) as call:
            with pytest.raises(RpcError) as exc:
                await asyncio.wait_for(call.read(), 10)
        assert exc.value.code() == status and words in exc.value.details(), exc.value
    finally:
        await channel.close()
        server.close()
