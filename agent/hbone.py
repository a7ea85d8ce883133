"""Sans-IO HTTP/2 for HBONE only: CONNECT streams carrying raw bytes, client and server roles.

Why not the ``h2`` library: measured on these machines it spends most of its receive time formatting debug reprs
of every frame, copies each payload several times and stalls streams when credit is not returned just so
(reference/envoy-hbone.md). HBONE needs a small subset of HTTP/2, so this core implements exactly that subset with
a DATA path that costs almost nothing per byte:

* received DATA payloads are handed out as ``memoryview`` slices of the caller's input, as soon as each piece
  arrives (a 1 MiB frame is never reassembled);
* sent DATA frames are (9-byte header, payload view) pairs; :meth:`HboneConnection.data_to_send` joins every run
  of small parts (headers, control frames, small payloads) into one buffer, because an SSL transport encrypts
  each element given to ``writelines`` as its own TLS record(s), while big payload views go out uncopied;
* connection-level credit is returned on receipt (per-stream buffering is already bounded by the stream window),
  so a stream whose consumer never reads cannot starve the others; the exception is DATA on a stream the server
  has not answered yet, whose connection credit waits for the answer (what a peer can park unread is then one
  connection window); stream credit is returned as the consumer acknowledges bytes with
  :meth:`HboneConnection.acknowledge`.

Bytes go in with :meth:`HboneConnection.receive_data` and come back as events; everything to send accumulates
until :meth:`HboneConnection.data_to_send`. Peer misbehaviour never raises: it becomes RST_STREAM or GOAWAY and
an event saying why.
"""

from __future__ import annotations

import enum
import logging
import re
import struct
from dataclasses import dataclass, field

from hpack.exceptions import HPACKError, OversizedHeaderListError

from agent.header_block import BlockDecoder, BlockEncoder, Header, HeaderListTooLarge

_PER_STREAM_HEADERS = frozenset({"forwarded", "traceparent"})
# hpack logs every integer and table operation at DEBUG: about a third of the cost of coding a CONNECT header
# block, on every stream, for output nobody reads from a proxy.
for _name in ("hpack", "hpack.hpack", "hpack.table", "hpack.huffman"):
    logging.getLogger(_name).disabled = True

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DEFAULT_MAX_FRAME = 16384
DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
# Header blocks arriving in more frames than this are a CONTINUATION flood, not a header list.
MAX_HEADER_FRAMES = 64
# A SETTINGS frame with more entries than this is a flood (nghttp2's default max_settings, its fix for
# CVE-2020-11080): there are seven settings, and a 1 MiB frame of 174,762 entries cost seconds of the loop.
MAX_SETTINGS_ENTRIES = 32
# Streams the core may reset because of what the peer sent (stream errors, malformed requests) before the
# connection is cut with ENHANCE_YOUR_CALM: hyperium/h2's max_local_error_reset_streams default (1024), against
# peers that make us reset streams on purpose ("MadeYouReset", CVE-2025-8671). Never reached by a sane peer.
MAX_LOCAL_ERROR_RESETS = 1024
# What of a peer's text (GOAWAY debug data, a header name) goes into an event's reason, which gets logged.
MAX_REASON_TEXT = 256
# Output parts up to this size (one TLS record's worth) are joined with their neighbours by data_to_send: at most
# one 16 KiB copy instead of an SSL_write and a TLS record of their own. Bigger payload views go out uncopied.
COALESCE_LIMIT = 16 * 1024
SMALL_FRAME = COALESCE_LIMIT - 9  # a payload copied into its frame (one bytes, one TLS record), not referenced

_HDR = struct.Struct(">BHBBL")
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")

# Frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# Flags
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20
# Settings
S_HEADER_TABLE_SIZE = 1
S_ENABLE_PUSH = 2
S_MAX_CONCURRENT_STREAMS = 3
S_INITIAL_WINDOW_SIZE = 4
S_MAX_FRAME_SIZE = 5
S_MAX_HEADER_LIST_SIZE = 6

# Headers a CONNECT tunnel must never carry (RFC 9113 8.2.2).
_CONNECTION_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
# RFC 9113 8.2.1: a field name is a lowercase token; a value has no NUL, CR or LF and no whitespace at either end.
# Either makes the message malformed (a 400 for a request, a stream error for a response); _check_fields tests
# each field (a CONNECT or its answer has about five).
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_STATUS = re.compile(r"[1-9][0-9][0-9]")  # RFC 9110 15: three ASCII digits (str.isdigit also takes "²")
# The pseudo-headers each kind of header list may carry (RFC 9113 8.3; a CONNECT has no :scheme or :path, 8.5).
_REQUEST_PSEUDO = frozenset({":method", ":authority"})
_RESPONSE_PSEUDO = frozenset({":status"})
_TRAILER_PSEUDO: frozenset[str] = frozenset()


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


def error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"0x{code:x}"


@dataclass(frozen=True, slots=True)
class HboneSettings:
    """What we advertise; defaults are ztunnel's (reference/istio-ambient.md 1.5)."""

    stream_window: int = 4 * 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    max_frame_size: int = 1024 * 1024
    max_concurrent_streams: int = 200
    # Advertised; a header list above it is a stream error (431 for a request, RST_STREAM for a response), above
    # header_block.HARD_LIMIT_FACTOR times it a connection error (BlockDecoder says why).
    max_header_list_size: int = 64 * 1024
    header_table_size: int = 4096

    def __post_init__(self) -> None:
        if not DEFAULT_MAX_FRAME <= self.max_frame_size <= 2**24 - 1:
            raise ValueError(f"max_frame_size {self.max_frame_size} outside [16384, 2^24-1]")
        if not DEFAULT_WINDOW <= self.stream_window <= MAX_WINDOW:
            raise ValueError(f"stream_window {self.stream_window} outside [65535, 2^31-1]")
        if not DEFAULT_WINDOW <= self.connection_window <= MAX_WINDOW:
            raise ValueError(f"connection_window {self.connection_window} outside [65535, 2^31-1]")


# ---------------------------------------------------------------------------------------------------- events


@dataclass(slots=True)
class RequestReceived:
    """Server: a valid CONNECT arrived (``headers`` are the regular headers, names lowercase)."""

    stream_id: int
    authority: str
    headers: list[tuple[str, str]]


@dataclass(slots=True)
class RequestRejected:
    """Server: a request was refused by the core itself (already answered or reset); ``reason`` is for counters."""

    stream_id: int
    status: int
    reason: str


@dataclass(slots=True)
class ResponseReceived:
    """Client: the final response to our CONNECT."""

    stream_id: int
    status: int
    headers: list[tuple[str, str]]


@dataclass(slots=True)
class DataReceived:
    """A piece of a DATA frame's payload: a view into the buffer given to receive_data, valid only until that
    buffer is reused. Acknowledge it (``acknowledge``) once consumed so the peer gets the stream credit back."""

    stream_id: int
    data: memoryview


@dataclass(slots=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM)."""

    stream_id: int


@dataclass(slots=True)
class StreamReset:
    """The stream is gone: RST_STREAM from the peer (``remote``) or one we sent because of a stream error."""

    stream_id: int
    error_code: int
    remote: bool
    reason: str = ""


@dataclass(slots=True)
class WindowOpened:
    """Send credit grew for ``stream_id``; 0 means the connection window or every stream's window."""

    stream_id: int


@dataclass(slots=True)
class PingAcked:
    opaque: bytes


@dataclass(slots=True)
class SettingsChanged:
    """The peer's SETTINGS were applied (its stream limit may have changed)."""


@dataclass(slots=True)
class ConnectionTerminated:
    """GOAWAY received (``remote``) or sent because of a connection error; ``last_stream_id`` is the last stream
    the sender of the GOAWAY may have processed. After a local error nothing more is parsed."""

    error_code: int
    last_stream_id: int
    remote: bool
    reason: str = ""


Event = (
    RequestReceived
    | RequestRejected
    | ResponseReceived
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowOpened
    | PingAcked
    | SettingsChanged
    | ConnectionTerminated
)


class StreamStateError(Exception):
    """Local misuse: sending on a stream that is closed or unknown. Never caused by peer input."""


class _ConnError(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _StreamError(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Stream:
    __slots__ = (
        "held",
        "id",
        "local_closed",
        "recv_window",
        "remote_closed",
        "responded",
        "send_window",
        "unacked",
    )

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.recv_window = recv_window
        self.unacked = 0
        self.held = 0  # connection credit of DATA that arrived before we answered (server): returned on answer
        self.local_closed = False
        self.remote_closed = False
        self.responded = False


# Parser states. _ST_CONT is _ST_HEADER while a header block awaits its CONTINUATION: a state of its own so that
# the DATA fast path, which only runs in _ST_HEADER, needs no check of its own for an open header block.
_ST_PREFACE, _ST_HEADER, _ST_PAYLOAD, _ST_PADLEN, _ST_DATA, _ST_DEAD, _ST_CONT = range(7)


@dataclass(slots=True)
class _HeaderBlock:
    stream_id: int
    end_stream: bool
    fragments: list[bytes] = field(default_factory=list)
    size: int = 0
    frames: int = 1
    # RFC 7540 5.3.1 (kept by RFC 9113 for the deprecated priority fields): a stream cannot depend on itself.
    self_dependent: bool = False


class HboneConnection:
    """One HTTP/2 connection carrying HBONE CONNECT streams (client or server role), without I/O."""

    def __init__(self, *, client: bool, settings: HboneSettings | None = None) -> None:
        self.client = client
        self.settings = settings or HboneSettings()
        self._max_frame = self.settings.max_frame_size
        self._out: list[bytes | memoryview] = []
        self._streams: dict[int, _Stream] = {}
        self._encoder = BlockEncoder()
        self._decoder = BlockDecoder(
            max_header_list_size=self.settings.max_header_list_size, max_table_size=self.settings.header_table_size
        )
        # Peer settings (RFC defaults until its SETTINGS arrive).
        self.peer_max_frame_size = DEFAULT_MAX_FRAME
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_concurrent_streams = 100 if client else MAX_STREAM_ID
        self._conn_send_window = DEFAULT_WINDOW
        self._conn_recv_window = self.settings.connection_window
        self._conn_unacked = 0
        self._conn_credit_held = False  # see hold_connection_credit
        self._conn_deferred = 0
        self._next_stream_id = 1 if client else 2
        self._last_remote_id = 0
        self._local_resets = 0  # streams we ended because of the peer's input (see MAX_LOCAL_ERROR_RESETS)
        # A change of the peer's INITIAL_WINDOW_SIZE not yet applied to the open streams' send windows: applied
        # once at the end of receive_data (see _apply_initial_window), so a flood of SETTINGS frames costs one pass
        # over the streams per read, not one per frame.
        self._window_shift = 0
        self._local_streams = 0  # open streams we initiated (client) -- counted against the peer's limit
        self._remote_streams = 0  # open streams the peer initiated (server)
        self.goaway_sent = False
        self._goaway_last = 0  # the last stream id of the first GOAWAY we sent
        self._goaway_error = False  # a GOAWAY with an error code was sent: nothing more to say
        self.goaway_received = False
        self.closed = False  # a connection error happened; nothing more is parsed
        # Frames queued in answer to the peer's (PING and SETTINGS ACKs, refusals, stream resets): what a peer that
        # sends but never reads can make us buffer without end (the 2019 HTTP/2 flood CVEs); the I/O layer bounds it.
        self.replies = 0
        # Parser
        self._state = _ST_HEADER if client else _ST_PREFACE
        self._seen_settings = False
        self._hbuf = bytearray()  # partial frame header / preface / non-DATA payload
        self._ftype = 0
        self._flags = 0
        self._fsid = 0
        self._need = 0
        self._data_stream: _Stream | None = None
        self._data_left = 0
        self._pad_left = 0
        self._data_end = False
        self._block: _HeaderBlock | None = None

    # ------------------------------------------------------------------------------------------ public: state

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def available_streams(self) -> int:
        """How many more streams we may open now (client), per the peer's MAX_CONCURRENT_STREAMS."""
        if self.closed or self.goaway_received or self.goaway_sent or self.stream_ids_exhausted:
            return 0
        return max(0, self.peer_max_concurrent_streams - self._local_streams)

    @property
    def stream_ids_exhausted(self) -> bool:
        """True once our last stream id (2^31-1 for a client) is used: new streams need a new connection."""
        return self._next_stream_id > MAX_STREAM_ID

    def send_window(self, stream_id: int) -> int:
        """Bytes :meth:`send_data` would accept on ``stream_id`` now (0 for unknown/closed streams)."""
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            return 0
        return max(0, min(st.send_window, self._conn_send_window))

    def stream_is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def data_to_send(self) -> list[bytes | memoryview]:
        """Everything queued for the wire since the last call, for ``transport.writelines``.

        uvloop's (and asyncio's) SSL transport calls ``SSL_write`` once per element, so every element costs at
        least one TLS record, encrypted and parsed on its own. Consecutive parts of up to COALESCE_LIMIT bytes are
        therefore returned joined as one ``bytes``; larger payload views are returned as given (zero-copy), which
        leaves at most one small record (their 9-byte header, with whatever preceded it) per big frame.
        """
        out = self._out
        if not out:
            return out
        self._out = []
        if len(out) == 1:
            return out
        return _coalesce(out)

    def has_output(self) -> bool:
        return bool(self._out)

    # ------------------------------------------------------------------------------------------ public: send

    def initiate(self) -> None:
        """Queue the preface (client), our SETTINGS and the connection window increase."""
        s = self.settings
        settings = [
            (S_ENABLE_PUSH, 0),
            (S_MAX_CONCURRENT_STREAMS, s.max_concurrent_streams),
            (S_INITIAL_WINDOW_SIZE, s.stream_window),
            (S_MAX_FRAME_SIZE, s.max_frame_size),
            (S_MAX_HEADER_LIST_SIZE, s.max_header_list_size),
        ]
        if s.header_table_size != 4096:
            # The decoder refuses table size updates above it: the peer must know (4096 is the default, RFC 9113 6.5.2)
            settings.append((S_HEADER_TABLE_SIZE, s.header_table_size))
        payload = b"".join(_SETTING.pack(k, v) for k, v in settings)
        parts = [PREFACE] if self.client else []
        parts.append(_frame(SETTINGS, 0, 0, payload))
        if s.connection_window > DEFAULT_WINDOW:
            parts.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(s.connection_window - DEFAULT_WINDOW)))
        self._out.append(b"".join(parts))

    def send_connect(self, authority: str, headers: list[tuple[str, str]] | None = None) -> int:
        """Client: open a stream with ``CONNECT authority``; returns its id."""
        if not self.client:
            raise StreamStateError("only a client sends CONNECT")
        if self.available_streams <= 0:
            raise StreamStateError("no stream capacity on this connection")
        sid = self._next_stream_id
        if sid > MAX_STREAM_ID:
            raise StreamStateError("stream ids exhausted")
        self._next_stream_id += 2
        block: list[Header] = [(":method", "CONNECT", False), (":authority", authority, False)]
        for k, v in headers or ():
            k = k.lower()
            # Values that differ on every stream would only churn both dynamic tables, and the encoder searches
            # its table linearly for every header it writes.
            block.append((k, v, k in _PER_STREAM_HEADERS))
        self._streams[sid] = _Stream(sid, self.peer_initial_window - self._window_shift, self.settings.stream_window)
        self._local_streams += 1
        self._send_headers(sid, block, end_stream=False)
        return sid

    def send_response(self, stream_id: int, status: int, headers: list[tuple[str, str]] | None = None) -> None:
        """Server: answer a CONNECT. 2xx keeps the stream open; anything else ends it."""
        self._respond(stream_id, status, headers, ErrorCode.NO_ERROR)

    def _respond(
        self, stream_id: int, status: int, headers: list[tuple[str, str]] | None, stop_code: ErrorCode
    ) -> None:
        """send_response; a final answer to a client still sending is followed by RST_STREAM ``stop_code``."""
        st = self._streams.get(stream_id)
        if st is None or st.responded or st.local_closed:
            raise StreamStateError(f"stream {stream_id} cannot be answered")
        st.responded = True
        self._release_held(st)
        block: list[Header] = [(":status", str(status), False)]
        block.extend((k.lower(), v, False) for k, v in headers or ())
        final = not 200 <= status < 300
        self._send_headers(stream_id, block, end_stream=final)
        if final:
            st.local_closed = True
            if not st.remote_closed:
                # The response is complete; tell the client to stop sending (RFC 9113 8.1): NO_ERROR, or
                # PROTOCOL_ERROR after the 400 to a malformed request, which is a stream error all the same (8.1.1).
                self._out.append(_frame(RST_STREAM, 0, stream_id, _U32.pack(stop_code)))
            self._forget(st)

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int:
        """Queue as much of ``data`` as the windows allow; returns how many bytes were taken.

        END_STREAM is only set when all of ``data`` was taken. The payload is referenced, not copied, when the
        frames are large: the caller must not modify it before :meth:`data_to_send` output has been written.
        """
        st = self._sendable(stream_id)
        total = len(data)
        n = min(total, st.send_window, self._conn_send_window)
        if n <= 0:
            if total == 0 and end_stream:
                self.end_stream(stream_id)
            return 0
        st.send_window -= n
        self._conn_send_window -= n
        fin = end_stream and n == total
        fsize = self.peer_max_frame_size
        mv = data if isinstance(data, memoryview) else memoryview(data)
        out = self._out
        if n <= fsize:
            hdr = _HDR.pack(n >> 16, n & 0xFFFF, DATA, FLAG_END_STREAM if fin else 0, stream_id)
            if n <= SMALL_FRAME:
                out.append(hdr + mv[:n])  # joined here, so a lone small frame skips _coalesce: the latency path
            else:
                out.append(hdr)
                out.append(mv[:n] if n < total else mv)
        else:
            pos = 0
            while pos < n:
                ln = min(fsize, n - pos)
                flags = FLAG_END_STREAM if fin and pos + ln == n else 0
                out.append(_HDR.pack(ln >> 16, ln & 0xFFFF, DATA, flags, stream_id))
                out.append(mv[pos : pos + ln])
                pos += ln
        if fin:
            self._local_close(st)
        return n

    def data_frame(self, stream_id: int, data: bytes | memoryview) -> bytes | None:
        """The latency path of :meth:`send_data`: a payload of up to SMALL_FRAME bytes that the windows take whole,
        on a stream open for sending, while nothing else is queued, is returned as one DATA frame (a copy) for the
        caller to write at once; anything else returns None and changes nothing (use :meth:`send_data`). Frames
        already queued (a response's HEADERS) must go first, and go best in the same write as this one."""
        n = len(data)
        st = self._streams.get(stream_id)
        if (
            self._out
            or st is None
            or not 0 < n <= SMALL_FRAME
            or st.local_closed
            or n > st.send_window
            or n > self._conn_send_window
            or not (self.client or st.responded)
        ):
            return None
        st.send_window -= n
        self._conn_send_window -= n
        return _HDR.pack(0, n, DATA, 0, stream_id) + data

    def _sendable(self, stream_id: int) -> _Stream:
        """The stream, if we may send DATA on it: open on our side, and (server) answered, since a response starts
        with its HEADERS and a client refuses DATA before them."""
        st = self._streams.get(stream_id)
        if st is None or st.local_closed:
            raise StreamStateError(f"stream {stream_id} is not open for sending")
        if not (self.client or st.responded):
            raise StreamStateError(f"stream {stream_id} has not been answered")
        return st

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (empty DATA with END_STREAM; needs no window)."""
        st = self._sendable(stream_id)
        self._out.append(_HDR.pack(0, 0, DATA, FLAG_END_STREAM, stream_id))
        self._local_close(st)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """RST_STREAM; a no-op for streams already closed."""
        st = self._streams.get(stream_id)
        if st is None:
            return
        self._out.append(_frame(RST_STREAM, 0, stream_id, _U32.pack(error_code)))
        self._forget(st)

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        """The consumer is done with ``nbytes`` of the stream's received data: return that credit to the peer.

        Credit is batched (a quarter of the window) so a bulk transfer costs one WINDOW_UPDATE per ~1 MiB.
        """
        st = self._streams.get(stream_id)
        if st is None or st.remote_closed or nbytes <= 0:
            return
        st.unacked += nbytes
        if st.unacked >= self.settings.stream_window >> 2:
            inc = st.unacked
            st.unacked = 0
            st.recv_window += inc
            self._out.append(_frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(inc)))

    def ping(self, opaque: bytes) -> None:
        if len(opaque) != 8:
            raise ValueError("PING payload must be 8 bytes")
        self._out.append(_frame(PING, 0, 0, opaque))

    def goaway(self, error_code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Refuse new streams (graceful with NO_ERROR); streams already open continue. After a graceful GOAWAY,
        one with an error code is still sent (RFC 9113 6.8: "if circumstances change"), same last stream id."""
        if self.goaway_sent and (self._goaway_error or error_code == ErrorCode.NO_ERROR):
            return
        if not self.goaway_sent:
            self.goaway_sent = True
            self._goaway_last = self._last_remote_id  # never raised later (6.8: MUST NOT increase)
        self._goaway_error = error_code != ErrorCode.NO_ERROR
        payload = _GOAWAY.pack(self._goaway_last, error_code) + reason.encode()[:256]
        self._out.append(_frame(GOAWAY, 0, 0, payload))

    # ------------------------------------------------------------------------------------------ public: receive

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse ``data``; returns the events it completes. Never raises on peer input."""
        events: list[Event] = []
        if self._state == _ST_DEAD:
            return events
        mv = data if isinstance(data, memoryview) else memoryview(data)
        try:
            self._parse(mv, events)
            if self._window_shift:
                self._shift_send_windows()
        except _ConnError as e:
            self._connection_error(e.code, e.reason, events)
        except Exception as e:  # a bug here must cost one connection, not the agent
            self._connection_error(ErrorCode.INTERNAL_ERROR, f"internal error: {type(e).__name__}: {e}", events)
        return events

    # ------------------------------------------------------------------------------------------ parser

    def receive_single_data(self, mv: memoryview, pos: int = 0, end: int = -1) -> tuple[int, memoryview, bool] | None:
        """The latency path: if ``mv`` holds exactly one whole unpadded DATA frame for an open stream within its
        windows, consume it and return (stream id, payload view, END_STREAM); otherwise consume nothing and
        return None (use :meth:`receive_data`). With END_STREAM the stream is half-closed here, as
        ``receive_data`` would do before reporting StreamEnded.

        The parser uses it for each frame of a bigger read, from ``pos``, with ``end`` (the frame may then end
        before it): the common case kept to one call.
        """
        if end < 0:
            if self._state != _ST_HEADER or self._hbuf:
                return None
            end = len(mv)
            alone = True
        else:
            alone = False
        if end - pos < 9:
            return None
        hi, lo, ftype, flags, sid = _HDR.unpack_from(mv, pos)
        length = (hi << 16) | lo
        if alone:
            if end - pos - 9 != length:
                return None
        elif end - pos - 9 < length:
            return None
        if ftype != DATA or flags & FLAG_PADDED or length > self._max_frame:
            return None
        st = self._streams.get(sid)
        if st is None or st.remote_closed or length > st.recv_window or length > self._conn_recv_window:
            return None
        if self.client and not st.responded:
            return None  # DATA before the response: the full path refuses it
        if length:
            st.recv_window -= length
            self._conn_recv_window -= length
            self._credit_connection(st, length)
        fin = bool(flags & FLAG_END_STREAM)
        if fin:
            self._remote_close(st)
        return sid, mv[pos + 9 : pos + 9 + length], fin

    def _parse(self, mv: memoryview, events: list[Event]) -> None:
        pos = 0
        end = len(mv)
        hbuf = self._hbuf
        while pos < end:
            state = self._state
            if state == _ST_HEADER and not hbuf:
                whole = self.receive_single_data(mv, pos, end)
                if whole is not None:
                    sid, payload, fin = whole
                    if payload:
                        events.append(DataReceived(sid, payload))
                    if fin:
                        events.append(StreamEnded(sid))
                    pos += 9 + len(payload)
                    continue
            if state == _ST_DATA:
                left = self._data_left
                if left:
                    take = min(left, end - pos)
                    self._data_left = left - take
                    st = self._data_stream
                    if st is not None:
                        events.append(DataReceived(st.id, mv[pos : pos + take]))
                    pos += take
                    if self._data_left:
                        continue
                if self._pad_left:
                    take = min(self._pad_left, end - pos)
                    self._pad_left -= take
                    pos += take
                    if self._pad_left:
                        continue
                self._finish_data(events)
                continue
            if state in (_ST_HEADER, _ST_CONT):
                if hbuf:
                    take = min(9 - len(hbuf), end - pos)
                    hbuf += mv[pos : pos + take]
                    pos += take
                    if len(hbuf) < 9:
                        return
                    hi, lo, ftype, flags, sid = _HDR.unpack(hbuf)
                    hbuf.clear()
                elif end - pos >= 9:
                    hi, lo, ftype, flags, sid = _HDR.unpack_from(mv, pos)
                    pos += 9
                else:
                    hbuf += mv[pos:end]
                    return
                self._on_frame_header((hi << 16) | lo, ftype, flags, sid & MAX_STREAM_ID, events)
                continue
            if state == _ST_PAYLOAD:
                need = self._need
                if not hbuf and end - pos >= need:
                    payload = mv[pos : pos + need]
                    pos += need
                else:
                    take = min(need - len(hbuf), end - pos)
                    hbuf += mv[pos : pos + take]
                    pos += take
                    if len(hbuf) < need:
                        return
                    payload = memoryview(bytes(hbuf))
                    hbuf.clear()
                self._state = _ST_HEADER
                self._on_frame(payload, events)
                if self._state == _ST_DEAD:
                    return
                continue
            if state == _ST_PADLEN:
                pad = mv[pos]
                pos += 1
                self._start_data_payload(self._need - 1, pad, events)
                continue
            if state == _ST_PREFACE:
                take = min(len(PREFACE) - len(hbuf), end - pos)
                hbuf += mv[pos : pos + take]
                pos += take
                if not PREFACE.startswith(hbuf):
                    hbuf.clear()
                    raise _ConnError(ErrorCode.PROTOCOL_ERROR, "invalid connection preface")
                if len(hbuf) == len(PREFACE):
                    hbuf.clear()
                    self._state = _ST_HEADER
                continue
            return  # _ST_DEAD

    def _on_frame_header(self, length: int, ftype: int, flags: int, sid: int, events: list[Event]) -> None:
        if length > self.settings.max_frame_size:
            raise _ConnError(
                ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {self.settings.max_frame_size}"
            )
        if not self._seen_settings and ftype != SETTINGS:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "first frame is not SETTINGS")
        if self._block is not None and (ftype != CONTINUATION or sid != self._block.stream_id):
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "header block interrupted")
        self._ftype = ftype
        self._flags = flags
        self._fsid = sid
        if ftype == DATA:
            self._on_data_header(length, flags, sid, events)
            return
        self._need = length
        self._state = _ST_PAYLOAD
        if length == 0:
            self._state = _ST_HEADER
            self._on_frame(memoryview(b""), events)

    def _on_data_header(self, length: int, flags: int, sid: int, events: list[Event]) -> None:
        if sid == 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        if length > self._conn_recv_window:
            raise _ConnError(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self._conn_recv_window -= length
        st = self._streams.get(sid)
        self._data_stream = None
        if st is None:
            if self._is_idle(sid):
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            # Late frames for a stream we already closed or reset: drop silently.
            self._credit_connection(None, length)
        elif st.remote_closed:
            self._credit_connection(None, length)
            self._stream_error(st, ErrorCode.STREAM_CLOSED, "DATA after END_STREAM", events)
        elif length > st.recv_window:
            self._credit_connection(None, length)
            self._stream_error(st, ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the stream window", events)
        elif self.client and not st.responded:
            # A response starts with its HEADERS (RFC 9113 8.1); bytes before it would sit unread in memory.
            self._credit_connection(None, length)
            self._stream_error(st, ErrorCode.PROTOCOL_ERROR, "DATA before the response", events)
        else:
            # (Server: bytes that arrive before we answered the CONNECT are buffered by the caller, within the
            # stream window; their connection credit waits for the answer.)
            st.recv_window -= length
            self._credit_connection(st, length)
            self._data_stream = st
        self._data_end = bool(flags & FLAG_END_STREAM)
        if flags & FLAG_PADDED:
            if length < 1:
                raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "padded DATA without pad length")
            self._need = length
            self._state = _ST_PADLEN
            return
        self._start_data_payload(length, 0, events)

    def hold_connection_credit(self, hold: bool) -> None:
        """While held, connection credit for received DATA is kept back (and returned when released).

        Why: credit normally goes back at once, so that a stream whose reader stalls does not block the others.
        What such streams hold then grows with their number (a stream window each). The caller holds the credit
        while its consumers keep too much (tunnel.BUFFERS): the peer can then send at most what is left of the
        connection window, and the streams wait for the stalled ones, as they would with credit tied to reading
        (ztunnel, Envoy)."""
        if hold == self._conn_credit_held:
            return
        self._conn_credit_held = hold
        if not hold and self._conn_deferred:
            deferred, self._conn_deferred = self._conn_deferred, 0
            self._credit_connection(None, deferred)

    @property
    def connection_credit_held(self) -> bool:
        return self._conn_credit_held

    def _credit_connection(self, st: _Stream | None, length: int) -> None:
        """Connection credit for received DATA goes back at once (unless the caller holds it, see
        :meth:`hold_connection_credit`): per-stream buffering is bounded by the stream window, and holding it until
        the bytes are read would let one stalled stream block all the others.

        Except for a stream we have not answered yet (server): nothing reads it until the upstream is connected,
        so its bytes wait in memory. Their credit is held until the answer (or the stream's end), which bounds
        what a peer can park on unanswered streams by the connection window instead of streams x stream window
        (200 x 4 MiB)."""
        if st is not None and not st.responded and not self.client:
            st.held += length
            return
        if self._conn_credit_held:
            self._conn_deferred += length
            return
        self._conn_unacked += length
        if self._conn_unacked >= self.settings.connection_window >> 2:
            self._return_connection_credit()

    def _release_held(self, st: _Stream) -> None:
        held, st.held = st.held, 0
        if held:
            self._credit_connection(None, held)

    def _return_connection_credit(self) -> None:
        inc = self._conn_unacked
        self._conn_unacked = 0
        self._conn_recv_window += inc
        self._out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(inc)))

    def _start_data_payload(self, length: int, pad: int, events: list[Event]) -> None:
        if pad > length:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "DATA padding exceeds the payload")
        self._data_left = length - pad
        self._pad_left = pad
        st = self._data_stream
        if pad and st is not None:
            # Padding is never delivered, so its stream credit is returned right away.
            self.acknowledge(st.id, pad + 1)
        self._state = _ST_DATA
        if not length:
            self._finish_data(events)

    def _finish_data(self, events: list[Event]) -> None:
        self._state = _ST_HEADER
        st = self._data_stream
        self._data_stream = None
        if self._data_end and st is not None:
            events.append(StreamEnded(st.id))
            self._remote_close(st)

    def _on_frame(self, payload: memoryview, events: list[Event]) -> None:
        ftype = self._ftype
        if ftype == HEADERS:
            self._on_headers(payload, events)
        elif ftype == CONTINUATION:
            self._on_continuation(payload, events)
        elif ftype == SETTINGS:
            self._on_settings(payload, events)
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(payload, events)
        elif ftype == RST_STREAM:
            self._on_rst(payload, events)
        elif ftype == PING:
            self._on_ping(payload, events)
        elif ftype == GOAWAY:
            self._on_goaway(payload, events)
        elif ftype == PRIORITY:
            self._on_priority(payload, events)
        elif ftype == PUSH_PROMISE:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE is disabled")
        # Unknown frame types are ignored (RFC 9113 4.1).

    # -------------------------------------------------------------------- headers

    def _on_headers(self, payload: memoryview, events: list[Event]) -> None:
        sid = self._fsid
        flags = self._flags
        if sid == 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        start = 0
        stop = len(payload)
        if flags & FLAG_PADDED:
            if stop < 1:
                raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "padded HEADERS without pad length")
            pad = payload[0]
            start = 1
            stop -= pad
        block = _HeaderBlock(sid, bool(flags & FLAG_END_STREAM))
        if flags & FLAG_PRIORITY:
            if len(payload) < start + 5:
                # Too short for its mandatory fields: FRAME_SIZE_ERROR (RFC 9113 4.2), not a padding problem.
                raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
            block.self_dependent = _U32.unpack_from(payload, start)[0] & MAX_STREAM_ID == sid
            start += 5
        if start > stop:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "HEADERS padding/priority exceed the frame")
        self._block = block
        self._add_fragment(block, payload[start:stop])
        if flags & FLAG_END_HEADERS:
            self._block = None
            self._on_header_block(block, events)
        else:
            self._state = _ST_CONT

    def _on_continuation(self, payload: memoryview, events: list[Event]) -> None:
        block = self._block
        if block is None:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        block.frames += 1
        if block.frames > MAX_HEADER_FRAMES:
            raise _ConnError(ErrorCode.ENHANCE_YOUR_CALM, "header_too_large: too many CONTINUATION frames")
        self._add_fragment(block, payload)
        if self._flags & FLAG_END_HEADERS:
            self._block = None
            self._on_header_block(block, events)
        else:
            self._state = _ST_CONT

    def _add_fragment(self, block: _HeaderBlock, fragment: memoryview) -> None:
        """Encoded blocks are buffered up to the decoder's hard size: a bigger one would be refused after decoding
        anyway (an honest encoder's block is no longer than its header list), and decoding it would cost CPU in
        proportion. Up to there an oversized list is only a stream error."""
        block.size += len(fragment)
        hard = self._decoder.hard_header_list_size
        if block.size > hard:
            raise _ConnError(
                ErrorCode.ENHANCE_YOUR_CALM, f"header_too_large: header block of {block.size}+ bytes exceeds {hard}"
            )
        block.fragments.append(bytes(fragment))

    def _on_header_block(self, block: _HeaderBlock, events: list[Event]) -> None:
        # Decode first, always: the HPACK table must stay in sync even for streams we refuse.
        oversize = ""
        try:
            headers = self._decoder.decode(b"".join(block.fragments))
        except HeaderListTooLarge as e:
            headers = []
            oversize = f"header_too_large: {'response' if self.client else 'request'} {e}"
        except OversizedHeaderListError as e:
            raise _ConnError(ErrorCode.COMPRESSION_ERROR, f"header_too_large: {e}") from None
        except HPACKError as e:
            raise _ConnError(ErrorCode.COMPRESSION_ERROR, f"bad header block: {e}") from None
        sid = block.stream_id
        if block.self_dependent:
            self._refuse_self_dependent(sid, events)
        elif self.client:
            self._on_response_headers(sid, headers, oversize, block.end_stream, events)
        else:
            self._on_request_headers(sid, headers, oversize, block.end_stream, events)

    def _on_trailers(
        self, st: _Stream, headers: list[tuple[str, str]], oversize: str, end_stream: bool, events: list[Event]
    ) -> None:
        """A header block after the stream's first. HBONE sends none, but a trailer-only END_STREAM is a
        harmless half-close; anything else is a stream error: STREAM_CLOSED after the peer's END_STREAM (RFC 9113
        5.1, half-closed (remote)), PROTOCOL_ERROR otherwise (8.1: a second HEADERS without END_STREAM)."""
        if st.remote_closed:
            self._stream_error(st, ErrorCode.STREAM_CLOSED, "HEADERS after END_STREAM", events)
            return
        problem = oversize or _check_fields(headers, _TRAILER_PSEUDO, "trailer")[2]
        if problem or not end_stream:
            self._stream_error(st, ErrorCode.PROTOCOL_ERROR, problem or "unexpected HEADERS on an open stream", events)
            return
        events.append(StreamEnded(st.id))
        self._remote_close(st)

    def _on_request_headers(
        self, sid: int, headers: list[tuple[str, str]], oversize: str, end_stream: bool, events: list[Event]
    ) -> None:
        st = self._streams.get(sid)
        if st is not None:
            self._on_trailers(st, headers, oversize, end_stream, events)
            return
        if sid % 2 == 1 and sid <= self._last_remote_id and end_stream:
            # A trailer block on a stream already closed, typically one we reset while the peer was finishing it:
            # frames sent before our RST_STREAM arrived are ignored (RFC 9113 5.1); the block was decoded above.
            return
        if sid % 2 == 0 or sid <= self._last_remote_id:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"invalid new stream id {sid}")
        self._last_remote_id = sid
        if self.goaway_sent:
            self.replies += 1
            self._out.append(_frame(RST_STREAM, 0, sid, _U32.pack(ErrorCode.REFUSED_STREAM)))
            events.append(RequestRejected(sid, 0, "refused_stream"))
            return
        if self._remote_streams >= self.settings.max_concurrent_streams:
            self.replies += 1
            self._out.append(_frame(RST_STREAM, 0, sid, _U32.pack(ErrorCode.REFUSED_STREAM)))
            events.append(RequestRejected(sid, 0, "refused_stream"))
            return
        # (created with the pending window shift taken off: _shift_send_windows adds it to every stream)
        st = _Stream(sid, self.peer_initial_window - self._window_shift, self.settings.stream_window)
        self._streams[sid] = st
        self._remote_streams += 1
        if end_stream:
            st.remote_closed = True
        if oversize:
            # What h2 does for ztunnel: the request is answered on its stream, the connection carries on.
            self._reject(st, 431, oversize, "", events)
            return
        pseudo, regular, problem = _check_fields(headers, _REQUEST_PSEUDO, "CONNECT")
        method = pseudo.get(":method")
        authority = pseudo.get(":authority")
        if method is not None and method != "CONNECT":
            self._reject(st, 400, "bad_request", f"method {_shown(method)} is not CONNECT", events)
        elif problem or method is None or not authority:
            # Malformed (RFC 9113 8.1.1, 8.3.1): a stream error of type PROTOCOL_ERROR, answered 400 first (a
            # server MAY, 8.1.1), as h2 answers 431 and then resets with PROTOCOL_ERROR.
            problem = problem or "missing :method or :authority"
            self._reject(st, 400, "bad_request", problem, events, ErrorCode.PROTOCOL_ERROR)
        elif end_stream:
            self._reject(st, 400, "bad_request", "CONNECT with END_STREAM", events)
        else:
            events.append(RequestReceived(sid, authority, regular))

    def _refuse_self_dependent(self, sid: int, events: list[Event]) -> None:
        """HEADERS whose priority fields make the stream depend on itself: a stream error of type PROTOCOL_ERROR
        (RFC 7540 5.3.1; h2 resets such a stream the same way, codec/framed_read.rs). Its block was decoded."""
        st = self._streams.get(sid)
        if st is not None:
            kind = "malformed_response" if self.client else "bad_request"
            self._stream_error(st, ErrorCode.PROTOCOL_ERROR, f"{kind}: HEADERS depends on itself", events)
            return
        if self.client or sid % 2 == 0 or sid <= self._last_remote_id:
            if sid % 2 == 0 or self._is_idle(sid):
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"HEADERS on invalid stream {sid}")
            return  # a stream already closed: its frames are discarded (RFC 9113 5.1)
        self._last_remote_id = sid  # the id is used (5.1.1), the stream never opens
        self._count_local_reset()
        self.replies += 1
        self._out.append(_frame(RST_STREAM, 0, sid, _U32.pack(ErrorCode.PROTOCOL_ERROR)))
        events.append(RequestRejected(sid, 0, "bad_request: HEADERS depends on itself"))

    def _count_local_reset(self) -> None:
        """One more stream ended by the core because of what the peer sent; past MAX_LOCAL_ERROR_RESETS on one
        connection the peer is resetting streams through us on purpose, and the connection goes (as with h2)."""
        if self._local_resets >= MAX_LOCAL_ERROR_RESETS:
            raise _ConnError(ErrorCode.ENHANCE_YOUR_CALM, "too_many_internal_resets")
        self._local_resets += 1

    def _reject(
        self,
        st: _Stream,
        status: int,
        reason: str,
        detail: str,
        events: list[Event],
        stop_code: ErrorCode = ErrorCode.NO_ERROR,
    ) -> None:
        self._count_local_reset()
        self.replies += 1
        self._respond(st.id, status, None, stop_code)
        events.append(RequestRejected(st.id, status, f"{reason}: {detail}" if detail else reason))

    def _on_response_headers(
        self, sid: int, headers: list[tuple[str, str]], oversize: str, end_stream: bool, events: list[Event]
    ) -> None:
        st = self._streams.get(sid)
        if st is None:
            if sid % 2 == 0 or self._is_idle(sid):
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"HEADERS on stream {sid} we never opened")
            return  # response to a stream we already reset
        if st.responded:
            self._on_trailers(st, headers, oversize, end_stream, events)
            return
        if oversize:
            # h2 (ztunnel's client) resets such a stream too: a response we cannot hold is as good as none.
            self._stream_error(st, ErrorCode.PROTOCOL_ERROR, oversize, events)
            return
        pseudo, regular, problem = _check_fields(headers, _RESPONSE_PSEUDO, "response")
        status = pseudo.get(":status")
        problem = problem or _status_problem(status, end_stream)
        if problem or status is None:
            # Reported to the opener as a failed CONNECT (StreamReset before any response), the pooled
            # connection and its other streams carry on.
            self._stream_error(st, ErrorCode.PROTOCOL_ERROR, f"malformed_response: {problem}", events)
            return
        code = int(status)
        if code < 200:
            return  # an informational response: the final one follows
        st.responded = True
        events.append(ResponseReceived(sid, code, regular))
        if end_stream:
            events.append(StreamEnded(sid))
            self._remote_close(st)

    # -------------------------------------------------------------------- control frames

    def _on_settings(self, payload: memoryview, events: list[Event]) -> None:
        if self._fsid != 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if self._flags & FLAG_ACK:
            if len(payload):
                raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if not self._seen_settings:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "first frame is not SETTINGS")
            return
        if len(payload) % 6:
            raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        if len(payload) > 6 * MAX_SETTINGS_ENTRIES:
            raise _ConnError(ErrorCode.ENHANCE_YOUR_CALM, f"SETTINGS with {len(payload) // 6} entries")
        self._seen_settings = True
        initial_window = -1
        for key, value in _SETTING.iter_unpack(payload):
            if key == S_HEADER_TABLE_SIZE:
                self._encoder.set_table_size(min(value, 4096))
            elif key == S_ENABLE_PUSH:
                if value > 1 or (value and self.client):  # a server may not enable push (RFC 9113 6.5.2)
                    raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"ENABLE_PUSH {value} not allowed")
            elif key == S_MAX_CONCURRENT_STREAMS:
                self.peer_max_concurrent_streams = value
            elif key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnError(ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE above 2^31-1")
                initial_window = value  # applied once, below
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= 2**24 - 1:
                    raise _ConnError(ErrorCode.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_max_frame_size = value
            # MAX_HEADER_LIST_SIZE is advisory and our CONNECT blocks are tiny; unknown settings are ignored.
        if initial_window >= 0:
            self._apply_initial_window(initial_window, events)
        self.replies += 1
        self._out.append(_frame(SETTINGS, FLAG_ACK, 0, b""))
        events.append(SettingsChanged())

    def _apply_initial_window(self, value: int, events: list[Event]) -> None:
        """A new SETTINGS_INITIAL_WINDOW_SIZE moves every open stream's send window by the difference (RFC 9113
        6.9.2), possibly below zero. Once per frame with the frame's last value, as h2 does (its Settings keep the
        last value of each), and only recorded here: the streams are moved once per receive_data call, by
        :meth:`_shift_send_windows`. Walking 200 streams for each of a flood of 15-byte SETTINGS frames cost ~5 s
        of the loop per MiB, measured, against ~0.8 s for as many PINGs. Nothing reads a send window between
        (WINDOW_UPDATE adds the pending shift to its overflow check; streams opened meanwhile start without it)."""
        delta = value - self.peer_initial_window
        if not delta:
            return
        self.peer_initial_window = value
        self._window_shift += delta
        if delta > 0:
            events.append(WindowOpened(0))

    def _shift_send_windows(self) -> None:
        """Apply the pending INITIAL_WINDOW_SIZE change to every open stream. A window it takes above 2^31-1 is a
        connection error (6.9.2), judged on the read's net change: a peer raising and lowering it again within
        one read is not caught in between."""
        shift, self._window_shift = self._window_shift, 0
        overflow = False
        for st in self._streams.values():
            st.send_window += shift
            if st.send_window > MAX_WINDOW:
                overflow = True
        if overflow:
            raise _ConnError(ErrorCode.FLOW_CONTROL_ERROR, "stream window overflow")

    def _on_window_update(self, payload: memoryview, events: list[Event]) -> None:
        if len(payload) != 4:
            raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes")
        inc = _U32.unpack(payload)[0] & MAX_WINDOW
        sid = self._fsid
        if sid == 0:
            if inc == 0:
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, "connection WINDOW_UPDATE of 0")
            self._conn_send_window += inc
            if self._conn_send_window > MAX_WINDOW:
                raise _ConnError(ErrorCode.FLOW_CONTROL_ERROR, "connection window overflow")
            events.append(WindowOpened(0))
            return
        st = self._streams.get(sid)
        if st is None:
            if self._is_idle(sid):
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return
        if inc == 0:
            self._stream_error(st, ErrorCode.PROTOCOL_ERROR, "stream WINDOW_UPDATE of 0", events)
            return
        st.send_window += inc
        if st.send_window + self._window_shift > MAX_WINDOW:
            self._stream_error(st, ErrorCode.FLOW_CONTROL_ERROR, "stream window overflow", events)
            return
        events.append(WindowOpened(sid))

    def _on_rst(self, payload: memoryview, events: list[Event]) -> None:
        if len(payload) != 4:
            raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM must be 4 bytes")
        sid = self._fsid
        if sid == 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        st = self._streams.get(sid)
        if st is None:
            if self._is_idle(sid):
                raise _ConnError(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            return
        code = _U32.unpack(payload)[0]
        self._forget(st)
        events.append(StreamReset(sid, code, remote=True, reason=f"peer reset: {error_name(code)}"))

    def _on_priority(self, payload: memoryview, events: list[Event]) -> None:
        """PRIORITY is deprecated (RFC 9113 5.3.2) and ignored, but still checked: stream 0 is a connection error,
        a length other than 5 a stream error of type FRAME_SIZE_ERROR (6.3), a stream depending on itself one of
        type PROTOCOL_ERROR (RFC 7540 5.3.1; h2 answers both on the stream too)."""
        sid = self._fsid
        if sid == 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            code, reason = ErrorCode.FRAME_SIZE_ERROR, "PRIORITY frame must be 5 bytes"
        elif _U32.unpack_from(payload, 0)[0] & MAX_STREAM_ID == sid:
            code, reason = ErrorCode.PROTOCOL_ERROR, "PRIORITY depends on itself"
        else:
            return
        st = self._streams.get(sid)
        if st is not None:
            self._stream_error(st, code, reason, events)
        elif self._is_idle(sid):
            # No RST_STREAM may be sent on an idle stream (6.4): the stream error becomes the connection's.
            raise _ConnError(code, reason)
        # else a closed stream: its frames are discarded (5.1)

    def _on_ping(self, payload: memoryview, events: list[Event]) -> None:
        if self._fsid != 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "PING must be 8 bytes")
        if self._flags & FLAG_ACK:
            events.append(PingAcked(bytes(payload)))
        else:
            self.replies += 1
            self._out.append(_frame(PING, FLAG_ACK, 0, bytes(payload)))

    def _on_goaway(self, payload: memoryview, events: list[Event]) -> None:
        if self._fsid != 0:
            raise _ConnError(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise _ConnError(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        last, code = _GOAWAY.unpack_from(payload, 0)
        last &= MAX_STREAM_ID
        debug = bytes(payload[8 : 8 + MAX_REASON_TEXT]).decode("utf-8", "replace")
        self.goaway_received = True
        events.append(ConnectionTerminated(code, last, remote=True, reason=debug))
        # Streams we opened above ``last`` were never processed by the peer: they may be retried elsewhere.
        mine = 1 if self.client else 0
        for sid in [s for s in self._streams if s > last and s % 2 == mine]:
            self._forget(self._streams[sid])
            events.append(StreamReset(sid, ErrorCode.REFUSED_STREAM, remote=True, reason="GOAWAY before processing"))

    # -------------------------------------------------------------------- stream bookkeeping

    def _is_idle(self, sid: int) -> bool:
        if (sid % 2 == 1) == self.client:
            return sid >= self._next_stream_id
        return sid > self._last_remote_id

    def _stream_error(self, st: _Stream, code: ErrorCode, reason: str, events: list[Event]) -> None:
        self._count_local_reset()
        self.replies += 1
        self._out.append(_frame(RST_STREAM, 0, st.id, _U32.pack(code)))
        self._forget(st)
        events.append(StreamReset(st.id, code, remote=False, reason=reason))

    def _connection_error(self, code: ErrorCode, reason: str, events: list[Event]) -> None:
        self._state = _ST_DEAD
        self._hbuf.clear()
        self._block = None
        self.closed = True
        # Also after a graceful GOAWAY (a draining server): the peer must learn the error (RFC 9113 5.4.1, 6.8),
        # not see a NO_ERROR shutdown and a closed socket.
        self.goaway(code, reason)
        events.append(ConnectionTerminated(code, self._goaway_last, remote=False, reason=reason))

    def _local_close(self, st: _Stream) -> None:
        st.local_closed = True
        if st.remote_closed:
            self._forget(st)

    def _remote_close(self, st: _Stream) -> None:
        st.remote_closed = True
        if st.local_closed:
            self._forget(st)

    def _forget(self, st: _Stream) -> None:
        if self._streams.pop(st.id, None) is None:
            return
        self._release_held(st)
        if (st.id % 2 == 1) == self.client:
            self._local_streams -= 1
        else:
            self._remote_streams -= 1
        if self._data_stream is st:
            self._data_stream = None

    def _send_headers(self, sid: int, headers: list[Header], end_stream: bool) -> None:
        # Plain (non-Huffman) literals: pure-Python Huffman coding costs more CPU than the few bytes it saves.
        block = self._encoder.encode(headers)
        fsize = self.peer_max_frame_size
        first = block[:fsize]
        flags = (FLAG_END_STREAM if end_stream else 0) | (FLAG_END_HEADERS if len(block) <= fsize else 0)
        parts = [_frame(HEADERS, flags, sid, first)]
        pos = fsize
        while pos < len(block):
            chunk = block[pos : pos + fsize]
            pos += fsize
            parts.append(_frame(CONTINUATION, FLAG_END_HEADERS if pos >= len(block) else 0, sid, chunk))
        self._out.append(b"".join(parts))


def _check_fields(
    headers: list[tuple[str, str]], allowed_pseudo: frozenset[str], kind: str
) -> tuple[dict[str, str], list[tuple[str, str]], str]:
    """RFC 9113 8.2 and 8.3 for one decoded header list: (its pseudo-headers by name, its regular fields, the
    first problem or ""). Pseudo-headers come first, each at most once and only those ``allowed_pseudo`` names;
    names are lowercase tokens, values without NUL/CR/LF or edge whitespace, no connection-specific fields."""
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for name, value in headers:
        # NUL, CR, LF, or whitespace at either end (RFC 9113 8.2.1). Not one regex: with the end anchors it was
        # tried at every position, ~5 us for a 120-byte baggage value against ~0.2 us for these scans.
        if "\x00" in value or "\r" in value or "\n" in value or value != value.strip(" \t"):
            return pseudo, regular, f"invalid value of {_shown(name)}"
        if name.startswith(":"):
            if regular:
                return pseudo, regular, "pseudo-header after regular header"
            if name not in allowed_pseudo:
                return pseudo, regular, f"pseudo-header {_shown(name)} not allowed in a {kind}"
            if name in pseudo:
                return pseudo, regular, f"duplicate {_shown(name)}"
            pseudo[name] = value
        elif _FIELD_NAME.fullmatch(name) is None:
            return pseudo, regular, f"invalid header name {_shown(name)!r}"
        elif name in _CONNECTION_HEADERS or (name == "te" and value != "trailers"):
            return pseudo, regular, f"connection-specific header {name}"
        else:
            regular.append((name, value))
    return pseudo, regular, ""


def _shown(text: str) -> str:
    """A peer's name or value as it goes into a reason (logged for each refused stream): a 64 KiB header name
    must not make a 64 KiB log line."""
    return text if len(text) <= MAX_REASON_TEXT else text[:MAX_REASON_TEXT] + "..."


def _status_problem(status: str | None, end_stream: bool) -> str:
    if status is None:
        return "no :status"
    if _STATUS.fullmatch(status) is None:
        return f"invalid :status {_shown(status)!r}"
    if status == "101":
        return ":status 101 is not allowed in HTTP/2"  # RFC 9113 8.6
    if status[0] == "1" and end_stream:
        return "informational response with END_STREAM"
    return ""


def _coalesce(parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """``parts`` with each run of consecutive parts of up to COALESCE_LIMIT bytes joined into one ``bytes``."""
    out: list[bytes | memoryview] = []
    run: list[bytes | memoryview] = []
    for part in parts:
        if len(part) <= COALESCE_LIMIT:
            run.append(part)
            continue
        if run:
            out.append(run[0] if len(run) == 1 else b"".join(run))
            run = []
        out.append(part)
    if run:
        out.append(run[0] if len(run) == 1 else b"".join(run))
    return out


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    n = len(payload)
    return _HDR.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload
