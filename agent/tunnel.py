"""HBONE over mutual TLS on asyncio: client and server connections, streams, and the TCP <-> stream relay.

Protocol-based (not StreamReader) so that the DATA path is a chain of callbacks with no queue hops and no copies
we can avoid: TLS decrypts straight into a receive buffer we own (``BufferedProtocol``), :mod:`agent.hbone` slices
DATA payloads out of it, and the slices go to the plain TCP transport; in the other direction TCP is read into a
buffer and handed to the TLS layer as (frame header, payload) pairs, which it encrypts in place.

Back-pressure is end to end: a stream's credit is returned to the peer only once the TCP side accepted the bytes
without pausing, TCP reading stops while a stream has no send window or the TLS socket is congested, and
connection-level credit is never held, so a stream that never reads cannot block the others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import errno
import itertools
import logging
import os
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from agent import hbone
from agent.hbone import ErrorCode, HboneConnection, HboneSettings, StreamStateError
from agent.sockets import (
    Dial,
    Readiness,
    abort,
    close_gracefully,
    connect_upstream,
    make_nonblocking,
    reset_if_orphaned,
)
from common.log import kv
from common.spiffe import Identity
from common.tls import ALPN_H2, PeerVerificationError, peer_identity, verify_peer

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
MIN_READ_SIZE = 4 * 1024  # idle pooled connections and short exchanges never need more
# Write-buffer limits on both transports: big enough that a 256 KiB read never trips pause/resume on its own.
WRITE_HIGH = 1024 * 1024
WRITE_LOW = 256 * 1024
_IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one sendmsg may take (1024 on Linux)
# Received bytes that have to wait for a slow TCP reader are kept as views of the receive buffer they arrived in when
# they are at least 1/_PIN_RATIO of it (a copy of 8 KiB costs ~1 us; bigger ones measured 5-10x more per byte, the
# allocator's doing), and copied otherwise: a view keeps its whole buffer alive, so a peer trickling small frames to
# a stalled stream made each one pin a 256 KiB buffer (8 KiB frames: 20 MiB kept pinned 284 MiB).
_PIN_RATIO = 4
_KEEP_VIEW = 8 * 1024  # and only pieces this big: an entry costs ~200 bytes of objects, whatever its size
# Copied pieces are appended to the backlog's last copy while it is below this, not kept one object each: a peer
# sending 1-byte frames to a stalled stream made each one a backlog entry of ~450 bytes of RSS (196 KB kept, +89 MiB).
_COPY_MAX = 64 * 1024
# How long a relay whose stream peer stopped reading keeps its TCP socket open once the response is out, dropping
# what the TCP peer still sends (it normally closes first, having read the response and our FIN); nginx's
# lingering_time.
LINGER_TIMEOUT = 30.0
# Frames the core may queue in answer to the peer (PING/SETTINGS ACKs, refusals, resets) while our writes to it are
# paused, before the peer counts as flooding: it sends and does not read (Envoy's max_outbound_control_frames, 1000).
# A well-behaved peer makes a few: a keepalive PING every few seconds.
MAX_REPLIES_WHILE_PAUSED = 1000


class ConnectStage(enum.Enum):
    """Where opening a tunnel stream failed. The source's response flag follows from it as ztunnel's follows from
    the proxy::Error its pool and h2 client raise (src/proxy/pool.rs new_pool_conn, src/proxy/h2/client.rs)."""

    POOL = "pool"  # the pool takes no more streams (ztunnel: WorkloadHBONEPoolDraining)
    TCP = "tcp"  # the TCP connect failed (Error::Io)
    TCP_TIMEOUT = "tcp_timeout"  # ... timed out (MaybeHBONENetworkPolicyError)
    TLS = "tls"  # the handshake, or the peer's identity (the connector's io::Error: Error::Io)
    HTTP2 = "http2"  # no answer: the stream refused or reset, the connection lost or going away (Error::H2)
    RESPONSE = "response"  # the peer answered, not 200 (Error::HttpStatus)


class HboneConnectError(Exception):
    """Opening a tunnel stream failed.

    ``status`` is the HTTP status the peer answered (400 bad request / address mismatch, 401 denied by policy,
    503 upstream unreachable) or 503 when we never got an answer (connect refused, TLS failure, peer identity
    not the expected one, connection lost before the response); ``stage`` says which. ``retryable`` is True when
    the peer provably did not process the request (refused stream, GOAWAY before it), so another connection may be
    tried.
    """

    def __init__(
        self, status: int, reason: str, *, retryable: bool = False, stage: ConnectStage = ConnectStage.RESPONSE
    ) -> None:
        super().__init__(f"HBONE CONNECT failed: {status} {reason}")
        self.status = status
        self.reason = reason
        self.retryable = retryable
        self.stage = stage


class HboneStreamReset(Exception):
    """The peer reset the stream (RST_STREAM) or the connection carrying it went away."""


@dataclass(slots=True)
class TunnelConfig:
    """Per-connection knobs; defaults follow ztunnel (reference/istio-ambient.md 1.5)."""

    stream_window: int = 4 * 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    max_frame_size: int = 1024 * 1024
    max_concurrent_streams: int = 200
    max_header_list_size: int = 64 * 1024
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 20.0
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0  # TCP to the peer's 15008 (ztunnel's pool: 10 s)
    # How long a CONNECT waits for its answer. ztunnel has no such wait; ours must outlast the peer agent's own
    # connect to its pod (10 s, capped below this by InboundProxy), so that the peer's 503 and its reason reach the
    # caller instead of our timeout resetting the stream first.
    response_timeout: float = 15.0

    def h2_settings(self) -> HboneSettings:
        return HboneSettings(
            stream_window=self.stream_window,
            connection_window=self.connection_window,
            max_frame_size=self.max_frame_size,
            max_concurrent_streams=self.max_concurrent_streams,
            max_header_list_size=self.max_header_list_size,
        )


REJECT_REASONS = frozenset(
    {
        "tls_handshake",
        "tls_timeout",
        "no_client_cert",
        "untrusted_peer",
        "trust_domain",
        "wrong_identity",
        "alpn",
        "verify_error",
        "protocol_error",
        "bad_request",
        "header_too_large",
        "refused_stream",
        "malformed_response",
    }
)
"""Every value of ``TunnelStats.rejects``' keys (the ``ambit_hbone_rejects`` reason label): fixed, so neither a
peer nor the wording of an error message can add series."""

_GOAWAY_REASONS = {int(code): f"goaway_{code.name.lower()}" for code in ErrorCode}
_GOAWAY_UNKNOWN = "goaway_unknown"  # a GOAWAY code is 32 bits of the peer's choosing: the rest share one label
ERROR_REASONS = frozenset({"keepalive_timeout", "flood", _GOAWAY_UNKNOWN, *_GOAWAY_REASONS.values()})
"""Every value of ``TunnelStats.errors``' keys (the ``ambit_hbone_errors`` reason label)."""


def reject_reason(text: str) -> str:
    """The counter reason of a refusal the HTTP/2 core describes as ``reason: detail`` (RequestRejected, its own
    stream resets, connection errors): one of REJECT_REASONS, ``protocol_error`` for any other text."""
    head = text.partition(":")[0]
    return head if head in REJECT_REASONS else "protocol_error"


class PeerRefused(PeerVerificationError):
    """The peer's certificate chained to our roots but our check after the handshake refused it. ``reason`` (one
    of REJECT_REASONS) is what the check decided; the message adds the detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class TunnelStats:
    """Counters PROXY's metrics can read: ``rejects[reason]`` counts refused connections/streams by reason, one of
    REJECT_REASONS; ``errors[reason]`` counts connections that failed later, one of ERROR_REASONS
    ("keepalive_timeout", "flood", "goaway_<HTTP/2 error code name>" or "goaway_unknown")."""

    rejects: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    connections_opened: int = 0
    connections_closed: int = 0
    streams_opened: int = 0
    streams_closed: int = 0


STATS = TunnelStats()
"""Process-wide default counters, used when no ``stats`` is passed."""

_UNGRACEFUL_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN})
# asyncio raises ConnectionResetError("Connection lost") without an errno; the TLS peer may go mid-stream, cleanly
# (close_notify) or not
_UNGRACEFUL_TYPES = (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError)


def ungraceful(exc: BaseException) -> bool:
    """Whether ``exc`` only says that a side went away without a clean close (reset, broken pipe, not connected,
    TLS ended mid-stream). A TCP connection may end so at any time; ztunnel does not count it as an error (its
    copy loop's ignore_io_errors, src/copy.rs: ConnectionReset, BrokenPipe, NotConnected, UnexpectedEof), and
    neither do our reports."""
    return isinstance(exc, _UNGRACEFUL_TYPES) or (isinstance(exc, OSError) and exc.errno in _UNGRACEFUL_ERRNOS)


# The peer's RST_STREAM codes that end a stream without failing it: ztunnel's h2 wrapper reads NO_ERROR and CANCEL
# as EOF and STREAM_CLOSED as a broken pipe, and writes after any of the three as a broken pipe (src/proxy/h2.rs).
_BENIGN_RESETS = frozenset({ErrorCode.NO_ERROR, ErrorCode.CANCEL, ErrorCode.STREAM_CLOSED})

_COUNTED_RESETS = ("header_too_large:", "malformed_response:")
"""Reasons of the core's own stream resets that refuse what the peer sent (counted like refused requests)."""
_LOGGED_DEBUG_DATA = 256  # of a GOAWAY's debug data (the peer's text, up to a frame long) in our log lines


class _ReceiveBuffer:
    """Receive side shared by the TLS and TCP protocols: a small private buffer, then big shared ones.

    A connection starts with a MIN_READ_SIZE buffer of its own (most connections are small) and reads into READ_SIZE
    buffers from :data:`_BIG` once a read fills it. A relay (one per proxied connection) gives its big buffer back
    after every read (``if self._bufsize == READ_SIZE: self._release()``), so between reads it holds none: before,
    each relay that had once read a full buffer kept one or two of 256 KiB for as long as it lived (200 idle
    connections after 1 MB each: +55 MB per agent). A TLS connection keeps its big buffer: there are few (pooled),
    uvloop already holds 256 KiB for each, and its reads are the latency path.

    Transports may keep a reference to what we wrote instead of copying (uvloop does, until the socket took it), and
    a relay keeps views of what its socket did not take: a bytearray with live exports refuses to resize, which is
    how a buffer still in use is told apart, never overwritten. Subclasses take the filled part with
    ``memoryview(self._buf)[:nbytes]`` after growing when full, inlined in their read callbacks (the hot path).
    """

    _buf: bytearray  # _BORROW between the reads of a connection that borrows big buffers
    _bufsize: int

    def _init_buffer(self) -> None:
        self._bufsize = MIN_READ_SIZE
        self._buf = _new_buffer(MIN_READ_SIZE)

    def get_buffer(self, sizehint: int) -> memoryview:
        buf = self._buf
        if buf is _BORROW:
            buf = self._buf = _BIG.take()
        else:
            try:
                buf.append(0)
                del buf[-1]
            except BufferError:  # the last read's bytes are still referenced: leave the buffer to them
                if self._bufsize == READ_SIZE:
                    _BIG.give(buf)  # lent out again once they are gone
                    buf = self._buf = _BIG.take()
                else:
                    buf = self._buf = _new_buffer(self._bufsize)
        return memoryview(buf)

    def _release(self) -> None:
        buf = self._buf
        if buf is not _BORROW:
            self._buf = _BORROW
            _BIG.give(buf)

    def _grow(self) -> None:
        """A read filled the small buffer: from the next read on, reads borrow big ones (this one is still being
        handed on)."""
        self._bufsize = READ_SIZE
        self._buf = _BORROW


_BORROW = bytearray()
"""What a borrowing connection's ``_buf`` is between reads (never read into)."""


class _BigBuffers:
    """The READ_SIZE receive buffers of the process, lent for one read at a time (all borrowers run on the event
    loop's thread). A buffer comes back while views of the read are still alive (the caller's locals, or bytes a
    socket has not taken yet), so lending skips the ones still in use: a bulk transfer towards a slower side
    rotates between a few buffers instead of zero-filling a new 256 KiB one per read."""

    def __init__(self, keep: int = 8) -> None:
        self._keep = keep
        self._bufs: list[bytearray] = []

    def take(self) -> bytearray:
        bufs = self._bufs
        for i in range(len(bufs) - 1, -1, -1):
            if _is_free(bufs[i]):
                return bufs.pop(i)
        return _new_buffer(READ_SIZE)

    def give(self, buf: bytearray) -> None:
        bufs = self._bufs
        bufs.append(buf)
        if len(bufs) > self._keep:
            del bufs[0]  # the longest held: its views keep it alive, and it is freed with the last of them

    def __len__(self) -> int:
        return len(self._bufs)


_BIG = _BigBuffers()


class _BufferBudget:
    """What the relays of the process keep for TCP sockets that did not take it yet, against one budget.

    Counted as memory, not bytes: a kept view costs the receive buffer it keeps alive, once however many views of
    that buffer the relays keep (``_pins``), so small frames cannot make the relays hold more than the count says.

    Connection credit goes back as DATA arrives, so that a stream whose reader stalls does not block the other
    streams of its pooled connection; such a relay keeps up to a stream window plus WRITE_HIGH (5 MiB). Nothing
    bounded how many do: 200 stalled streams made an agent keep 1 GB. Over the budget, every HBONE connection whose
    relays keep something holds its connection credit back (HboneConnection.hold_connection_credit) until the total
    is below three quarters of the budget: each such connection can then take at most what is left of its window
    (16 MiB, as a ztunnel connection keeps), and connections whose relays keep nothing are not slowed. Below the
    budget nothing waits for a stalled stream.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.total = 0
        self.over = False
        self.exceeded = 0  # times the total went over the budget (a metric: streams then waited for stalled ones)
        self._keeping: set[_HboneProtocol] = set()
        self._pins: dict[int, int] = {}  # id of a buffer -> backlog entries that view it (they keep it alive)

    def pin(self, buf: bytes | bytearray) -> int:
        """A backlog entry views ``buf``: the memory this newly keeps (its size for the first one, else 0)."""
        key = id(buf)
        n = self._pins.get(key, 0)
        self._pins[key] = n + 1
        return 0 if n else len(buf)

    def unpin(self, buf: bytes | bytearray) -> int:
        """A backlog entry viewing ``buf`` is gone: the memory this frees (its size for the last one, else 0)."""
        key = id(buf)
        n = self._pins[key] - 1
        if n:
            self._pins[key] = n
            return 0
        del self._pins[key]
        return len(buf)

    def changed(self, proto: _HboneProtocol, delta: int) -> None:
        proto.buffered += delta
        self.total += delta
        if proto.buffered > 0:
            if proto not in self._keeping:
                self._keeping.add(proto)
                if self.over:
                    proto.hold_credit(True)
        elif proto in self._keeping:
            self._keeping.discard(proto)
            proto.hold_credit(False)  # it keeps nothing now: it does not wait for the others to drain
        if not self.over and self.total > self.budget:
            self.over = True
            self.exceeded += 1
            log.warning(
                "relays keep more than their budget for stalled readers: holding credit of the connections they use",
                extra=kv(kept=self.total, budget=self.budget, connections=len(self._keeping)),
            )
            for p in self._keeping:
                p.hold_credit(True)
        elif self.over and self.total <= self.budget * 3 // 4:
            self.over = False
            for p in list(self._keeping):
                p.hold_credit(False)


BUFFERS = _BufferBudget(256 * 1024 * 1024)
"""The process's relays. 256 MiB: far above what flowing streams keep (a few windows in all), so only many stalled
readers reach it (20 stalled streams of one pod pair keep about 100 MiB: they still do not slow each other)."""


def _new_buffer(size: int) -> bytearray:
    # One spare byte of capacity so that the append/del probe never reallocates.
    buf = bytearray(size + 1)
    del buf[-1]
    return buf


def _is_free(buf: bytearray) -> bool:
    """True when nobody holds a view of ``buf`` (resizing is refused while views exist)."""
    try:
        buf.append(0)
    except BufferError:
        return False
    del buf[-1]
    return True


def _ssl_reason(exc: BaseException) -> str:
    """Map a handshake failure to a counter reason."""
    text = f"{getattr(exc, 'reason', '')} {exc}".upper()
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text:
        return "no_client_cert"
    if "CERTIFICATE_VERIFY_FAILED" in text or "UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text:
        return "untrusted_peer"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "tls_timeout"
    return "tls_handshake"


# ---------------------------------------------------------------------------------------------------- streams


class _Sink:
    """What a stream delivers to when something (the relay) consumes it with callbacks instead of read()."""

    def on_data(self, views: list[memoryview], total: int) -> bool:
        """Consume consecutive pieces (``total`` bytes, one write); True if the bytes are gone (credit may be
        returned now), False to hold the credit."""
        raise NotImplementedError

    def on_eof(self) -> None:
        raise NotImplementedError

    def on_reset(self, reason: str, benign: bool = False) -> None:
        """The stream was reset or its connection lost; ``benign`` when that is an ungraceful end, no failure."""
        raise NotImplementedError

    def on_stop_sending(self) -> None:
        """The peer ended its side and then asked us to stop sending (RST_STREAM NO_ERROR, RFC 9113 8.1): what it
        sent is complete and must still be delivered; nothing more can go to it."""
        raise NotImplementedError

    def on_writable(self) -> None:
        """Send window or TLS write buffer opened up."""
        raise NotImplementedError

    def on_write_paused(self) -> None:
        """The connection's TLS write buffer went past its high-water mark: stop reading what would be written to
        it (:meth:`on_writable` follows when it drained). A sink that reads nothing has nothing to do."""


class HboneStream:
    """One CONNECT stream: a bidirectional byte stream with half-close.

    The async methods are for control code and tests; :func:`relay` uses the callback fast path.
    """

    def __init__(self, proto: _HboneProtocol, stream_id: int) -> None:
        self._proto = proto
        self.stream_id = stream_id
        self.peer_identity: Identity | None = proto.peer_identity
        self._sink: _Sink | None = None
        # What arrived before a sink was attached (a CONNECT not answered yet) or for read(): appended to the last
        # chunk while it is below _COPY_MAX, so small frames do not cost an object each.
        self._rbuf: collections.deque[bytearray] = collections.deque()
        self._eof = False  # peer's END_STREAM received
        self._local_eof = False  # our END_STREAM sent
        self._reset_reason: str | None = None
        self._reset_benign = False  # the reset is how connections end, not a failure (see ungraceful())
        self._stopped = False  # the reset was the peer's RST_STREAM(NO_ERROR) after its END_STREAM
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        self._response: asyncio.Future[int] | None = None
        self.early_sent = 0  # client bytes that went out with the CONNECT (the part of open_stream's ``early`` ...
        self._early_rest: memoryview | None = None  # ... and the part the windows did not take then
        self._abandon: Callable[[], object] | None = None  # server: cancels the handler of an unanswered CONNECT

    def __repr__(self) -> str:
        return f"<HboneStream {self.stream_id} eof={self._eof} local_eof={self._local_eof} reset={self._reset_reason}>"

    # ------------------------------------------------------------------------------ async API

    async def read(self, max_bytes: int = READ_SIZE) -> bytes:
        """Up to ``max_bytes`` received bytes; ``b""`` after the peer's END_STREAM. Raises HboneStreamReset."""
        while not self._rbuf:
            if self._reset_reason is not None and not self._stopped:
                raise HboneStreamReset(self._reset_reason)
            if self._eof:
                return b""
            self._read_waiter = self._proto.loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        chunk = self._rbuf.popleft()
        if len(chunk) > max_bytes:
            self._rbuf.appendleft(chunk[max_bytes:])
            del chunk[max_bytes:]
        self._proto.acknowledge(self.stream_id, len(chunk))
        return bytes(chunk)

    async def write(self, data: bytes | memoryview) -> None:
        """Send ``data``, waiting for flow-control window and TLS write back-pressure. Raises HboneStreamReset.

        Early bytes the windows did not take with the CONNECT go first."""
        if self._early_rest is not None:
            rest, self._early_rest = self._early_rest, None
            await self.write(rest)
        view = memoryview(data)
        while True:
            if self._reset_reason is not None:
                raise HboneStreamReset(self._reset_reason)
            if self._local_eof:
                raise HboneStreamReset("write after write_eof")
            n = self._send(view) if view else 0
            view = view[n:]
            if not view and not self._proto.write_paused:
                return
            self._write_waiter = self._proto.loop.create_future()
            try:
                await self._write_waiter
            finally:
                self._write_waiter = None

    def write_eof(self) -> None:
        """Half-close: END_STREAM; we can still read.

        Early bytes the windows did not take with the CONNECT are still ours to send: END_STREAM follows them, once
        the windows have taken them all, instead of cutting them off."""
        if self._local_eof or self._reset_reason is not None:
            return
        self._local_eof = True
        self._end_after_early()

    def _end_after_early(self) -> None:
        rest = self._early_rest
        if rest is not None:
            n = self._send(rest)
            if n < len(rest):  # blocked: _on_writable comes back here when the windows open
                self._early_rest = rest[n:]
                return
            self._early_rest = None
        try:
            self._proto.h2.end_stream(self.stream_id)
        except StreamStateError:
            return
        self._proto.flush()
        self._proto.forget_if_closed(self)

    def reset(self) -> None:
        """Abort the stream (RST_STREAM CANCEL); idempotent."""
        if self._reset_reason is not None:
            return
        self._on_reset("reset locally")
        self._proto.h2.reset_stream(self.stream_id, ErrorCode.CANCEL)
        self._proto.flush()
        self._proto.forget_if_closed(self)

    @property
    def closed(self) -> bool:
        return self._reset_reason is not None or (self._eof and self._local_eof)

    # ------------------------------------------------------------------------------ internals

    def _send(self, view: memoryview) -> int:
        """Queue as much of ``view`` as the windows allow and write it out; returns bytes taken."""
        proto = self._proto
        h2 = proto.h2
        frame = h2.data_frame(self.stream_id, view)
        if frame is not None:  # small, within the windows, nothing queued: the request/response path, written as is
            transport = proto.transport
            if transport is not None and not transport.is_closing():
                transport.write(frame)
            return len(view)
        try:
            n = h2.send_data(self.stream_id, view)
        except StreamStateError:
            self._on_reset("stream closed")
            return 0
        if n:
            transport = proto.transport
            if transport is not None and not transport.is_closing():
                transport.writelines(proto.h2.data_to_send())
        if n < len(view):
            proto.blocked.add(self)
        return n

    def _attach(self, sink: _Sink) -> None:
        self._sink = sink
        buffered, self._rbuf = self._rbuf, collections.deque()
        proto = self._proto
        for chunk in buffered:
            if sink.on_data([memoryview(chunk)], len(chunk)):
                proto.h2.acknowledge(self.stream_id, len(chunk))
        if buffered and proto.h2.has_output():
            proto.flush_soon()  # not now: a 200 queued with the credit goes best with the pod's answer
        if self._stopped:
            sink.on_eof()
            sink.on_stop_sending()
        elif self._reset_reason is not None:
            sink.on_reset(self._reset_reason, self._reset_benign)
        elif self._eof:
            sink.on_eof()

    def _on_data(self, data: memoryview) -> None:
        sink = self._sink
        if sink is not None:
            if sink.on_data([data], len(data)):
                # no flush here: the receive batch is flushed once when it has been dispatched
                self._proto.h2.acknowledge(self.stream_id, len(data))
            return
        rbuf = self._rbuf
        if rbuf and len(rbuf[-1]) < _COPY_MAX:
            rbuf[-1] += data
        else:
            rbuf.append(bytearray(data))
        self._wake_reader()

    def _on_eof(self) -> None:
        self._eof = True
        if self._sink is not None:
            self._sink.on_eof()
        self._wake_reader()

    def _on_reset(self, reason: str, retryable: bool = False, stopped: bool = False, benign: bool = False) -> None:
        """``stopped``: the peer's RST_STREAM(NO_ERROR) after its END_STREAM, which ends only our sending side.
        ``benign``: the peer ended the stream or went away without it being a failure (see ungraceful())."""
        if self._reset_reason is not None:
            return
        self._reset_reason = reason
        self._reset_benign = benign
        self._stopped = stopped
        self._proto.blocked.discard(self)
        if self._abandon is not None:  # nobody is left to answer: stop the work on it (upstream connect, ...)
            abandon, self._abandon = self._abandon, None
            abandon()
        if self._response is not None and not self._response.done():
            self._response.set_exception(HboneConnectError(503, reason, retryable=retryable, stage=ConnectStage.HTTP2))
        if self._sink is not None:
            if stopped:
                self._sink.on_stop_sending()
            else:
                self._sink.on_reset(reason, benign)
        self._wake_reader()
        self._on_writable()

    def _on_writable(self) -> None:
        if self._sink is not None:
            self._sink.on_writable()
        elif self._local_eof and self._early_rest is not None and self._reset_reason is None:
            self._end_after_early()
        w = self._write_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_reader(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)


# ---------------------------------------------------------------------------------------------------- connection


class _HboneProtocol(_ReceiveBuffer, asyncio.BufferedProtocol):
    """TLS application protocol shared by both roles: feeds the sans-IO core and routes its events."""

    def __init__(self, *, client: bool, config: TunnelConfig, stats: TunnelStats) -> None:
        self.loop = asyncio.get_running_loop()
        self.h2 = HboneConnection(client=client, settings=config.h2_settings())
        self.config = config
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.peer_identity: Identity | None = None
        self.streams: dict[int, HboneStream] = {}
        self.blocked: set[HboneStream] = set()
        self.write_paused = False
        self.ready: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.on_stream_count: Callable[[int], None] | None = None
        self._init_buffer()
        self._ping_sent_at: float | None = None
        self._ka_handle: asyncio.TimerHandle | None = None
        self._counted = False
        self._failed: str | None = None  # why the connection is being cut, when that fails its streams
        self._replies_at_pause = 0
        self.buffered = 0  # memory our relays keep for TCP sockets that did not take it yet (BUFFERS)

    # ------------------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: a cast, not a check.
        transport = self.transport = cast(asyncio.Transport, transport)
        refused: PeerRefused | None = None
        try:
            self.verify(transport)
        except PeerRefused as e:
            refused = e
        except Exception as e:  # a bug in verification must not leave the socket open
            refused = PeerRefused("verify_error", str(e))
        if refused is not None:
            transport.abort()
            if not self.ready.done():
                self.ready.set_exception(refused)
            return
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self.stats.connections_opened += 1
        self._counted = True
        self.h2.initiate()
        self.flush()
        if self.config.keepalive_interval > 0:
            self._ka_handle = self.loop.call_later(self.config.keepalive_interval, self._keepalive)
        self.ready.set_result(None)

    def verify(self, transport: asyncio.Transport) -> None:
        """Check the peer after the handshake; raises PeerRefused."""
        raise NotImplementedError

    def buffer_updated(self, nbytes: int) -> None:
        h2 = self.h2
        buf = self._buf
        if nbytes == self._bufsize < READ_SIZE:
            self._grow()
        view = memoryview(buf)[:nbytes]
        single = h2.receive_single_data(view)
        if single is not None:  # one whole DATA frame: the request/response latency path
            sid, payload, fin = single
            st = self.streams.get(sid)
            if st is not None:
                if payload:
                    sink = st._sink
                    if sink is None:
                        st._on_data(payload)
                    elif sink.on_data([payload], len(payload)):
                        h2.acknowledge(sid, len(payload))
                if fin:
                    st._on_eof()
                    self.forget_if_closed(st)
            del payload, view
            if h2.has_output():
                self.flush()
            return
        events = h2.receive_data(view)
        del view
        # Consecutive DATA for one stream is delivered as one batch: a peer with 16 KiB frames (Envoy) would
        # otherwise cost one TCP write per frame.
        run_sid = 0
        run: list[memoryview] = []
        opened: set[int] | None = None  # streams (0: the connection) whose send window opened in this read
        for ev in events:
            if type(ev) is hbone.DataReceived:
                if ev.stream_id != run_sid:
                    if run:
                        self._deliver(run_sid, run)
                        run = []
                    run_sid = ev.stream_id
                run.append(ev.data)
                continue
            if run:
                self._deliver(run_sid, run)
                run = []
                run_sid = 0
            if type(ev) is hbone.WindowOpened:
                # Handled once per stream when the read is dispatched (the windows are final by then): each
                # WindowOpened(0) wakes every blocked relay, and a read full of 13-byte WINDOW_UPDATEs of 1 byte
                # did that once per frame (100 blocked streams: ~280 us of the loop per frame).
                if opened is None:
                    opened = {ev.stream_id}
                else:
                    opened.add(ev.stream_id)
                continue
            try:
                self._on_event(ev)
            except Exception:  # a bug in one handler must not take the connection down with a traceback loop
                log.exception("HBONE event handling failed", extra=kv(event=type(ev).__name__))
        if run:
            self._deliver(run_sid, run)
        if opened is not None:
            for sid in sorted(opened):  # 0 (every blocked stream) first
                try:
                    self._on_event(hbone.WindowOpened(sid))
                except Exception:
                    log.exception("HBONE event handling failed", extra=kv(event="WindowOpened"))
        del events, run  # drop the views into the receive buffer before it is reused
        if self.write_paused and h2.replies - self._replies_at_pause > MAX_REPLIES_WHILE_PAUSED:
            self._flooded()
            return
        if h2.has_output():
            self.flush()

    def _flooded(self) -> None:
        """The peer keeps making us answer while it reads nothing: everything queued for it would stay in memory
        for as long as it keeps sending. Cut (a GOAWAY would only wait behind the unread bytes)."""
        self.stats.errors["flood"] += 1
        self._failed = "peer floods control frames"
        log.warning(
            "HBONE peer floods control frames without reading, dropping connection",
            extra=kv(peer=str(self.peer_identity), replies=self.h2.replies - self._replies_at_pause),
        )
        if self.transport is not None:
            self.transport.abort()

    def _deliver(self, stream_id: int, views: list[memoryview]) -> None:
        st = self.streams.get(stream_id)
        if st is None:
            return
        sink = st._sink
        if sink is None:
            for v in views:
                st._on_data(v)
            return
        n = len(views[0]) if len(views) == 1 else sum(len(v) for v in views)
        if sink.on_data(views, n):
            self.h2.acknowledge(stream_id, n)  # flushed once at the end of the batch

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ka_handle is not None:
            self._ka_handle.cancel()
            self._ka_handle = None
        # A connection that just went away ends its streams as the peer's reset would, no failure (ztunnel: h2
        # hands the io error on, or a broken pipe at EOF, and the copy ignores both); one we cut, or that went
        # after a GOAWAY with an error code (h2's GoAway error), fails them.
        if self._failed is not None:
            reason, benign = self._failed, False
        elif exc is not None:
            reason, benign = f"connection lost: {exc}", ungraceful(exc)
        else:
            reason, benign = "connection closed", True
        for st in list(self.streams.values()):
            st._on_reset(reason, benign=benign)
        self.stats.streams_closed += len(self.streams)
        self.streams.clear()
        self.blocked.clear()
        if self._counted:
            self.stats.connections_closed += 1
            self._counted = False
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if not self.closed.done():
            self.closed.set_result(None)
        self._notify_count()

    def pause_writing(self) -> None:
        """Every relay of the connection stops reading now, not after its next read: each would otherwise still
        read (up to READ_SIZE) and queue it behind the high-water mark, 200 streams some 50 MiB."""
        self.write_paused = True
        self._replies_at_pause = self.h2.replies
        for st in self.streams.values():
            sink = st._sink
            if sink is not None:
                sink.on_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        for st in list(self.streams.values()):
            st._on_writable()

    # ------------------------------------------------------------------------------ core plumbing

    def flush(self) -> None:
        out = self.h2.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def flush_soon(self) -> None:
        """Write what is queued when this turn of the loop is done, unless a write takes it along sooner: frames
        queued just before others (a 200, then the pod's answer to the client's first bytes) leave in one TLS
        record and one write instead of one each."""
        self.loop.call_soon(self.flush)

    def buffered_changed(self, delta: int) -> None:
        BUFFERS.changed(self, delta)

    def hold_credit(self, hold: bool) -> None:
        self.h2.hold_connection_credit(hold)
        if not hold and self.h2.has_output():
            self.flush()

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        self.h2.acknowledge(stream_id, nbytes)
        if self.h2.has_output():
            self.flush()

    def forget_if_closed(self, st: HboneStream) -> None:
        """Drop ``st`` once it is closed both here and in the core. Both, because the core has parsed the whole
        read while its events are dispatched one by one: a stream whose END_STREAM and RST_STREAM came in one
        read is already gone from the core when its StreamEnded is handled, and its StreamReset still has to
        find it."""
        if self.streams.get(st.stream_id) is st and st.closed and not self.h2.stream_is_open(st.stream_id):
            del self.streams[st.stream_id]
            self.blocked.discard(st)
            self.stats.streams_closed += 1
            self._notify_count()
            if not self.streams and (self.h2.goaway_received or self.h2.goaway_sent):
                self.close()

    def add_stream(self, st: HboneStream) -> None:
        self.streams[st.stream_id] = st
        self.stats.streams_opened += 1
        self._notify_count()

    def _notify_count(self) -> None:
        cb = self.on_stream_count
        if cb is not None:
            cb(len(self.streams))

    def close(self, error_code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.h2.goaway(error_code, reason)
        self.flush()
        self.transport.close()

    def drain(self) -> None:
        """GOAWAY(NO_ERROR): the peer opens no more streams here and those open carry on; the connection closes
        with the last of them (:meth:`forget_if_closed`), or now when there is none."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self.streams:
            self.close()
            return
        self.h2.goaway()
        self.flush()

    def _on_event(self, ev: hbone.Event) -> None:
        streams = self.streams
        st: HboneStream | None
        if isinstance(ev, hbone.WindowOpened):
            if ev.stream_id == 0:
                for blocked in list(self.blocked):
                    self.blocked.discard(blocked)
                    blocked._on_writable()
            else:
                st = streams.get(ev.stream_id)
                if st is not None:
                    self.blocked.discard(st)
                    st._on_writable()
        elif isinstance(ev, hbone.StreamEnded):
            st = streams.get(ev.stream_id)
            if st is not None:
                st._on_eof()
                self.forget_if_closed(st)
        elif isinstance(ev, hbone.StreamReset):
            if not ev.remote and ev.reason.startswith(_COUNTED_RESETS):  # we refused what the peer sent
                self.stats.rejects[reject_reason(ev.reason)] += 1
            st = streams.get(ev.stream_id)
            if st is not None:
                refused = ev.remote and ev.error_code == ErrorCode.REFUSED_STREAM
                stopped = ev.remote and ev.error_code == ErrorCode.NO_ERROR and st._eof
                benign = ev.remote and ev.error_code in _BENIGN_RESETS
                st._on_reset(
                    ev.reason or hbone.error_name(ev.error_code), retryable=refused, stopped=stopped, benign=benign
                )
                self.forget_if_closed(st)
        elif isinstance(ev, hbone.RequestReceived):
            self.on_request(ev)
        elif isinstance(ev, hbone.ResponseReceived):
            self.on_response(ev)
        elif isinstance(ev, hbone.RequestRejected):
            self.stats.rejects[reject_reason(ev.reason)] += 1
            log.info("HBONE request rejected", extra=kv(stream=ev.stream_id, status=ev.status, reason=ev.reason))
        elif isinstance(ev, hbone.PingAcked):
            self._ping_sent_at = None
        elif isinstance(ev, hbone.SettingsChanged):
            self._notify_count()
        elif isinstance(ev, hbone.ConnectionTerminated):
            self.on_terminated(ev)

    def on_request(self, ev: hbone.RequestReceived) -> None:
        self.h2.reset_stream(ev.stream_id, ErrorCode.REFUSED_STREAM)

    def on_response(self, ev: hbone.ResponseReceived) -> None:
        st = self.streams.get(ev.stream_id)
        if st is None or st._response is None or st._response.done():
            return
        if ev.status == 200:
            st._response.set_result(200)
            return
        st._response.set_exception(HboneConnectError(ev.status, f"peer answered {ev.status}"))
        st._reset_reason = f"CONNECT answered {ev.status}"
        self.h2.reset_stream(ev.stream_id, ErrorCode.CANCEL)
        self.forget_if_closed(st)

    def on_terminated(self, ev: hbone.ConnectionTerminated) -> None:
        if ev.remote:
            if ev.error_code != ErrorCode.NO_ERROR:
                self.stats.errors[_GOAWAY_REASONS.get(ev.error_code, _GOAWAY_UNKNOWN)] += 1
                self._failed = f"peer sent GOAWAY {hbone.error_name(ev.error_code)}"
                log.warning(
                    "HBONE peer sent GOAWAY",
                    extra=kv(
                        code=hbone.error_name(ev.error_code),
                        reason=ev.reason[:_LOGGED_DEBUG_DATA],
                        peer=str(self.peer_identity),
                    ),
                )
            if not self.streams:
                self.close()
            return
        self.stats.rejects[reject_reason(ev.reason)] += 1
        self._failed = f"HBONE protocol error: {ev.reason}"
        log.warning(
            "HBONE protocol error, closing connection",
            extra=kv(code=hbone.error_name(ev.error_code), reason=ev.reason, peer=str(self.peer_identity)),
        )
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def _keepalive(self) -> None:
        self._ka_handle = None
        if self.transport is None or self.transport.is_closing():
            return
        now = self.loop.time()
        if self._ping_sent_at is not None and now - self._ping_sent_at >= self.config.keepalive_timeout:
            self.stats.errors["keepalive_timeout"] += 1
            self._failed = "keepalive timeout"
            log.warning("HBONE keepalive timeout, dropping connection", extra=kv(peer=str(self.peer_identity)))
            self.transport.abort()
            return
        if self._ping_sent_at is None:
            self._ping_sent_at = now
            self.h2.ping(os.urandom(8))
            self.flush()
        delay = self.config.keepalive_interval
        if self._ping_sent_at is not None:
            delay = min(delay, self._ping_sent_at + self.config.keepalive_timeout - now)
        self._ka_handle = self.loop.call_later(max(delay, 0.001), self._keepalive)


# ---------------------------------------------------------------------------------------------------- relay


@dataclass(frozen=True, slots=True)
class RelayResult:
    """Bytes moved by :func:`relay`: up = TCP -> tunnel (taken by the stream), down = tunnel -> TCP (received);
    ``error`` when it did not end cleanly, ``ungraceful`` when that is only how it ended (a side reset or went
    away, see ungraceful()), which is no failure."""

    bytes_up: int
    bytes_down: int
    error: str | None = None
    ungraceful: bool = False

    @property
    def failure(self) -> str | None:
        """``error`` when the connection failed: what its report and response flag go by."""
        return None if self.ungraceful else self.error


class _TcpRelay(_ReceiveBuffer, _Sink):
    """Plain TCP side of a relay, wired to an HboneStream by callbacks, on the bare socket.

    No asyncio transport: creating one (uvloop's ``connect_accepted_socket``) cost ~0.1 ms per connection, more
    than the rest of this side's setup, and the relay needs nothing from it but non-blocking reads and writes. The
    socket is read into our receive buffer from a reader callback; stream data is sent at once, and what the
    socket does not take is kept (big pieces as views, small ones copied) and written from a writer callback.
    Credit for bytes we could not write is held back from the peer while that backlog is above WRITE_HIGH, which is
    what bounds it.
    """

    def __init__(self, sock: socket.socket, stream: HboneStream, done: asyncio.Future[RelayResult]) -> None:
        self.sock = sock
        loop = stream._proto.loop
        self._reader = Readiness(loop, sock.fileno(), self._on_readable, write=False)
        self._writer = Readiness(loop, sock.fileno(), self._on_socket_writable, write=True)
        self.stream = stream
        self.done = done
        self.up = stream.early_sent  # counted as the stream takes them
        self.down = 0
        self.error: str | None = None
        self.ungraceful = False  # the error is only how the connection ended
        self._init_buffer()
        self._pending: memoryview | None = None  # TCP bytes the stream could not take yet
        # Stream bytes the socket did not take: views of receive buffers, and copies (bytearrays, appended to).
        self._backlog: collections.deque[memoryview | bytearray] = collections.deque()
        self._backlog_size = 0
        self._held_credit = 0
        self._tcp_eof = False  # TCP peer sent FIN
        self._up_done = False  # our END_STREAM went out
        self._down_done = False  # END_STREAM received: FIN once the backlog is written
        self._fin_sent = False
        self._closed = False
        self._discarding: Readiness | None = None  # reads and drops the TCP peer's bytes after stop-sending
        self._linger_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        stream = self.stream
        stream._attach(self)
        if stream._early_rest is not None and not self._closed:
            # The client's first bytes that did not fit the windows when the CONNECT went out: sent before any
            # newer read (reading stays paused while they are pending).
            self._pending, stream._early_rest = stream._early_rest, None
            self.on_writable()
        self._update_reading()
        proto = stream._proto
        if proto.h2.client:
            return
        if self._reader.watching:
            # The server side just handed the pod the client's first bytes, and a pod on this core answers as
            # soon as it is woken: read its answer now, not a loop turn later (strace: one epoll_wait less per
            # connection). The client side took its first bytes with the CONNECT, and its client is waiting for
            # the answer, so a read there is nearly always EAGAIN: the poll reports what does arrive.
            self._on_readable()
        if not self.down and proto.h2.has_output():
            # No client bytes reached the pod, so there is no answer to wait for that the 200 could go out with:
            # the client waits for the 200 (or, for a protocol where the server speaks first, for the pod's banner
            # behind it). It goes now, not after the rest of the loop turn, which under load is every other
            # connection's ready work (ConnectRequest.respond only schedules it).
            proto.flush()

    # TCP side

    def _on_readable(self) -> None:
        mv = self.get_buffer(0)
        try:
            try:
                nbytes = self.sock.recv_into(mv)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._fail(f"tcp read: {e}", ungraceful(e))
                return
            if nbytes == 0:
                self._tcp_eof = True
                self._update_reading()
                self._maybe_send_eof()
                return
            if nbytes == self._bufsize < READ_SIZE:
                self._grow()  # the next read borrows a big buffer; this one is still being handed on
            view = mv[:nbytes]
            del mv
            n = self.stream._send(view)
            self.up += n
            if n < nbytes:
                self._pending = view[n:]  # a view: the buffer is not read into again while it lives
                self._update_reading()
        finally:
            if self._bufsize == READ_SIZE:
                self._release()

    def _on_socket_writable(self) -> None:
        backlog = self._backlog
        try:
            while backlog:
                self._drop_sent(self.sock.sendmsg(list(itertools.islice(backlog, 64))))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._fail(f"tcp write: {e}", ungraceful(e))
            return
        self._writer.watch(bool(backlog))
        if self._held_credit and self._backlog_size <= WRITE_LOW:
            credit, self._held_credit = self._held_credit, 0
            self.stream._proto.acknowledge(self.stream.stream_id, credit)
        if not backlog:
            self._maybe_send_fin()

    # stream side (_Sink)

    def on_data(self, views: list[memoryview], total: int) -> bool:
        self.down += total
        if self._closed:
            return True
        sent = 0
        if not self._backlog:  # the common case: the socket takes it all, nothing is kept
            try:
                if len(views) == 1:
                    sent = self.sock.send(views[0])
                else:  # at most IOV_MAX buffers per call (EMSGSIZE beyond); the rest waits in the backlog
                    sent = self.sock.sendmsg(views if len(views) <= _IOV_MAX else views[:_IOV_MAX])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                self._fail(f"tcp write: {e}", ungraceful(e))
                return True
            if sent == total:
                return True
        backlog = self._backlog
        pin = BUFFERS.pin
        kept = 0
        # A view keeps the whole receive buffer it points into alive (READ_SIZE): a piece that is a small part of it
        # is copied, or a slow reader's backlog of small frames would pin one buffer per frame (measured: 86 KB of
        # backlog held 44 MiB while other streams of the connection moved 32 MiB). The batch (one read's frames
        # for this stream) counts as a whole when it is all of one buffer, so a bulk read is not copied frame by
        # frame. Kept views pin at most _PIN_RATIO times their size; what they pin is what the budget counts.
        first = views[0].obj
        whole = total if views[-1].obj is first else 0
        for v in views:
            buf = cast(bytes, v.obj)
            if len(v) >= _KEEP_VIEW and (whole if buf is first else len(v)) * _PIN_RATIO >= len(buf):
                backlog.append(v)
                kept += pin(buf)
                continue
            tail = backlog[-1] if backlog else None
            if type(tail) is not bytearray or len(tail) >= _COPY_MAX:
                tail = bytearray()
                backlog.append(tail)
            tail += v
            kept += len(v)
        self._backlog_size += total
        self.stream._proto.buffered_changed(kept)
        self._drop_sent(sent)
        self._writer.watch(True)
        if self._backlog_size > WRITE_HIGH:
            self._held_credit += total
            return False
        return True

    def on_eof(self) -> None:
        if self._down_done:
            return
        self._down_done = True
        self._maybe_send_fin()

    def on_reset(self, reason: str, benign: bool = False) -> None:
        if self.error is None and not (self._up_done and self._down_done):
            self.error = f"stream reset: {reason}"
            self.ungraceful = benign
        self._close(abortive=True)

    def on_stop_sending(self) -> None:
        if self._closed:
            return
        if self._pending is not None and self.error is None:
            # ztunnel's write after RST_STREAM(NO_ERROR) is a broken pipe, which its copy ignores
            self.error = "peer stopped reading: unsent bytes dropped"
            self.ungraceful = True
        self._pending = None
        self._up_done = True
        if not self._tcp_eof:
            # What the TCP peer still sends has nowhere to go, but it is read and dropped rather than left unread:
            # closing a socket with unread bytes sends RST, and the reset throws away the part of the response the
            # kernel still holds for a slow reader. (One reader per fd: the relaying one goes first.)
            self._tcp_eof = True
            self._update_reading()
            self._discarding = Readiness(self.stream._proto.loop, self.sock.fileno(), self._discard, write=False)
            self._discarding.watch(True)
        if self._fin_sent:
            self._maybe_finish()
        else:
            self._maybe_send_fin()  # the response is complete: FIN once the backlog is written

    def on_write_paused(self) -> None:
        self._update_reading()

    def on_writable(self) -> None:
        if self._pending is not None:
            view = self._pending
            n = self.stream._send(view)
            self.up += n
            self._pending = view[n:] if n < len(view) else None
            if self._pending is None:
                self._maybe_send_eof()
        self._update_reading()

    def _discard(self) -> None:
        """After stop-sending: read and drop what the TCP peer still sends, until its FIN."""
        try:
            for _ in range(16):  # bounded: a peer flooding us must not hold the loop
                if not self.sock.recv(READ_SIZE):
                    break
            else:
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fail(f"tcp read: {e}", ungraceful(e))
            return
        if self._discarding is not None:
            self._discarding.watch(False)
            self._discarding = None
            self._maybe_finish()

    # helpers

    def _update_reading(self) -> None:
        if not self._closed:
            self._reader.watch(not (self._tcp_eof or self._pending is not None or self.stream._proto.write_paused))

    def _drop_sent(self, sent: int) -> None:
        """Take `sent` written bytes off the front of the backlog."""
        backlog = self._backlog
        self._backlog_size -= sent
        freed = 0
        while sent:
            head = backlog[0]
            if sent >= len(head):
                sent -= len(head)
                backlog.popleft()
                freed += _entry_freed(head)
            elif type(head) is bytearray:
                del head[:sent]  # cheap at the front of a bytearray
                freed += sent
                sent = 0
            else:
                backlog[0] = head[sent:]
                sent = 0
        if freed:
            self.stream._proto.buffered_changed(-freed)

    def _maybe_send_eof(self) -> None:
        if self._tcp_eof and self._pending is None and not self._up_done:
            self._up_done = True
            self.stream.write_eof()
            self._maybe_finish()

    def _maybe_send_fin(self) -> None:
        if self._down_done and not self._fin_sent and not self._backlog and not self._closed:
            self._fin_sent = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as e:  # the TCP peer is already gone
                self.on_reset(f"tcp shutdown: {e}", ungraceful(e))
                return
            self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._up_done and self._fin_sent:
            if self._discarding is not None:
                self._linger()
                return
            self._close(abortive=False)

    def _linger(self) -> None:
        """Stop-sending, and the response and our FIN are out: the relay is done, but the socket stays open, dropping
        what the TCP peer still sends, until the peer's FIN or LINGER_TIMEOUT. Closed now, the next bytes to arrive
        would be answered with RST, and the reset discards what of the response the kernel has not delivered."""
        if self._linger_timer is not None:
            return
        if not self.done.done():
            self.done.set_result(RelayResult(self.up, self.down, self.error, self.ungraceful))
        self._linger_timer = self.stream._proto.loop.call_later(LINGER_TIMEOUT, self._close_lingering)

    def _close_lingering(self) -> None:
        self._close(abortive=False)

    def _fail(self, reason: str, benign: bool = False) -> None:
        if self.error is None:
            self.error = reason
            self.ungraceful = benign
        self._close(abortive=True)

    def _close(self, *, abortive: bool) -> None:
        """Unregister, close the socket (RST when abortive) and report; idempotent. A relay that did not finish
        both directions resets its stream."""
        if self._closed:
            return
        if not (self._up_done and self._fin_sent):
            if self.error is None:
                self.error = "tcp side closed early"
            self.stream.reset()
        self._closed = True
        self._reader.watch(False)
        self._writer.watch(False)
        if self._discarding is not None:
            self._discarding.watch(False)
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        freed = 0
        for v in self._backlog:
            freed += _entry_freed(v)
        self._backlog.clear()
        self._backlog_size = 0
        if freed:
            self.stream._proto.buffered_changed(-freed)
        if abortive:
            abort(self.sock)
        else:
            close_gracefully(self.sock)
        if not self.done.done():
            self.done.set_result(RelayResult(self.up, self.down, self.error, self.ungraceful))

    def abort(self, reason: str) -> None:
        self._fail(reason)


def _entry_freed(entry: memoryview | bytearray) -> int:
    """The memory the budget counted for a backlog entry that is written or dropped: what is left of a copy, or
    the buffer a view kept alive if it was the last such view."""
    if isinstance(entry, bytearray):
        return len(entry)
    return BUFFERS.unpin(cast(bytes, entry.obj))


async def relay(
    sock: socket.socket, stream: HboneStream, live: Callable[[Callable[[], tuple[int, int]]], object] | None = None
) -> RelayResult:
    """Move bytes both ways between a connected plain TCP socket and ``stream`` until both directions ended.

    TCP FIN becomes END_STREAM and END_STREAM becomes shutdown(SHUT_WR); a reset on either side aborts both.
    Back-pressure: TCP reading pauses while the stream has no send window or TLS writing is paused, and stream
    credit is returned only as the TCP side drains. Takes ownership of ``sock`` (closed at the end). Cancelling
    the task (e.g. a policy change) resets the stream and closes the socket. I/O failures end up in
    ``RelayResult.error`` (``RelayResult.failure`` leaves out resets and broken pipes, which are no failure); the
    only exception is CancelledError.
    """
    done: asyncio.Future[RelayResult] = stream._proto.loop.create_future()
    make_nonblocking(sock)
    reset_if_orphaned(sock)
    side = _TcpRelay(sock, stream, done)
    if live is not None:  # (up, down) as counted so far, for metrics that move while the connection lasts
        live(lambda: (side.up, side.down))
    side.start()
    try:
        return await done
    except asyncio.CancelledError:
        side.abort("cancelled")
        raise


# ---------------------------------------------------------------------------------------------------- client


class _ClientProtocol(_HboneProtocol):
    def __init__(self, expected: Identity | frozenset[Identity], config: TunnelConfig, stats: TunnelStats) -> None:
        super().__init__(client=True, config=config, stats=stats)
        self.expected = expected if isinstance(expected, frozenset) else frozenset((expected,))

    def verify(self, transport: asyncio.Transport) -> None:
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is None or sslobj.selected_alpn_protocol() != ALPN_H2:
            raise PeerRefused("alpn")
        try:
            # One of several (a service's subject_alt_names) may be of another trust domain: membership is the check.
            domain = next(iter(self.expected)).trust_domain if len(self.expected) == 1 else None
            self.peer_identity = verify_peer(sslobj, trust_domain=domain, expected=self.expected)
        except PeerVerificationError as e:
            raise PeerRefused("wrong_identity", str(e)) from None


class HboneClientConnection:
    """A client HBONE connection (TLS + HTTP/2) multiplexing CONNECT streams; created by :func:`connect`."""

    def __init__(self, proto: _ClientProtocol, local_ip: str) -> None:
        self._proto = proto
        assert proto.peer_identity is not None
        self.peer_identity: Identity = proto.peer_identity
        self.local_ip = local_ip  # what the connection left from: the client pod's address, or the node's

    async def open_stream(self, authority: str, headers: list[tuple[str, str]], early: bytes = b"") -> HboneStream:
        """Send CONNECT and wait for the response; non-200 raises HboneConnectError(status).

        ``early`` is what the client already sent: it goes out as DATA in the same TLS write as the CONNECT
        (RFC 9113 8.5 lets DATA follow the request HEADERS; the server holds it, within the stream window, until
        its upstream is connected). The client's first bytes then travel with the request instead of waiting a
        round trip for the 200. What the windows do not take now is sent by :func:`relay`. A refused stream was
        not processed, so the caller may send the same ``early`` again on another connection.

        The stream is counted against the connection synchronously (before the first await), so a caller that
        checked :attr:`available_streams` cannot be overtaken.
        """
        proto = self._proto
        if not self.usable:
            raise HboneConnectError(503, "connection not usable", retryable=True, stage=ConnectStage.HTTP2)
        try:
            sid = proto.h2.send_connect(authority, headers)
        except StreamStateError as e:
            raise HboneConnectError(503, str(e), retryable=True, stage=ConnectStage.HTTP2) from None
        st = HboneStream(proto, sid)
        if early:
            n = st.early_sent = proto.h2.send_data(sid, early)
            if n < len(early):
                st._early_rest = memoryview(early)[n:]
        response = st._response = proto.loop.create_future()
        proto.add_stream(st)
        proto.flush()
        # A timer on the future, not asyncio.timeout(): the timeout context costs a task lookup and a reschedule
        # on every stream, and this is the connection-setup path.
        timer = proto.loop.call_later(proto.config.response_timeout, _expire, response)
        try:
            await response
        except HboneConnectError:
            proto.forget_if_closed(st)
            raise
        except TimeoutError:
            st.reset()
            raise HboneConnectError(
                503, "timed out waiting for the CONNECT response", stage=ConnectStage.HTTP2
            ) from None
        except asyncio.CancelledError:
            st.reset()
            raise
        finally:
            timer.cancel()
        return st

    @property
    def active_streams(self) -> int:
        return len(self._proto.streams)

    @property
    def available_streams(self) -> int:
        """Streams the peer still allows (its MAX_CONCURRENT_STREAMS); 0 when not usable."""
        return self._proto.h2.available_streams if self.usable else 0

    @property
    def usable(self) -> bool:
        """False once GOAWAY was received/sent, the stream ids ran out or the connection closed: open no new streams
        on it (the pool then closes it as soon as its last stream ends)."""
        p = self._proto
        h2 = p.h2
        alive = p.transport is not None and not p.transport.is_closing() and not p.closed.done()
        return alive and not (h2.goaway_received or h2.goaway_sent or h2.closed or h2.stream_ids_exhausted)

    def set_stream_count_callback(self, cb: Callable[[int], None] | None) -> None:
        """Called with the number of active streams whenever it changes (the pool's idle tracking)."""
        self._proto.on_stream_count = cb

    def close(self) -> None:
        """GOAWAY(NO_ERROR) and close the transport (open streams are reset)."""
        self._proto.close()

    def abort(self) -> None:
        if self._proto.transport is not None:
            self._proto.transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._proto.closed)


async def connect(
    addr: tuple[str, int],
    ssl_context: ssl.SSLContext,
    expected: Identity | frozenset[Identity],
    *,
    config: TunnelConfig | None = None,
    stats: TunnelStats | None = None,
    source_ip: str | None = None,
    dial: Dial = connect_upstream,
) -> HboneClientConnection:
    """TCP connect (``dial``: from ``source_ip`` when given, see connect_upstream) + TLS (no SNI) + SPIFFE check of
    the server against ``expected`` (and its trust domain), or against any one of a set of acceptable identities.

    Raises HboneConnectError(503, reason) on refusal, timeout, TLS failure or wrong identity, with the stage
    (TCP, TCP_TIMEOUT or TLS).
    """
    cfg = config or TunnelConfig()
    st = stats or STATS
    loop = asyncio.get_running_loop()
    proto = _ClientProtocol(expected, cfg, st)
    sock: socket.socket | None = None
    try:
        async with asyncio.timeout(cfg.connect_timeout + cfg.handshake_timeout):
            sock = await dial(addr, source_ip=source_ip, connect_timeout=cfg.connect_timeout)
            await loop.create_connection(
                lambda: proto,
                sock=sock,
                ssl=ssl_context,
                server_hostname="",  # no SNI: the server picks its certificate by destination address
                ssl_handshake_timeout=cfg.handshake_timeout,
            )
            await proto.ready
    except PeerRefused as e:
        st.rejects[e.reason] += 1
        _close(sock)
        raise HboneConnectError(503, f"{addr[0]}:{addr[1]}: {e}", stage=ConnectStage.TLS) from None
    except (OSError, TimeoutError, ConnectionError) as e:
        _close(sock)
        if isinstance(e, ssl.SSLError):
            st.rejects[_ssl_reason(e)] += 1
        if sock is not None:
            stage = ConnectStage.TLS
        else:  # ETIMEDOUT is a TimeoutError too
            stage = ConnectStage.TCP_TIMEOUT if isinstance(e, TimeoutError) else ConnectStage.TCP
        raise HboneConnectError(503, f"{addr[0]}:{addr[1]}: {type(e).__name__}: {e}", stage=stage) from None
    except BaseException:
        _close(sock)
        raise
    return HboneClientConnection(proto, sock.getsockname()[0])


def _expire(response: asyncio.Future[int]) -> None:
    if not response.done():
        response.set_exception(TimeoutError())


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


# ---------------------------------------------------------------------------------------------------- server


class ConnectRequest:
    """A CONNECT received on the server side, handed to the handler of :func:`serve_hbone_connection`."""

    def __init__(self, proto: _ServerProtocol, ev: hbone.RequestReceived) -> None:
        self._proto = proto
        self.stream_id = ev.stream_id
        self.authority = ev.authority
        self.headers = ev.headers  # regular headers (forwarded, baggage, traceparent, ...), names lowercase
        assert proto.peer_identity is not None
        self.peer_identity: Identity = proto.peer_identity
        self._stream = HboneStream(proto, ev.stream_id)
        self.status: int | None = None

    def header(self, name: str) -> str | None:
        """First value of a regular header (name lowercase), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def respond(self, status: int, headers: list[tuple[str, str]] | None = None) -> None:
        """Answer the CONNECT. 200 opens the tunnel (then use :attr:`stream`); any other status ends the stream.

        Raises HboneStreamReset if the client already reset the stream or the connection is gone.
        """
        if self.status is not None:
            raise StreamStateError(f"stream {self.stream_id} already answered {self.status}")
        st = self._stream
        if st._reset_reason is not None:
            raise HboneStreamReset(st._reset_reason)
        self.status = status
        st._abandon = None  # answered: a reset from now on ends the relay, not the handler
        try:
            self._proto.h2.send_response(self.stream_id, status, headers)
        except StreamStateError as e:
            raise HboneStreamReset(str(e)) from None
        if status != 200:
            st._reset_reason = f"answered {status}"
            self._proto.flush()
            self._proto.forget_if_closed(st)
            return
        # The relay starts now and reads the pod's answer at once (the client's first bytes were handed to it).
        self._proto.flush_soon()

    @property
    def abandoned(self) -> bool:
        """The client reset the stream (or the connection went away) before it was answered."""
        return self.status is None and self._stream._reset_reason is not None

    @property
    def stream(self) -> HboneStream:
        """The tunnel stream; only valid after ``respond(200)``."""
        if self.status != 200:
            raise StreamStateError(f"stream {self.stream_id} was not answered 200")
        return self._stream


class _ServerProtocol(_HboneProtocol):
    def __init__(
        self,
        handler: Callable[[ConnectRequest], Awaitable[None]],
        trust_domain: str | None,
        config: TunnelConfig,
        stats: TunnelStats,
    ) -> None:
        super().__init__(client=False, config=config, stats=stats)
        self.handler = handler
        self.trust_domain = trust_domain
        self.tasks: set[asyncio.Task[None]] = set()

    def verify(self, transport: asyncio.Transport) -> None:
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is None or sslobj.selected_alpn_protocol() != ALPN_H2:
            raise PeerRefused("alpn")
        try:
            self.peer_identity = verify_peer(sslobj, trust_domain=self.trust_domain)
        except PeerVerificationError as e:
            ident = peer_identity(sslobj)
            foreign = ident is not None and self.trust_domain is not None and ident.trust_domain != self.trust_domain
            raise PeerRefused("trust_domain" if foreign else "untrusted_peer", str(e)) from None

    def on_request(self, ev: hbone.RequestReceived) -> None:
        req = ConnectRequest(self, ev)
        self.add_stream(req._stream)
        task = self.loop.create_task(self._run_handler(req))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        # A CONNECT reset (or its connection lost) before the answer cancels its handler, as hyper drops the
        # service future of a reset stream: otherwise a client that opens and resets streams at once (HTTP/2
        # rapid reset, or just clients giving up) had every handler run on, each connecting to the pod, with no
        # bound (max_concurrent_streams counts open streams only).
        req._stream._abandon = task.cancel

    async def _run_handler(self, req: ConnectRequest) -> None:
        try:
            await self.handler(req)
        except asyncio.CancelledError:
            raise
        except HboneStreamReset as e:  # the client went away while we worked on its request: routine
            log.debug("HBONE stream reset during handling", extra=kv(authority=req.authority, reason=str(e)))
        except Exception:
            log.exception("HBONE handler failed", extra=kv(authority=req.authority, peer=str(req.peer_identity)))
        finally:
            req._stream._abandon = None
            if req.status is None and req._stream._reset_reason is None:
                with contextlib.suppress(StreamStateError, HboneStreamReset):
                    await req.respond(503)
            elif not req._stream.closed:
                req._stream.reset()


class ServerConnections:
    """The HBONE connections a server is serving, so that a draining agent can send their clients elsewhere: after
    GOAWAY a client's pool stops opening streams on the connection and dials again (the node's next agent takes
    those), instead of piling new streams onto an agent that cuts them all when its drain time is up."""

    def __init__(self) -> None:
        self._live: set[_ServerProtocol] = set()

    def __len__(self) -> int:
        return len(self._live)

    def drain(self) -> int:
        """GOAWAY to every connection (streams already open carry on); returns how many were told."""
        live = list(self._live)
        for proto in live:
            proto.drain()
        return len(live)


async def serve_hbone_connection(
    sock: socket.socket,
    ssl_context: ssl.SSLContext,
    handler: Callable[[ConnectRequest], Awaitable[None]],
    *,
    trust_domain: str | None,
    config: TunnelConfig | None = None,
    stats: TunnelStats | None = None,
    connections: ServerConnections | None = None,
) -> None:
    """Serve one accepted TCP connection as an HBONE server until it closes.

    Does the TLS handshake (client certificate required by ``ssl_context``), checks the client's SPIFFE identity
    is in ``trust_domain``, then runs ``handler(req)`` as a task per valid CONNECT. Non-CONNECT requests get 400,
    protocol errors GOAWAY; every refusal is counted in ``stats.rejects``. A handler that returns or raises
    without responding makes the stream answer 503; when it returns, a stream it left open is reset. Takes
    ownership of ``sock``; never raises on peer input. Cancelling it sends GOAWAY, cuts the connection at once
    (its streams are reset) and cancels its handlers. While it serves, the connection is in ``connections``.
    """
    cfg = config or TunnelConfig()
    st = stats or STATS
    loop = asyncio.get_running_loop()
    proto = _ServerProtocol(handler, trust_domain, cfg, st)
    peer = "?"
    with contextlib.suppress(OSError):
        host, port = sock.getpeername()[:2]
        peer = f"{host}:{port}"
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.connect_accepted_socket(
            lambda: proto, sock, ssl=ssl_context, ssl_handshake_timeout=cfg.handshake_timeout
        )
        await proto.ready
    except PeerRefused as e:
        st.rejects[e.reason] += 1
        log.info("HBONE client refused", extra=kv(peer=peer, reason=str(e)))
        sock.close()
        return
    except (OSError, ConnectionError, TimeoutError) as e:
        reason = _ssl_reason(e)
        st.rejects[reason] += 1
        log.info("HBONE TLS handshake failed", extra=kv(peer=peer, reason=reason, error=str(e)))
        sock.close()
        return
    except asyncio.CancelledError:
        sock.close()
        raise
    live = connections._live if connections is not None else set()
    live.add(proto)
    try:
        await asyncio.shield(proto.closed)
    except asyncio.CancelledError:
        proto.close()
        if proto.transport is not None:
            # Cut now, not after the TLS close exchange: our caller closes the socket once we return, and a
            # transport still watching that descriptor would hand its registration to the next socket given the
            # same number (the stdlib loop; uvloop would keep the connection open instead).
            proto.transport.abort()
        for task in list(proto.tasks):
            task.cancel()
        raise
    finally:
        live.discard(proto)
