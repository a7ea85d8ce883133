"""Micro-benchmark of the HBONE data path alone, on loopback: Ambit's tunnel pair against the Envoy HBONE pair and a
Python TLS-only relay pair, side by side in one run (the machine is shared and noisy: compare ratios, not MB/s).

Each pair is two single-threaded processes: a client side that accepts plain TCP and tunnels it, and a server side
that terminates the tunnel and dials the backend. Backends and drivers are the benchmark's own (iperf3, the C echo
server and ping-pong client from bench/tools). Measures per configuration and repetition: single-stream
throughput (iperf3 ``-n``), persistent-connection 1-byte echo latency p50/p99, new connection + 1-byte echo
(a new stream on the pooled tunnel), and the proxies' CPU seconds per GB.

    python -m bench.hbone_micro [--reps 3] [--bytes 1G] [--iters 5000] [--loop uvloop|asyncio] [--json FILE]

The ``ambit-client`` / ``ambit-server`` sub-commands are the two sides of Ambit's pair (agent.tunnel + agent.pool
without capture, policy or xDS).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from agent.addressing import parse_authority
from agent.outbound import EARLY_DATA
from agent.pool import HboneConnectionPool, PoolKey
from agent.sockets import connect_upstream, read_waiting
from agent.tunnel import ConnectRequest, HboneConnectError, relay, serve_hbone_connection
from bench.certs import CLIENT_ID, SERVER_ID, TRUST_DOMAIN, CertFiles, generate
from bench.drivers.envoy_pair import client_config, server_config
from bench.drivers.node_pair import PairAddresses
from bench.tools import Tools, build_tools
from common import runtime, tls

# Loopback addresses per role so the pairs never collide with each other or with ports others use on 127.0.0.1.
CLIENT_IP = "127.0.0.51"
SERVER_IP = "127.0.0.52"
BACKEND_IP = "127.0.0.53"
MIXED_A_CLIENT_IP, MIXED_A_SERVER_IP = "127.0.0.54", "127.0.0.55"  # Envoy client -> Ambit server
MIXED_B_SERVER_IP = "127.0.0.56"  # Ambit client -> Envoy server
ENVOY_CLIENT_ECHO, ENVOY_CLIENT_IPERF, ENVOY_HBONE = 15001, 15002, 15008
PAIRS = ("tcp_direct", "ambit_pair", "envoy_pair", "tls_relay_pair", "envoy_to_ambit", "ambit_to_envoy")


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _run_loop(main: Callable[[], object], loop_name: str) -> None:
    factory = runtime.loop_factory(loop_name)
    with asyncio.Runner(loop_factory=factory) as runner, contextlib.suppress(KeyboardInterrupt):
        runner.run(main())  # type: ignore[arg-type]


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _listen(addr: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _accept_forever(lsock: socket.socket, handle: Callable[[socket.socket], Coroutine[None, None, None]]) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    while True:
        sock, _ = await loop.sock_accept(lsock)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = loop.create_task(handle(sock))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


# ---------------------------------------------------------------------------------------------------- Ambit sides


async def forward_to_authority(req: ConnectRequest) -> None:
    """The bare HBONE server (Envoy's ORIGINAL_DST by ``:authority``): dial it, answer 200 or 503, relay."""
    try:
        up = await connect_upstream(parse_authority(req.authority))
    except (OSError, ValueError):
        await req.respond(503)
        return
    await req.respond(200)
    await relay(up, req.stream)


def ambit_server(args: argparse.Namespace) -> None:
    roots = [Path(args.root).read_text()]
    ctx = tls.server_context(Path(args.cert).read_text(), Path(args.key).read_text(), roots, alpn=[tls.ALPN_H2])

    async def main() -> None:
        lsock = _listen(_addr(args.listen))

        async def handle(sock: socket.socket) -> None:
            await serve_hbone_connection(sock, ctx, forward_to_authority, trust_domain=TRUST_DOMAIN)

        acceptor = asyncio.get_running_loop().create_task(_accept_forever(lsock, handle))
        await _until_signalled()
        acceptor.cancel()

    _run_loop(main, args.loop)


def ambit_client(args: argparse.Namespace) -> None:
    roots = [Path(args.root).read_text()]
    ctx = tls.client_context(roots, Path(args.cert).read_text(), Path(args.key).read_text(), alpn=[tls.ALPN_H2])
    key = PoolKey(CLIENT_ID, SERVER_ID, _addr(args.hbone))

    async def main() -> None:
        pool = HboneConnectionPool()
        loop = asyncio.get_running_loop()
        acceptors = []
        for mapping in args.map:
            listen, _, target = mapping.partition("=")

            async def handle(sock: socket.socket, target: str = target) -> None:
                peer = sock.getpeername()
                headers = [("forwarded", f'for="{peer[0]}:{peer[1]}"'), ("baggage", "k8s.namespace.name=bench")]
                try:
                    early = read_waiting(sock, args.early_data)  # as the agent's outbound
                    stream = await pool.open_stream(key, ctx, target, headers, early)
                except HboneConnectError as e:
                    print(f"open_stream: {e}", file=sys.stderr)
                    sock.close()
                    return
                await relay(sock, stream)

            acceptors.append(loop.create_task(_accept_forever(_listen(_addr(listen)), handle)))
        await _until_signalled()
        for acceptor in acceptors:
            acceptor.cancel()
        await pool.close()

    _run_loop(main, args.loop)


# ---------------------------------------------------------------------------------------------------- driver


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def _wait_port(ip: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex((ip, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {ip}:{port}")


@dataclass
class Pair:
    """A started configuration: where the driver connects, and which processes are the proxies."""

    name: str
    echo: tuple[str, int]
    iperf: tuple[str, int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cpu(self) -> float:
        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(p.pid).cpu_times()
                total += t.user + t.system
        return total


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.certs: CertFiles = generate(work / "certs")
        self.tools: Tools = build_tools(work / "tools")
        self.echo_port = _free_port(BACKEND_IP)
        self.iperf_port = _free_port(BACKEND_IP)
        self.env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))

    def spawn(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 -- lives as long as the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def start_backends(self) -> None:
        echo = self.spawn([str(self.tools.echo_server), str(self.echo_port)], "echo")
        iperf = self.spawn(["iperf3", "-s", "-B", BACKEND_IP, "-p", str(self.iperf_port)], "iperf3-server")
        _wait_port(BACKEND_IP, self.echo_port, echo)
        _wait_port(BACKEND_IP, self.iperf_port, iperf)

    @property
    def echo_target(self) -> tuple[str, int]:
        return (BACKEND_IP, self.echo_port)

    @property
    def iperf_target(self) -> tuple[str, int]:
        return (BACKEND_IP, self.iperf_port)

    def start_direct(self) -> Pair:
        return Pair("tcp_direct", self.echo_target, self.iperf_target)

    def _creds(self, role: str) -> list[str]:
        c = self.certs
        cert, key = (c.server_cert, c.server_key) if role == "server" else (c.client_cert, c.client_key)
        return ["--cert", str(cert), "--key", str(key), "--root", str(c.root), "--loop", self.args.loop]

    def _ambit_server(self, listen: tuple[str, int], name: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "bench.hbone_micro", "ambit-server", "--listen", f"{listen[0]}:{listen[1]}"]
        proc = self.spawn([*argv, *self._creds("server")], name)
        _wait_port(*listen, proc)
        return proc

    def _ambit_client(self, client_ip: str, hbone: tuple[str, int], name: str) -> tuple[Pair, subprocess.Popen[bytes]]:
        c_echo, c_iperf = (client_ip, _free_port(client_ip)), (client_ip, _free_port(client_ip))
        maps = [
            f"{c_echo[0]}:{c_echo[1]}={self.echo_target[0]}:{self.echo_target[1]}",
            f"{c_iperf[0]}:{c_iperf[1]}={self.iperf_target[0]}:{self.iperf_target[1]}",
        ]
        argv = [sys.executable, "-m", "bench.hbone_micro", "ambit-client", "--hbone", f"{hbone[0]}:{hbone[1]}"]
        argv += [arg for m in maps for arg in ("--map", m)]
        argv += ["--early-data", str(self.args.early_data)]
        proc = self.spawn([*argv, *self._creds("client")], name)
        _wait_port(*c_echo, proc)
        _wait_port(*c_iperf, proc)
        return Pair(name, c_echo, c_iperf), proc

    def _envoy(self, role: str, server_ip: str, client_ip: str) -> subprocess.Popen[bytes]:
        """One Envoy of the reference pair: ``server`` listens on server_ip:15008, ``client`` on client_ip:15001/2
        and tunnels to server_ip:15008."""
        addrs = PairAddresses(client_ip, server_ip, BACKEND_IP, self.echo_target, self.iperf_target)
        config = server_config(self.certs, addrs) if role == "server" else client_config(self.certs, addrs)
        config["admin"]["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}
        path = self.work / f"envoy-{role}-{server_ip}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        envoy = str(Path(sys.executable).parent / "envoy")
        argv = [envoy, "-c", str(path), "--concurrency", "1", "--disable-hot-restart", "-l", "warning"]
        proc = self.spawn(argv, f"envoy-{role}-{server_ip}")
        if role == "server":
            _wait_port(server_ip, ENVOY_HBONE, proc)
        else:
            _wait_port(client_ip, ENVOY_CLIENT_ECHO, proc)
            _wait_port(client_ip, ENVOY_CLIENT_IPERF, proc)
        return proc

    def start_ambit(self) -> Pair:
        hbone = (SERVER_IP, _free_port(SERVER_IP))
        server = self._ambit_server(hbone, "ambit-server")
        pair, client = self._ambit_client(CLIENT_IP, hbone, "ambit_pair")
        pair.procs = [client, server]
        return pair

    def start_envoy(self) -> Pair:
        server = self._envoy("server", SERVER_IP, CLIENT_IP)
        client = self._envoy("client", SERVER_IP, CLIENT_IP)
        return Pair("envoy_pair", (CLIENT_IP, ENVOY_CLIENT_ECHO), (CLIENT_IP, ENVOY_CLIENT_IPERF), [client, server])

    def start_envoy_to_ambit(self) -> Pair:
        """Mixed pair: Envoy HBONE client -> Ambit server (which side costs what)."""
        server = self._ambit_server((MIXED_A_SERVER_IP, ENVOY_HBONE), "ambit-server-mixed")
        client = self._envoy("client", MIXED_A_SERVER_IP, MIXED_A_CLIENT_IP)
        echo, iperf = (MIXED_A_CLIENT_IP, ENVOY_CLIENT_ECHO), (MIXED_A_CLIENT_IP, ENVOY_CLIENT_IPERF)
        return Pair("envoy_to_ambit", echo, iperf, [client, server])

    def start_ambit_to_envoy(self) -> Pair:
        """Mixed pair: Ambit client -> Envoy HBONE server."""
        server = self._envoy("server", MIXED_B_SERVER_IP, MIXED_B_SERVER_IP)
        pair, client = self._ambit_client(CLIENT_IP, (MIXED_B_SERVER_IP, ENVOY_HBONE), "ambit_to_envoy")
        pair.procs = [client, server]
        return pair

    def start_tls_relay(self) -> Pair:
        py = sys.executable
        s_echo, s_iperf = (SERVER_IP, _free_port(SERVER_IP)), (SERVER_IP, _free_port(SERVER_IP))
        c_echo, c_iperf = (CLIENT_IP, _free_port(CLIENT_IP)), (CLIENT_IP, _free_port(CLIENT_IP))

        def m(a: tuple[str, int], b: tuple[str, int]) -> list[str]:
            return ["--map", f"{a[0]}:{a[1]}={b[0]}:{b[1]}"]

        maps = [*m(s_echo, self.echo_target), *m(s_iperf, self.iperf_target)]
        server = self.spawn([py, "-m", "bench.tls_relay", "server", *maps, *self._creds("server")], "tls-server")
        maps = [*m(c_echo, s_echo), *m(c_iperf, s_iperf)]
        client = self.spawn([py, "-m", "bench.tls_relay", "client", *maps, *self._creds("client")], "tls-client")
        _wait_port(*s_echo, server)
        _wait_port(*c_echo, client)
        return Pair("tls_relay_pair", c_echo, c_iperf, [client, server])

    # measures

    def throughput(self, pair: Pair) -> dict[str, float]:
        cpu0 = pair.cpu()
        argv = ["iperf3", "-c", pair.iperf[0], "-p", str(pair.iperf[1]), "-n", self.args.bytes, "-J"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        cpu = pair.cpu() - cpu0
        try:
            result = json.loads(out.stdout)
            received = result["end"]["sum_received"]
            mbps = received["bytes"] / received["seconds"] / 1e6
            gb = received["bytes"] / 1e9
        except (json.JSONDecodeError, KeyError) as e:
            raise RuntimeError(f"iperf3 through {pair.name} failed: {out.stdout[-500:]} {out.stderr[-500:]}") from e
        return {"mbps": mbps, "cpu_s_per_gb": cpu / gb if pair.procs else 0.0}

    def pingpong(self, pair: Pair, mode: str, iters: int) -> dict[str, float]:
        cpu0 = pair.cpu()
        warm = max(iters // 10, 10)
        argv = [str(self.tools.pingpong), pair.echo[0], str(pair.echo[1]), "1", str(iters), str(warm), mode, "60"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        cpu = pair.cpu() - cpu0
        try:
            result = json.loads(out.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError) as e:
            raise RuntimeError(f"pingpong through {pair.name} failed: {out.stdout} {out.stderr}") from e
        done = float(result.get("iters", iters))
        return {"p50": float(result["p50"]), "p99": float(result["p99"]), "cpu_us": cpu * 1e6 / (done + warm)}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so the finally below stops every process this run started


def drive(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    work = Path(tempfile.mkdtemp(prefix="ambit-hbone-micro-"))
    bench = Bench(args, work)
    starters = {
        "tcp_direct": bench.start_direct,
        "ambit_pair": bench.start_ambit,
        "envoy_pair": bench.start_envoy,
        "tls_relay_pair": bench.start_tls_relay,
        "envoy_to_ambit": bench.start_envoy_to_ambit,
        "ambit_to_envoy": bench.start_ambit_to_envoy,
    }
    assert tuple(starters) == PAIRS
    names = [n for n in starters if n in args.only.split(",")]
    results: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    try:
        bench.start_backends()
        pairs = {n: starters[n]() for n in names}
        time.sleep(0.5)
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for n in order:
                pair = pairs[n]
                row = results[n]
                measures = {
                    **{f"tput_{k}": v for k, v in bench.throughput(pair).items()},
                    **{f"rr_{k}": v for k, v in bench.pingpong(pair, "persistent", args.iters).items()},
                    **{f"conn_{k}": v for k, v in bench.pingpong(pair, "conn", args.conn_iters).items()},
                }
                for k, v in measures.items():
                    row.setdefault(k, []).append(v)
                print(f"rep {rep + 1} {n}: " + ", ".join(f"{k}={v:.1f}" for k, v in measures.items()), flush=True)
    finally:
        bench.stop_all()
    _report(results, args)
    print(f"(logs and certificates in {work})")


def _report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    med = {n: {k: _median(v) for k, v in row.items()} for n, row in results.items()}
    base = med.get("tcp_direct", {})
    envoy = med.get("envoy_pair", {})
    print(f"\nmedians over {args.reps} reps, loop={args.loop}, {args.bytes} per iperf3 run, {args.iters} round trips")
    hdr = f"{'config':16} {'MB/s':>8} {'CPU s/GB':>9} {'rr p50':>8} {'rr p99':>8} {'+p50':>7} {'+p99':>7}"
    print(hdr + f" {'conn p50':>9} {'conn p99':>9} {'CPU us/rt':>9}")
    for n, m in med.items():
        add50 = m["rr_p50"] - base.get("rr_p50", 0.0)
        add99 = m["rr_p99"] - base.get("rr_p99", 0.0)
        print(
            f"{n:16} {m['tput_mbps']:8.0f} {m['tput_cpu_s_per_gb']:9.2f} {m['rr_p50']:8.1f} {m['rr_p99']:8.1f}"
            f" {add50:7.1f} {add99:7.1f} {m['conn_p50']:9.1f} {m['conn_p99']:9.1f} {m['rr_cpu_us']:9.1f}"
        )
    if envoy and "ambit_pair" in med:
        a = med["ambit_pair"]

        def added(m: dict[str, float], k: str) -> float:
            return m[k] - base.get(k, 0.0)

        print(
            "\nambit / envoy: throughput x{:.2f}, CPU/GB x{:.2f}, added p50 x{:.2f}, added p99 x{:.2f},"
            " new-conn p50 x{:.2f}".format(
                a["tput_mbps"] / envoy["tput_mbps"],
                a["tput_cpu_s_per_gb"] / envoy["tput_cpu_s_per_gb"],
                added(a, "rr_p50") / added(envoy, "rr_p50"),
                added(a, "rr_p99") / added(envoy, "rr_p99"),
                added(a, "conn_p50") / added(envoy, "conn_p50"),
            )
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"raw": results, "median": med}, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hbone_micro", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    for role in ("ambit-client", "ambit-server"):
        p = sub.add_parser(role)
        p.add_argument("--listen", default="")
        p.add_argument("--hbone", default="")
        p.add_argument("--map", action="append", default=[])
        p.add_argument("--cert", required=True)
        p.add_argument("--key", required=True)
        p.add_argument("--root", required=True)
        p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
        p.add_argument("--early-data", type=int, default=EARLY_DATA)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bytes", default="1G", help="iperf3 -n per throughput run")
    parser.add_argument("--iters", type=int, default=5000)
    parser.add_argument("--conn-iters", type=int, default=300)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--early-data",
        type=int,
        default=EARLY_DATA,
        help="bytes of the client's first write Ambit's client sends with the CONNECT (0: after the 200)",
    )
    parser.add_argument(
        "--only",
        default="tcp_direct,ambit_pair,envoy_pair,tls_relay_pair",
        help="comma-separated configurations; also envoy_to_ambit, ambit_to_envoy (mixed pairs)",
    )
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only.split(",")) - set(PAIRS))
    if args.cmd is None and unknown:
        parser.error(f"--only: unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(PAIRS)}")
    if args.cmd == "ambit-client":
        ambit_client(args)
    elif args.cmd == "ambit-server":
        ambit_server(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
