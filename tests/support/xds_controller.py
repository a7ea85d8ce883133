"""A real `ambit-controller` process on 127.0.0.1 for xDS tests, plus small polling helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client.parser import text_string_to_metric_families

from agent.xds import XdsClient
from controller.xds_server import METHOD_NAME, SERVICE_NAME


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_for(predicate: Callable[[], Any], limit: float = 20.0, what: str = "condition") -> Any:
    """Poll until ``predicate()`` is truthy; generous timeouts because the machine is shared (no timing asserts)."""
    deadline = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def metric_sum(exposition: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``, in Prometheus text exposition."""
    total = 0.0
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@contextlib.asynccontextmanager
async def running(client: XdsClient) -> AsyncIterator[XdsClient]:
    """The client's `run()` as a task for the block, cancelled and awaited on exit."""
    task = asyncio.create_task(client.run())
    try:
        yield client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class ControllerProc:
    def __init__(self, workdir: Path, args: list[str], event_loop: str = "uvloop", tls: bool = False) -> None:
        self.workdir = workdir
        self.tls_port = free_port() if tls else 0
        self.args = args
        self.event_loop = event_loop
        self.xds_port = free_port()
        self.monitoring_port = free_port()
        self.log = workdir / "controller.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.xds_port}"

    async def launch(self) -> None:
        """Start the process without waiting for readiness."""
        argv = [
            str(Path(sys.executable).parent / "ambit-controller"),
            *self.args,
            "--xds-port", str(self.xds_port),
            "--tls-port", str(self.tls_port),
            "--monitoring-port", str(self.monitoring_port),
            "--listen-address", "127.0.0.1",
            "--event-loop", self.event_loop,
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log)

    async def start(self) -> None:
        await self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(self.ready):
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ambit-controller did not become ready; log:\n{self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitoring_port}/healthz/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.proc = None

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitoring_port}{path}", timeout=5) as r:
            body: bytes = r.read()
            return body

    def json(self, path: str) -> Any:
        return json.loads(self.get(path))

    def client_resumed(self) -> bool:
        """Its one xDS client subscribes to both types again and has acknowledged everything sent."""
        connections = self.json("/debug/connections")
        return bool(connections) and len(connections[0]["subscribed"]) == 2 and connections[0]["unacked"] == 0

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.get("/metrics").decode(), name, **labels)

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


StreamHandler = Callable[[AsyncIterator[Any], grpc.aio.ServicerContext], Awaitable[None]]


@contextlib.asynccontextmanager
async def delta_xds_server(handler: StreamHandler) -> AsyncIterator[int]:
    """A gRPC server on 127.0.0.1 whose delta xDS method is ``handler`` (requests decoded, responses written as
    serialized bytes): a controller that misbehaves exactly as a test needs. Yields its port."""
    method = grpc.stream_stream_rpc_method_handler(
        handler, request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString, response_serializer=bytes
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {METHOD_NAME: method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)
