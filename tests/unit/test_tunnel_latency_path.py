"""The small-write path of an HBONE stream (HboneStream._send with HboneConnection.data_frame): a frame written at
once must never overtake frames the core already queued, or a response's DATA would reach the client before its
HEADERS (a stream error there)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

from agent import hbone, tunnel
from agent.hbone import DataReceived, HboneConnection, ResponseReceived, StreamReset
from agent.tunnel import HboneStream, TunnelConfig, TunnelStats
from common.spiffe import Identity
from tests.support.tunnel_fakes import TakeAll, Transport


async def _request(transport: Transport) -> tuple[HboneConnection, tunnel.ConnectRequest]:
    """A server protocol that received one CONNECT, not answered yet, its preface already written."""

    async def handler(req: tunnel.ConnectRequest) -> None:
        raise AssertionError("not dispatched here")

    client = HboneConnection(client=True)
    client.initiate()
    client.send_connect("10.0.0.2:8080")
    proto = tunnel._ServerProtocol(handler, None, TunnelConfig(), TunnelStats())
    proto.transport = transport  # type: ignore[assignment]
    proto.peer_identity = Identity("cluster.local", "default", "client")
    proto.h2.initiate()
    events = proto.h2.receive_data(b"".join(bytes(p) for p in client.data_to_send()))
    request = next(e for e in events if isinstance(e, hbone.RequestReceived))
    proto.flush()  # the server's SETTINGS and their ACK
    req = tunnel.ConnectRequest(proto, request)
    proto.add_stream(req._stream)
    return client, req


async def _request_with_first_bytes(
    transport: Transport, first: bytes
) -> tuple[HboneConnection, tunnel.ConnectRequest]:
    """As :func:`_request`, with the client's first bytes sent after its CONNECT and waiting in the stream."""
    client, req = await _request(transport)
    client.send_data(req.stream_id, first)
    for event in req._proto.h2.receive_data(b"".join(bytes(p) for p in client.data_to_send())):
        if isinstance(event, DataReceived):
            req._stream._on_data(event.data)
    return client, req


async def _answered_stream(transport: Transport) -> tuple[HboneConnection, HboneStream]:
    """A server protocol with one CONNECT stream whose 200 is queued in the core, not written yet."""
    client, req = await _request(transport)
    req._proto.h2.send_response(req.stream_id, 200)
    return client, req._stream


async def test_a_small_write_goes_out_after_the_frames_already_queued() -> None:
    transport = Transport()
    client, stream = await _answered_stream(transport)
    assert stream._send(memoryview(b"hello")) == 5
    events = client.receive_data(bytes(transport.wire))
    kinds = [type(e) for e in events if type(e) in (ResponseReceived, DataReceived, StreamReset)]
    assert kinds == [ResponseReceived, DataReceived]
    assert b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived)) == b"hello"


async def test_small_writes_are_one_transport_write_each() -> None:
    transport = Transport()
    client, stream = await _answered_stream(transport)
    stream._send(memoryview(b"a"))  # flushes the queued response first
    before = transport.writes
    for payload in (b"b", b"cd", b"efg"):
        assert stream._send(memoryview(payload)) == len(payload)
    assert transport.writes - before == 3
    events = client.receive_data(bytes(transport.wire))
    assert b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived)) == b"abcdefg"


async def test_a_200_and_the_first_answer_of_the_pod_leave_in_one_write() -> None:
    transport = Transport()
    client, req = await _request(transport)
    before = transport.writes
    await req.respond(200)
    assert transport.writes == before  # not yet: the relay's first read may bring the pod's answer along
    req.stream._send(memoryview(b"pong"))
    assert transport.writes == before + 1
    events = client.receive_data(bytes(transport.wire))
    assert [type(e) for e in events if type(e) in (ResponseReceived, DataReceived)] == [ResponseReceived, DataReceived]
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert transport.writes == before + 1


async def test_a_200_goes_out_within_the_loop_turn_when_the_pod_has_not_answered() -> None:
    transport = Transport()
    client, req = await _request(transport)
    before = transport.writes
    await req.respond(200)
    await asyncio.sleep(0)
    assert transport.writes == before + 1
    events = client.receive_data(bytes(transport.wire))
    assert ResponseReceived in [type(e) for e in events]


async def test_handing_the_clients_first_bytes_to_the_pod_does_not_write_the_200_alone() -> None:
    """The client's first bytes arrived with its CONNECT and wait in the stream; attaching the relay hands them to the
    pod and returns their credit, which must not flush the queued 200 ahead of the pod's answer."""
    transport = Transport()
    client, req = await _request_with_first_bytes(transport, b"ping")
    before = transport.writes
    await req.respond(200)
    sink = TakeAll()
    req.stream._attach(sink)
    assert sink.got == b"ping" and transport.writes == before
    req.stream._send(memoryview(b"pong"))
    assert transport.writes == before + 1
    events = client.receive_data(bytes(transport.wire))
    assert [type(e) for e in events if type(e) in (ResponseReceived, DataReceived)] == [ResponseReceived, DataReceived]


@contextlib.contextmanager
def _relay_to_pod(stream: HboneStream) -> Iterator[tuple[tunnel._TcpRelay, socket.socket]]:
    """The server side's relay to a pod (a socket pair), created as ``relay()`` does, not started."""
    mine, pod = socket.socketpair()
    mine.setblocking(False)
    done: asyncio.Future[tunnel.RelayResult] = asyncio.get_running_loop().create_future()
    side = tunnel._TcpRelay(mine, stream, done)
    try:
        yield side, pod
    finally:
        side.abort("test over")
        pod.close()


async def test_a_relay_to_a_pod_with_nothing_to_answer_writes_the_200_as_it_starts() -> None:
    """No client bytes reached the pod, so no answer can come to take the 200 along, and the client waits for it
    (a protocol where the server speaks first waits for the 200 and the pod's banner behind it): the 200 goes out
    when the relay starts, not after the rest of the loop turn."""
    transport = Transport()
    client, req = await _request(transport)
    await req.respond(200)
    before = transport.writes
    with _relay_to_pod(req.stream) as (side, _):
        side.start()
        assert transport.writes == before + 1
        events = client.receive_data(bytes(transport.wire))
        assert ResponseReceived in [type(e) for e in events]
        await asyncio.sleep(0)  # the flush respond() scheduled finds nothing left
        assert transport.writes == before + 1


async def test_a_relay_that_hands_the_pod_the_clients_first_bytes_sends_its_answer_with_the_200() -> None:
    transport = Transport()
    client, req = await _request_with_first_bytes(transport, b"ping")
    await req.respond(200)
    before = transport.writes
    with _relay_to_pod(req.stream) as (side, pod):
        pod.send(b"pong")  # a pod on the other core that answered before the relay's first read
        side.start()
        assert pod.recv(16) == b"ping"
        assert transport.writes == before + 1  # one write: the 200 and the answer
        events = client.receive_data(bytes(transport.wire))
        kinds = [type(e) for e in events if type(e) in (ResponseReceived, DataReceived)]
        assert kinds == [ResponseReceived, DataReceived]


async def test_a_relay_whose_pod_has_not_answered_the_first_bytes_yet_leaves_the_200_to_the_loop_turn() -> None:
    transport = Transport()
    client, req = await _request_with_first_bytes(transport, b"ping")
    await req.respond(200)
    before = transport.writes
    with _relay_to_pod(req.stream) as (side, pod):
        side.start()
        assert pod.recv(16) == b"ping"
        assert transport.writes == before  # the answer may still come in this turn and take the 200 along
        await asyncio.sleep(0)
        assert transport.writes == before + 1
        assert ResponseReceived in [type(e) for e in client.receive_data(bytes(transport.wire))]
