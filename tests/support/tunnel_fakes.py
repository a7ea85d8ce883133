"""Fakes for driving agent.tunnel's protocols without TLS: a transport that records what it is asked to write, and
a relay stand-in that takes every byte."""

from __future__ import annotations

from agent import tunnel


class Transport:
    """What the TLS transport was asked to write, in order; pauses its protocol past ``high`` buffered bytes, as
    asyncio's and uvloop's SSL transports do from inside the write."""

    def __init__(self, high: int = 1 << 40) -> None:
        self.wire = bytearray()
        self.writes = 0
        self.closing = False
        self.after_close = 0  # writes asked for once closing (what a real transport drops, with a warning)
        self.high = high
        self.buffered = 0
        self.proto: tunnel._HboneProtocol | None = None

    def _took(self, n: int) -> None:
        self.writes += 1
        self.buffered += n
        if self.buffered >= self.high and self.proto is not None and not self.proto.write_paused:
            self.proto.pause_writing()

    def write(self, data: bytes | memoryview) -> None:
        if self.closing:
            self.after_close += 1
            return
        self.wire += data
        self._took(len(data))

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        if self.closing:
            self.after_close += 1
            return
        n = 0
        for part in parts:
            self.wire += part
            n += len(part)
        self._took(n)

    def is_closing(self) -> bool:
        return self.closing

    def take(self) -> bytes:
        out = bytes(self.wire)
        self.wire.clear()
        return out


class TakeAll(tunnel._Sink):
    """A relay's stream side whose pod takes every byte at once (kept in ``got``)."""

    def __init__(self) -> None:
        self.got = bytearray()

    def on_data(self, views: list[memoryview], total: int) -> bool:
        for v in views:
            self.got += v
        return True

    def on_eof(self) -> None:
        pass

    def on_reset(self, reason: str, benign: bool = False) -> None:
        pass

    def on_stop_sending(self) -> None:
        pass

    def on_writable(self) -> None:
        pass
