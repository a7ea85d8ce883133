"""The sample workload every lab pod runs: a TCP echo server and a tiny HTTP/1.1 server that says who called it.

The HTTP answer names the pod and the caller's address as the server saw it, which is exactly what a mesh test
needs to see (is the caller's address preserved? did traffic land on the pod we expected?). Standard library only,
so it starts fast in every pod.

    python -m lab.workload --name server-1 --namespace demo --node node2
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from common import flags
from common import log as ambit_log

log = logging.getLogger("lab.workload")

MAX_HEADER_BYTES = 64 * 1024


@dataclass
class WorkloadConfig:
    """Sample lab workload: TCP echo plus an HTTP who-am-I / who-called-me server."""

    name: str = field(default="", metadata={"help": "pod name reported in HTTP answers"})
    namespace: str = field(default="default", metadata={"help": "pod namespace reported in HTTP answers"})
    node: str = field(default="", metadata={"help": "node name reported in HTTP answers"})
    bind: str = field(default="0.0.0.0", metadata={"help": "address both servers listen on"})
    echo_port: int = field(default=9000, metadata={"help": "TCP echo port"})
    http_port: int = field(default=8080, metadata={"help": "HTTP port"})
    log_level: str = field(default="info", metadata={"help": "log level"})


def _peer(writer: asyncio.StreamWriter, which: str) -> str:
    addr = writer.get_extra_info(which)
    return f"{addr[0]}:{addr[1]}" if addr else "?"


async def handle_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until the client half-closes, then half-close back so the client sees the whole stream end."""
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
            await writer.drain()
    except OSError:  # ConnectionError included: the client went away
        pass
    finally:
        writer.close()


class HttpHandler:
    def __init__(self, cfg: WorkloadConfig) -> None:
        self.cfg = cfg

    def body(self, writer: asyncio.StreamWriter, path: str) -> bytes:
        return json.dumps(
            {
                "pod": self.cfg.name,
                "namespace": self.cfg.namespace,
                "node": self.cfg.node,
                "client": _peer(writer, "peername"),
                "server": _peer(writer, "sockname"),
                "path": path,
            }
        ).encode()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve keep-alive requests until the client closes or asks to close (load generators reuse connections)."""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    await self._reply(writer, 431, b'{"error":"headers too large"}', close=True)
                    return
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                parts = request_line.split(" ")
                if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                    await self._reply(writer, 400, b'{"error":"bad request line"}', close=True)
                    return
                method, path, version = parts
                headers = {}
                for line in header_lines:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                length = headers.get("content-length", "0")
                if not length.isdigit():
                    await self._reply(writer, 400, b'{"error":"bad content-length"}', close=True)
                    return
                if int(length):
                    await reader.readexactly(int(length))
                conn_hdr = headers.get("connection", "").lower()
                close = conn_hdr == "close" or (version == "HTTP/1.0" and conn_hdr != "keep-alive")
                body = self.body(writer, path)
                await self._reply(writer, 200, b"" if method == "HEAD" else body, close, len(body))
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _reply(
        writer: asyncio.StreamWriter, status: int, body: bytes, close: bool, length: int | None = None
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 431: "Request Header Fields Too Large"}[status]
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()


async def serve(cfg: WorkloadConfig) -> None:
    echo = await asyncio.start_server(handle_echo, cfg.bind, cfg.echo_port, reuse_address=True)
    http = await asyncio.start_server(
        HttpHandler(cfg), cfg.bind, cfg.http_port, reuse_address=True, limit=MAX_HEADER_BYTES
    )
    log.info(
        "workload serving",
        extra=ambit_log.kv(pod=f"{cfg.namespace}/{cfg.name}", echo_port=cfg.echo_port, http_port=cfg.http_port),
    )
    async with echo, http:
        await asyncio.gather(echo.serve_forever(), http.serve_forever())


def main(argv: list[str] | None = None) -> None:
    cfg = flags.parse(WorkloadConfig, argv)
    ambit_log.setup(cfg.log_level)
    asyncio.run(serve(cfg))


if __name__ == "__main__":
    main()
