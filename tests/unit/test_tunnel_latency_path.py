"""The small-write path of an HBONE stream (HboneStream._send with HboneConnection.data_frame): a frame written at
once must never overtake frames the core already queued, or a response's DATA would reach the client before its
HEADERS (a stream error there)."""

from __future__ import annotations

from agent import hbone, tunnel
from agent.hbone import DataReceived, HboneConnection, ResponseReceived, StreamReset
from agent.tunnel import HboneStream, TunnelConfig, TunnelStats


class RecordingTransport:
    """What the TLS transport was asked to write, in order."""

    def __init__(self) -> None:
        self.wire = bytearray()
        self.writes = 0

    def write(self, data: bytes | memoryview) -> None:
        self.wire += data
        self.writes += 1

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        for part in parts:
            self.wire += part
        self.writes += 1

    def is_closing(self) -> bool:
        return False


async def _answered_stream(transport: RecordingTransport) -> tuple[HboneConnection, HboneStream]:
    """A server protocol with one CONNECT stream whose 200 is queued in the core, not written yet."""

    async def handler(req: tunnel.ConnectRequest) -> None:
        raise AssertionError("not dispatched here")

    client = HboneConnection(client=True)
    client.initiate()
    sid = client.send_connect("10.0.0.2:8080")
    proto = tunnel._ServerProtocol(handler, None, TunnelConfig(), TunnelStats())
    proto.transport = transport  # type: ignore[assignment]
    proto.h2.initiate()
    events = proto.h2.receive_data(b"".join(bytes(p) for p in client.data_to_send()))
    assert hbone.RequestReceived in [type(e) for e in events]
    proto.h2.send_response(sid, 200)
    stream = HboneStream(proto, sid)
    proto.add_stream(stream)
    return client, stream


async def test_a_small_write_goes_out_after_the_frames_already_queued() -> None:
    transport = RecordingTransport()
    client, stream = await _answered_stream(transport)
    assert stream._send(memoryview(b"hello")) == 5
    events = client.receive_data(bytes(transport.wire))
    kinds = [type(e) for e in events if type(e) in (ResponseReceived, DataReceived, StreamReset)]
    assert kinds == [ResponseReceived, DataReceived]
    assert b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived)) == b"hello"


async def test_small_writes_are_one_transport_write_each() -> None:
    transport = RecordingTransport()
    client, stream = await _answered_stream(transport)
    stream._send(memoryview(b"a"))  # flushes the queued response first
    before = transport.writes
    for payload in (b"b", b"cd", b"efg"):
        assert stream._send(memoryview(payload)) == len(payload)
    assert transport.writes - before == 3
    events = client.receive_data(bytes(transport.wire))
    assert b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived)) == b"abcdefg"
