"""Adversarial cases around the HBONE latency path (HboneConnection.data_frame, the single-frame receive, the 200
flushed at the end of the loop turn, the relay's first read): what must reach the wire, in which order, and what
must not, when the peer resets, the transport closes or pauses, or several streams share the connection.

The server side is the real _ServerProtocol (handler tasks, event dispatch, buffer_updated) on a transport that
records what it is asked to write; the client is the sans-IO core reading those bytes back."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from agent import hbone, tunnel
from agent.hbone import (
    DataReceived,
    ErrorCode,
    HboneConnection,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from agent.tunnel import ConnectRequest, TunnelConfig, TunnelStats
from common.spiffe import Identity
from tests.support.tunnel_fakes import TakeAll, Transport

Handler = Callable[[ConnectRequest], Awaitable[None]]


class Server:
    """A _ServerProtocol fed the bytes of a sans-IO client through buffer_updated, as the TLS transport does."""

    def __init__(self, handler: Handler, high: int = 1 << 40, config: TunnelConfig | None = None) -> None:
        self.transport = Transport(high)
        self.proto = tunnel._ServerProtocol(handler, None, config or TunnelConfig(), TunnelStats())
        self.transport.proto = self.proto
        self.proto.transport = self.transport  # type: ignore[assignment]
        self.proto.peer_identity = Identity("cluster.local", "default", "client")
        self.client = HboneConnection(client=True)
        self.client.initiate()
        self.proto.h2.initiate()
        self.proto.flush()
        self.send()
        self.client.receive_data(self.transport.take())  # the server's SETTINGS
        self.send()  # their ACK

    def send(self) -> None:
        """What the client core queued, into the server protocol as one read."""
        data = b"".join(bytes(p) for p in self.client.data_to_send())
        while data:
            buf = self.proto.get_buffer(len(data))
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            del buf
            self.proto.buffer_updated(n)
            data = data[n:]

    def receive(self) -> list[hbone.Event]:
        return self.client.receive_data(self.transport.take())


async def turn() -> None:
    """Let the loop run the callbacks scheduled so far (flush_soon, handler steps)."""
    for _ in range(3):
        await asyncio.sleep(0)


def kinds(events: list[hbone.Event], sid: int) -> list[type]:
    wanted = (ResponseReceived, DataReceived, StreamEnded, StreamReset)
    return [type(e) for e in events if isinstance(e, wanted) and getattr(e, "stream_id", None) == sid]


async def test_a_200_answered_just_before_the_peer_resets_is_still_written_and_decoded() -> None:
    """The peer's RST_STREAM arrives after respond(200) queued the HEADERS and before the scheduled flush: the block
    is still written (the client's HPACK table must see it), and the next stream's answer decodes."""
    answered = asyncio.Event()

    async def handler(req: ConnectRequest) -> None:
        await req.respond(200, [("baggage", f"k8s.pod.name=pod-{req.stream_id}")])
        answered.set()
        await asyncio.sleep(3600)

    server = Server(handler)
    sid = server.client.send_connect("10.0.0.2:80")
    server.send()
    await asyncio.sleep(0)  # the handler runs and answers, the flush is scheduled
    assert answered.is_set() and server.transport.wire == b""
    server.client.reset_stream(sid, ErrorCode.CANCEL)
    server.send()
    events = server.receive()
    assert kinds(events, sid) == []  # the client ignores the answer to a stream it reset, after decoding it
    await turn()
    sid2 = server.client.send_connect("10.0.0.2:80")
    server.send()
    await turn()
    events = server.receive()
    responses = [e for e in events if isinstance(e, ResponseReceived)]
    assert [(r.stream_id, r.status) for r in responses] == [(sid2, 200)]
    assert responses[0].headers == [("baggage", f"k8s.pod.name=pod-{sid2}")]


async def test_a_stream_reset_by_us_after_the_200_resets_after_the_headers() -> None:
    """The handler answers 200 and ends without relaying (its task's end resets the stream) before the loop turn
    that flushes the 200: the HEADERS go first, then RST_STREAM, never the other way round."""

    async def handler(req: ConnectRequest) -> None:
        await req.respond(200)

    server = Server(handler)
    sid = server.client.send_connect("10.0.0.2:80")
    server.send()
    await turn()
    events = server.receive()
    assert kinds(events, sid) == [ResponseReceived, StreamReset]
    assert not server.proto.streams


async def test_the_scheduled_flush_of_a_200_on_a_closing_transport_writes_nothing() -> None:
    async def handler(req: ConnectRequest) -> None:
        await req.respond(200)
        await asyncio.sleep(3600)

    server = Server(handler)
    server.client.send_connect("10.0.0.2:80")
    server.send()
    await asyncio.sleep(0)
    server.transport.closing = True
    await turn()
    server.proto.connection_lost(None)
    await turn()
    assert server.transport.wire == b"" and server.transport.after_close == 0


async def test_a_small_write_on_one_stream_waits_for_the_200_queued_on_another() -> None:
    """Stream A's 200 is queued (flush at the end of the turn) when stream B, already answered, sends a small
    payload: B's DATA must not overtake A's HEADERS, and both leave in one write."""
    gate = asyncio.Event()
    streams: dict[int, ConnectRequest] = {}

    async def handler(req: ConnectRequest) -> None:
        streams[req.stream_id] = req
        if len(streams) == 2:
            await gate.wait()
        await req.respond(200)
        await asyncio.sleep(3600)

    server = Server(handler)
    b = server.client.send_connect("10.0.0.2:80")
    server.send()
    await turn()
    assert kinds(server.receive(), b) == [ResponseReceived]
    a = server.client.send_connect("10.0.0.3:80")
    server.send()
    await asyncio.sleep(0)
    gate.set()
    await asyncio.sleep(0)  # A answers: its HEADERS are queued
    before = server.transport.writes
    assert streams[b].stream._send(memoryview(b"from b")) == 6
    assert server.transport.writes == before + 1
    wire = server.transport.take()
    events = server.client.receive_data(wire)
    order = [(type(e), e.stream_id) for e in events if isinstance(e, (ResponseReceived, DataReceived))]
    assert order == [(ResponseReceived, a), (DataReceived, b)]
    await turn()
    assert server.transport.wire == b""  # the scheduled flush found nothing left


async def test_early_bytes_hold_connection_credit_until_the_answer_then_return_it_all() -> None:
    """Bytes that arrive before the answer (the single-frame receive) hold their connection credit; after the 200
    and the relay's attach, the connection and the stream get all of it back (no credit lost or counted twice)."""
    # Credit goes back a quarter window at a time: 64 KiB of the connection's, 32 KiB of the stream's.
    config = TunnelConfig(connection_window=256 * 1024, stream_window=128 * 1024)
    proceed = asyncio.Event()

    async def handler(req: ConnectRequest) -> None:
        await proceed.wait()
        await req.respond(200)
        req.stream._attach(TakeAll())
        await asyncio.sleep(3600)

    server = Server(handler, config=config)
    sid = server.client.send_connect("10.0.0.2:80")
    server.send()
    await asyncio.sleep(0)
    chunk = hbone.SMALL_FRAME
    sent = 0
    # A stream window of DATA, one frame per read once the server reads into big buffers (the single-frame
    # receive; the first frame is split over reads, the parser's path): more than a quarter connection window,
    # whose credit would have gone back by now without the hold.
    while sent + chunk <= config.stream_window:
        frame = server.client.data_frame(sid, b"e" * chunk)
        assert frame is not None
        server.client._out.append(frame)
        server.send()
        sent += chunk
    events = server.receive()
    assert not [e for e in events if isinstance(e, hbone.WindowOpened)]  # nothing returned before the answer
    conn_before = server.client._conn_send_window
    assert sent > config.connection_window // 4
    stream_before = server.client._streams[sid].send_window
    proceed.set()
    await turn()
    events = server.receive()
    assert kinds(events, sid)[:1] == [ResponseReceived]
    assert server.client._conn_send_window == conn_before + sent
    assert server.client._streams[sid].send_window == stream_before + sent


def _relay_pair(stream: tunnel.HboneStream) -> tuple[tunnel._TcpRelay, socket.socket, asyncio.Future[object]]:
    mine, pod = socket.socketpair()
    mine.setblocking(False)
    pod.setblocking(False)
    done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    return tunnel._TcpRelay(mine, stream, done), pod, done  # type: ignore[arg-type]


async def test_a_small_write_that_pauses_the_transport_stops_every_relay_until_resumed() -> None:
    """Each pod read is one small DATA frame written at once; the write that crosses the transport's high-water
    mark pauses it (from inside the write): the writing relay must stop reading there, and so must every other
    relay of the connection, at once. Before, each other relay stopped only after its own next read and write, so
    each could still queue up to READ_SIZE behind the mark (200 streams: some 50 MiB). All read again on resume."""
    reqs: list[ConnectRequest] = []

    async def handler(req: ConnectRequest) -> None:
        reqs.append(req)
        await req.respond(200)
        await asyncio.sleep(3600)

    server = Server(handler, high=3000)
    sid = server.client.send_connect("10.0.0.2:80")
    server.client.send_connect("10.0.0.2:81")
    server.send()
    await turn()
    server.receive()
    (relay, pod, _), (other, other_pod, _) = (_relay_pair(req.stream) for req in reqs)
    try:
        relay.start()
        other.start()
        assert relay._reader.watching and other._reader.watching
        for _ in range(10):
            pod.send(b"x" * 1000)
            relay._on_readable()
            if server.proto.write_paused:
                break
        assert server.proto.write_paused
        assert not relay._reader.watching
        assert not other._reader.watching, "the other relay would read and queue more behind the mark"
        pod.send(b"y" * 10)
        server.transport.buffered = 0
        server.proto.resume_writing()
        assert relay._reader.watching and other._reader.watching
        relay._on_readable()
        events = server.receive()
        got = b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == sid)
        assert got.endswith(b"y" * 10) and got.count(b"x") == len(got) - 10
    finally:
        for r, p in ((relay, pod), (other, other_pod)):
            r.abort("test over")
            p.close()
