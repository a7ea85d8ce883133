"""The agent's one connection to the controller: gRPC over HTTP/2 (h2) on asyncio TLS, shared by xDS and the CA.

Why not grpcio in the agent: it cost ~18 MB of the agent's 60 MB budget (a 17 MB shared library, six threads with
their own heaps) for one bidirectional stream and one unary method. gRPC on the wire is small: a POST stream whose
DATA carries length-prefixed messages and whose trailers carry ``grpc-status``/``grpc-message``. This module speaks
exactly that, keeping the grpcio behaviours the agent relied on: TLS verified against the controller's roots under a
fixed server name (``ambit-controller``, as ``grpc.ssl_target_name_override``), plaintext only when no root is
configured (the lab's 15010), keepalive PINGs (30 s, 10 s timeout), a deadline per unary call (``grpc-timeout``),
the 200 MiB receive limit, and failures as :class:`RpcError` with gRPC status codes and details.

The trust bundle is the ``--root-cert`` file, re-read for every new connection (rotation on disk), plus the roots
the CA reported (:meth:`ControllerChannel.update_roots`), so the channel keeps verifying across a root rotation.
A retired connection (new trust, or a caller that saw it fail) takes no new calls and closes when its last stream
ends, so an xDS stream is not cut because a CA call wants fresh trust.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from google.protobuf.message import DecodeError, Message

from agent.sockets import connect_upstream
from common.log import kv

log = logging.getLogger("ambit.agent.controller_channel")

DEFAULT_SERVER_NAME = "ambit-controller"  # every controller serving certificate carries it
MAX_MESSAGE = 200 * 1024 * 1024  # ztunnel's limit: the full state in one response
WINDOW = 16 * 1024 * 1024  # receive window (stream and connection): a full-state response flows without stalls
READ_SIZE = 256 * 1024

M = TypeVar("M", bound=Message)


class StatusCode(enum.IntEnum):
    """gRPC status codes (grpc/doc/statuscodes.md); names match grpc.StatusCode's."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# gRPC's mapping of HTTP statuses for responses that carry no grpc-status (doc/http-grpc-status-mapping.md).
_HTTP_TO_GRPC = {400: StatusCode.INTERNAL, 401: StatusCode.UNAUTHENTICATED, 403: StatusCode.PERMISSION_DENIED,
                 404: StatusCode.UNIMPLEMENTED, 429: StatusCode.UNAVAILABLE, 502: StatusCode.UNAVAILABLE,
                 503: StatusCode.UNAVAILABLE, 504: StatusCode.UNAVAILABLE}  # fmt: skip
_RESET_TO_GRPC = {h2.errors.ErrorCodes.CANCEL: StatusCode.CANCELLED,
                  h2.errors.ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE,
                  h2.errors.ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
                  h2.errors.ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED}  # fmt: skip


class RpcError(Exception):
    """A call ended with a status other than OK; ``code()``/``details()`` as on grpc's AioRpcError."""

    def __init__(self, code: StatusCode, details: str, *, unusable_response: bool = False) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details
        self.unusable_response = unusable_response
        """The agent ended the call on a response it could not take (undecodable, too large, compressed, cut
        short): a new call would most likely be sent the same bytes, so it is no sign of a healthy controller."""

    def code(self) -> StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Call(Generic[M]):
    """One gRPC call: ``await send(msg)`` requests, ``async for`` (or ``await read()``) responses; the end of the
    iteration is status OK, any other status raises :class:`RpcError`. ``cancel()`` resets the stream."""

    def __init__(self, conn: _Connection, stream_id: int, response_type: type[M]) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._type = response_type
        self._inbox: asyncio.Queue[bytes | RpcError | None] = asyncio.Queue()
        self._buf = bytearray()
        self._headers: dict[str, str] = {}
        self._trailers: dict[str, str] = {}
        self.done = False

    async def send(self, msg: Message, *, end: bool = False) -> None:
        if self.done:
            raise RpcError(StatusCode.CANCELLED, "the call has ended")
        body = msg.SerializeToString()
        await self._conn.send_data(self.stream_id, b"\x00" + len(body).to_bytes(4, "big") + body, end)

    async def read(self) -> M | None:
        """The next response message, or None when the call ended with status OK."""
        item = await self._inbox.get()
        if isinstance(item, RpcError):
            self._inbox.put_nowait(item)  # every later read sees the same status
            raise item
        if item is None:
            self._inbox.put_nowait(None)
            return None
        try:
            return self._type.FromString(item)
        except DecodeError as e:
            self.cancel()
            raise RpcError(
                StatusCode.INTERNAL, f"cannot decode {self._type.__name__}: {e}", unusable_response=True
            ) from None

    def __aiter__(self) -> Call[M]:
        return self

    async def __anext__(self) -> M:
        msg = await self.read()
        if msg is None:
            raise StopAsyncIteration
        return msg

    def cancel(self) -> None:
        if not self.done:
            self._conn.reset_stream(self.stream_id)
            self.finish(RpcError(StatusCode.CANCELLED, "cancelled by the agent"))

    # --- fed by the connection ------------------------------------------------------------------------------------

    def on_headers(self, headers: list[tuple[str, str]]) -> None:
        (self._headers if not self._headers else self._trailers).update(headers)

    def on_data(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= 5 and not self.done:
            length = int.from_bytes(buf[1:5], "big")
            if buf[0] != 0:
                self._fail_stream(StatusCode.INTERNAL, "compressed message, but no compression was offered")
            elif length > MAX_MESSAGE:
                self._fail_stream(StatusCode.RESOURCE_EXHAUSTED, f"message of {length} bytes exceeds {MAX_MESSAGE}")
            elif len(buf) < 5 + length:
                return
            else:
                self._inbox.put_nowait(bytes(buf[5 : 5 + length]))
                del buf[: 5 + length]

    def on_end(self) -> None:
        """The server ended the stream: the status is in the trailers (or a trailers-only response)."""
        fields = self._trailers or self._headers
        raw = fields.get("grpc-status")
        if raw is None:
            http = self._headers.get(":status", "")
            code = StatusCode.INTERNAL if http == "200" else StatusCode.UNKNOWN
            if http.isdigit():
                code = _HTTP_TO_GRPC.get(int(http), code)
            self.finish(RpcError(code, f"no grpc-status in the response (HTTP status {http or 'missing'})"))
        elif raw != "0":
            try:
                code = StatusCode(int(raw))
            except ValueError:
                code = StatusCode.UNKNOWN
            self.finish(RpcError(code, unquote(fields.get("grpc-message", ""))))
        elif self._buf:
            self.finish(RpcError(StatusCode.INTERNAL, "stream ended inside a message", unusable_response=True))
        else:
            self.finish(None)

    def finish(self, status: RpcError | None) -> None:
        if not self.done:
            self.done = True
            self._inbox.put_nowait(status)
            self._conn.forget(self.stream_id)

    def _fail_stream(self, code: StatusCode, details: str) -> None:
        self._conn.reset_stream(self.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        self.finish(RpcError(code, details, unusable_response=True))


class _Connection:
    """One HTTP/2 connection: a reader task feeding the h2 state machine, a keepalive task, the open calls."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        authority: str,
        scheme: str,
        keepalive: float,
        keepalive_timeout: float,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.authority, self.scheme = authority, scheme
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(WINDOW - 65535)
        self.calls: dict[int, Call[Message]] = {}
        self.closed: str | None = None
        self.retired = False
        self._window = asyncio.Event()
        self._ping_acked = asyncio.Event()
        self._keepalive, self._keepalive_timeout = keepalive, keepalive_timeout
        self._flush()
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._keepalive_loop())]

    @property
    def usable(self) -> bool:
        return self.closed is None and not self.retired

    def start_call(self, method: str, metadata: Sequence[tuple[str, str]], response_type: type[M]) -> Call[M]:
        if self.closed is not None:
            raise RpcError(StatusCode.UNAVAILABLE, self.closed)
        sid = self.h2.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", self.scheme),
            (":path", method),
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", "ambit-agent"),
            *metadata,
        ]
        try:
            self.h2.send_headers(sid, headers)
        except h2.exceptions.ProtocolError as e:  # e.g. the server's GOAWAY was processed a moment ago
            raise RpcError(StatusCode.UNAVAILABLE, f"cannot start a call: {e}") from None
        call = Call(self, sid, response_type)
        self.calls[sid] = call  # type: ignore[assignment]
        self._flush()
        return call

    async def send_data(self, sid: int, data: bytes, end: bool) -> None:
        view = memoryview(data)
        while True:
            if self.closed is not None:
                raise RpcError(StatusCode.UNAVAILABLE, self.closed)
            if sid not in self.calls:
                raise RpcError(StatusCode.CANCELLED, "the call has ended")
            try:
                n = min(len(view), self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
                if n > 0 or not view:
                    self.h2.send_data(sid, view[:n].tobytes(), end_stream=end and n == len(view))
            except h2.exceptions.ProtocolError as e:  # the server closed or reset the stream meanwhile
                raise RpcError(StatusCode.CANCELLED, f"cannot send on the call: {e}") from None
            if n > 0 or not view:
                view = view[n:]
                self._flush()
                try:
                    await self.writer.drain()
                except OSError as e:
                    self.close(f"connection to the controller failed: {e}")
                    raise RpcError(StatusCode.UNAVAILABLE, self.closed or str(e)) from None
                if not view:
                    return
            else:
                self._window.clear()
                await self._window.wait()

    def reset_stream(self, sid: int, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        if self.closed is None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(sid, code)
                self._flush()

    def forget(self, sid: int) -> None:
        self.calls.pop(sid, None)
        self._window.set()  # a sender waiting for credit on this stream must notice that it ended
        if self.retired and not self.calls:
            self.close("retired")

    def close(self, reason: str) -> None:
        if self.closed is not None:
            return
        self.closed = reason
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        for call in list(self.calls.values()):
            call.finish(RpcError(StatusCode.UNAVAILABLE, reason))
        self._window.set()
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.close_connection()
            self._flush()
        self.writer.close()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _read_loop(self) -> None:
        reason = "connection to the controller closed"
        try:
            while True:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
                for event in self.h2.receive_data(data):
                    self._on_event(event)
                self._flush()
                if self.closed is not None:
                    return  # closed by an event (GOAWAY)
        except (OSError, ssl.SSLError) as e:
            reason = f"connection to the controller failed: {e}"
        except UnicodeDecodeError as e:  # h2 decodes header values as UTF-8
            reason = f"HTTP/2 protocol error from the controller: a header value is not UTF-8 text ({e.reason})"
        except h2.exceptions.ProtocolError as e:
            reason = f"HTTP/2 protocol error from the controller: {e}"
            if self.h2.state_machine.state is h2.connection.ConnectionState.CLOSED:
                # A GOAWAY arrived with more frames behind it (gRPC servers send a PING after it): h2 raised on
                # those before it could report the GOAWAY, and accepts nothing more on this connection.
                reason = "received prior goaway: the controller is going away"
        self.close(reason)

    def _on_event(self, event: h2.events.Event) -> None:
        call = self.calls.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.DataReceived):
            # Credit back at once: per-call buffering is bounded by MAX_MESSAGE, and the connection window is shared
            # with the other calls, which must not stall behind one slow reader.
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if call is not None:
                call.on_data(event.data)
        elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            if call is not None:
                call.on_headers(event.headers)  # type: ignore[arg-type]
        elif isinstance(event, h2.events.StreamEnded):
            if call is not None:
                call.on_end()
        elif isinstance(event, h2.events.StreamReset):
            if call is not None:
                code = _RESET_TO_GRPC.get(event.error_code, StatusCode.INTERNAL)  # type: ignore[call-overload]
                call.finish(RpcError(code, f"stream reset by the controller ({event.error_code!r})"))
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._window.set()
        elif isinstance(event, h2.events.PingAckReceived):
            self._ping_acked.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # GOAWAY. h2 takes no frame after it (DATA, trailers and PINGs all raise), so no call can finish here,
            # not even those the server saw: end them all now, in gRPC's words (which the xDS backoff understands).
            # Waiting instead hung them until the peer closed the socket (an Envoy in front drains for minutes),
            # the keepalive task having died on its first PING.
            self.retired = True
            self.close(f"received prior goaway: code: {event.error_code!r}")

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self._keepalive)
            self._ping_acked.clear()
            self.h2.ping(os.urandom(8))
            self._flush()
            try:
                await asyncio.wait_for(self._ping_acked.wait(), self._keepalive_timeout)
            except TimeoutError:
                self.close(f"keepalive ping not answered within {self._keepalive_timeout:.0f} s")
                return


class ControllerChannel:
    """Calls to ``address``: TLS when ``root_cert_file`` is set (verified as ``server_name``), else plaintext."""

    def __init__(
        self,
        address: str,
        *,
        root_cert_file: Path | str | None = None,
        server_name: str = DEFAULT_SERVER_NAME,
        keepalive: float = 30.0,
        keepalive_timeout: float = 10.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.address = address
        self.root_cert_file = Path(root_cert_file) if root_cert_file else None
        self.server_name = server_name
        self.keepalive, self.keepalive_timeout = keepalive, keepalive_timeout
        self.connect_timeout = connect_timeout
        self._learned_roots: tuple[str, ...] = ()
        self._conn: _Connection | None = None
        self._connecting = asyncio.Lock()

    def trust_pem(self) -> str:
        """The root file (re-read now) followed by the learned bundle; OSError only when there is no root at all."""
        pems = list(self._learned_roots)
        if self.root_cert_file is not None:
            try:
                pems.insert(0, self.root_cert_file.read_text())
            except OSError as e:
                if not pems:
                    raise
                log.warning("root certificate file unreadable; using the learned bundle", extra=kv(error=str(e)))
        return "".join(p if p.endswith("\n") else p + "\n" for p in pems)

    def update_roots(self, roots_pem: Sequence[str]) -> None:
        """Trust what the CA says the bundle is, from the next connection on.

        The current connection is retired only when a learned root is dropped (a rotation retiring the root it may
        have been verified with). A bundle that only adds trust (the first one, a rotation's new root beside the
        old) leaves it: retiring it there moved every later CA call to a second connection for good, while the xDS
        stream stayed on the first."""
        roots = tuple(roots_pem)
        if roots == self._learned_roots:
            return
        dropped = set(self._learned_roots) - set(roots)
        self._learned_roots = roots
        if dropped and self.root_cert_file is not None:
            self.retire()

    def retire(self) -> None:
        """New calls get a new connection (fresh trust); calls on the current one finish there."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.retired = True
            if not conn.calls:
                conn.close("retired")

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close("channel closed")

    def stream(self, method: str, response_type: type[M], metadata: Sequence[tuple[str, str]] = ()) -> _Pending[M]:
        """A call whose requests and responses are both streams (``async with`` it to cancel on exit)."""
        return _Pending(self, method, response_type, metadata)

    async def unary(
        self,
        method: str,
        request: Message,
        response_type: type[M],
        metadata: Sequence[tuple[str, str]],
        deadline: float,
    ) -> M:
        """One request, one response, within ``deadline`` seconds (also sent as ``grpc-timeout``)."""
        call: Call[M] | None = None
        try:
            async with asyncio.timeout(deadline):
                conn = await self._connection()
                call = conn.start_call(method, [*metadata, ("grpc-timeout", f"{max(1, int(deadline * 1000))}m")],
                                       response_type)  # fmt: skip
                await call.send(request, end=True)
                response = await call.read()
                if response is None:
                    raise RpcError(StatusCode.INTERNAL, "the controller returned no message")
                if await call.read() is not None:
                    raise RpcError(StatusCode.INTERNAL, "the controller returned more than one message")
                return response
        except TimeoutError:
            if call is not None:
                call.cancel()
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except asyncio.CancelledError:
            if call is not None:
                call.cancel()
            raise

    async def _connection(self) -> _Connection:
        async with self._connecting:
            if self._conn is not None and self._conn.usable:
                return self._conn
            self._conn = None
            host, _, port = self.address.rpartition(":")
            host = host.strip("[]")
            ctx: ssl.SSLContext | None = None
            if self.root_cert_file is not None:
                ctx = ssl.create_default_context(cadata=self.trust_pem())
                ctx.set_alpn_protocols(["h2"])
            try:
                async with asyncio.timeout(self.connect_timeout):
                    sock = await _tcp_connect(host, int(port), self.connect_timeout)
                    reader, writer = await asyncio.open_connection(
                        sock=sock, ssl=ctx, server_hostname=self.server_name if ctx else None, limit=READ_SIZE
                    )
            except (OSError, ssl.SSLError, TimeoutError) as e:
                raise RpcError(
                    StatusCode.UNAVAILABLE, f"cannot connect to the controller at {self.address}: {e}"
                ) from None
            authority = self.server_name if ctx else self.address
            self._conn = _Connection(
                reader, writer, authority, "https" if ctx else "http", self.keepalive, self.keepalive_timeout
            )
            return self._conn


async def _tcp_connect(host: str, port: int, limit: float) -> socket.socket:
    """A numeric address is dialled directly (uvloop would send it through libuv's getaddrinfo thread pool, four
    threads idling for the agent's life); only a name goes through the loop's resolver."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        host = str(infos[0][4][0])
    return await connect_upstream((host, port), connect_timeout=limit)


class _Pending(Generic[M]):
    def __init__(
        self, channel: ControllerChannel, method: str, response_type: type[M], metadata: Sequence[tuple[str, str]]
    ) -> None:
        self._args = (channel, method, response_type, metadata)
        self._call: Call[M] | None = None

    async def __aenter__(self) -> Call[M]:
        channel, method, response_type, metadata = self._args
        conn = await channel._connection()
        self._call = conn.start_call(method, metadata, response_type)
        return self._call

    async def __aexit__(self, *exc: object) -> None:
        if self._call is not None:
            self._call.cancel()
