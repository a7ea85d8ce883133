"""One bench run: build the labs, prepare every configuration, run the measures interleaved over rounds, write it up.

Configurations run side by side in the same run (rotating their order each round) because absolute numbers on a
shared 2-core machine move by tens of percent from minute to minute; what is comparable is configurations measured
within the same few seconds. Everything the run starts is stopped in `finally`, on Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from bench import agent_memory, certs, config_scale, machine, report, stats, targets
from bench.cpu import CpuSnapshot, own_process_tree, read_steal, rss_bytes, steal_between, top_consumers
from bench.drivers.ambit import AMBIT_PATHS, AmbitConfig
from bench.drivers.attached import AmbitAttached
from bench.drivers.base import Driver, DriverUnavailable, Endpoint
from bench.drivers.envoy_pair import EnvoyPair
from bench.drivers.nomesh import NOMESH_PATHS, NoMesh
from bench.drivers.tls_pair import PythonTlsPair
from bench.drivers.tunnel_pair import AmbitTunnelPair
from bench.labs import BenchLabs, Pinning
from bench.measures import MAX_ATTEMPTS, MEASURES, measure_once, run_measure
from bench.options import RunOptions
from bench.procs import ProcessDied, ProcessGroup
from bench.progress import Progress
from bench.tools import ToolBuildError, Tools, build_tools

AMBIT_MESH_CONFIGS = ("ambit-cross", "ambit-same")
LAB_OF = {"ambit-cross": "mesh", "ambit-same": "mesh", "ambit-attached": "attach"}
RESULTS_ROOT = Path(__file__).resolve().parent / "results"
PREPARE_ESTIMATE_S = {"plain": 5.0, "attach": 8.0, "mesh": 25.0}
RSS_ESTIMATE_S = 60.0


class Interrupted(Exception):
    """SIGTERM arrived; handled like Ctrl-C so cleanup and the partial report still happen."""


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise Interrupted("SIGTERM")


def make_drivers(
    names: list[str],
    labs: BenchLabs,
    group: ProcessGroup,
    pinning: Pinning,
    cert_files: certs.CertFiles,
    tools: Tools,
    work: Path,
) -> list[Driver]:
    available: dict[str, Driver] = {
        "envoy": EnvoyPair(labs, group, pinning, cert_files, work / "envoy"),
        "pytls": PythonTlsPair(labs, group, pinning, cert_files, work / "pytls"),
        "ambit-tunnel": AmbitTunnelPair(labs, group, pinning, cert_files, work / "ambit-tunnel"),
    }
    for nomesh in NOMESH_PATHS:
        available[nomesh.name] = NoMesh(nomesh, labs, pinning)
    for path in AMBIT_PATHS:
        available[path.name] = AmbitConfig(path, labs, tools, pinning)
    available["ambit-attached"] = AmbitAttached(labs, group, tools, pinning, work / "attach")
    return [available[n] for n in names]


def _config_entry(driver: Driver) -> dict[str, Any]:
    return {
        "title": driver.title,
        "description": driver.description,
        "status": "pending",
        "reason": None,
        "notes": [],
        "proxies": [],
        "rounds": [],
    }


class Run:
    def __init__(self, options: RunOptions) -> None:
        self.options = options
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.out = options.out or RESULTS_ROOT / stamp
        self.out.mkdir(parents=True, exist_ok=True)
        self.group = ProcessGroup(self.out / "logs")
        self.pinning = Pinning(options.pin)
        self.endpoints: dict[str, Endpoint] = {}
        self.drivers: list[Driver] = []
        self.results: dict[str, Any] = {"meta": {}, "configs": {}}
        self.progress = Progress(0.0)

    def execute(self) -> int:
        opts = self.options
        d = opts.durations
        selected = opts.selected()
        meta = self.results["meta"]
        meta.update(
            {
                "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                "mode": "quick" if opts.quick else "full",
                "rounds": opts.effective_rounds,
                "pinning": (
                    "taskset: node1 side (client pod, its node's proxy) on CPU 0, node2 side on CPU 1"
                    if opts.pin
                    else "none (the scheduler places every process)"
                ),
                "durations": d.__dict__,
                "max_steal": opts.max_steal,
                "configs_selected": selected,
                "machine": machine.describe(),
                "results_dir": str(self.out),
            }
        )
        for name in selected:
            self.results["configs"][name] = {}
        snap0 = CpuSnapshot.take()
        steal0 = read_steal()
        t0 = time.monotonic()
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        code = 0
        labs: BenchLabs | None = None
        try:
            tools = build_tools(self.out / "bin")
            cert_files = certs.generate(self.out / "certs")
            labs = BenchLabs(self.group, tools, self.pinning, self.out / "logs")
            self.drivers = make_drivers(selected, labs, self.group, self.pinning, cert_files, tools, self.out)
            for driver in self.drivers:
                self.results["configs"][driver.name] = _config_entry(driver)
            per_round = sum(m.expected_seconds(d) for m in MEASURES)
            kinds = {LAB_OF.get(n, "plain") for n in selected}
            extra = (config_scale.expected_seconds(d) if opts.wants_config_scale() else 0.0) + (
                RSS_ESTIMATE_S if not opts.quick and set(AMBIT_MESH_CONFIGS) & set(selected) else 0.0
            )
            self.progress = Progress(
                sum(PREPARE_ESTIMATE_S[k] for k in kinds) + per_round * len(selected) * opts.effective_rounds + extra
            )
            self._prepare_all(tools)
            self._rounds(tools)
            self._memory(labs)
            if opts.wants_config_scale():
                self._config_scale()
        except (KeyboardInterrupt, Interrupted) as exc:
            meta["interrupted"] = f"{type(exc).__name__} {exc}".strip()
            code = 130
        except (ToolBuildError, OSError) as exc:
            meta["error"] = f"{type(exc).__name__}: {exc}"
            code = 1
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # cleanup must not be cut short
            ours = own_process_tree()  # includes the labs' processes: Lab.up starts them from this process
            delta = CpuSnapshot.take().since(snap0)
            meta["top_cpu_consumers"] = top_consumers({p: v for p, v in delta.items() if p not in ours})
            self._cleanup(labs)
            meta["labs"] = labs.names if labs is not None else []
            signal.signal(signal.SIGTERM, previous)
            self.progress.finish()
        meta["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        wall = time.monotonic() - t0
        meta["wall_s"] = round(wall, 1)
        stolen_s, stolen_frac = steal_between(steal0, read_steal(), wall)
        meta["steal_cpu_s"], meta["steal_frac"] = round(stolen_s, 2), round(stolen_frac, 4)
        meta["machine"]["load_average_end"] = machine.load_average()
        self._finish()
        return code

    # ---- phases ---------------------------------------------------------------------------------------------------

    def _fail(self, name: str, reason: str, rounds_left: int) -> None:
        entry = self.results["configs"][name]
        entry["status"] = "failed"
        entry["reason"] = reason
        self.endpoints.pop(name, None)
        d = self.options.durations
        self.progress.add_expected(-rounds_left * sum(m.expected_seconds(d) for m in MEASURES))
        self.progress.note(f"bench: {name} FAILED: {reason}")

    def _prepare_all(self, tools: Tools) -> None:
        # Warm-up: a short echo run establishes pooled tunnels and certificates before anything is measured.
        warm = replace(self.options.durations, pingpong_samples=300, pingpong_warmup=0, pingpong_max_seconds=3.0)
        rounds = self.options.effective_rounds
        for driver in self.drivers:
            self.progress.step(f"prepare {driver.name}", 0.0)
            try:
                endpoint = driver.prepare()
                warmup = measure_once(MEASURES[2], tools, endpoint, warm)
                if "error" in warmup:
                    raise DriverUnavailable(f"warm-up echo failed: {warmup['error']}")
            except (DriverUnavailable, ProcessDied, TimeoutError, OSError) as exc:
                self._fail(driver.name, str(exc), self.options.effective_rounds)
                continue
            except Exception as exc:  # a driver bug must not take the other configurations down with it
                self._fail(driver.name, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}", rounds)
                continue
            entry = self.results["configs"][driver.name]
            entry["status"] = "ok"
            entry["notes"] = endpoint.notes
            entry["proxies"] = [{"role": p.role, "pid": p.pid} for p in endpoint.proxies]
            self.endpoints[driver.name] = endpoint

    def _rounds(self, tools: Tools) -> None:
        """Each round runs one measure on every configuration before the next measure, rotating the order: the
        figures compared in a ratio are taken seconds apart, not minutes, which matters on a shared machine."""
        d = self.options.durations
        rounds = self.options.effective_rounds
        names = [drv.name for drv in self.drivers]
        if not names:
            return
        for r in range(rounds):
            measured: dict[str, dict[str, Any]] = {name: {} for name in names}
            for i, measure in enumerate(MEASURES):
                shift = (r + i) % len(names)
                for name in names[shift:] + names[:shift]:
                    endpoint = self.endpoints.get(name)
                    if endpoint is None:
                        continue
                    what = f"round {r + 1}/{rounds}  {measure.name:<6} {name:<15}"
                    self.progress.step(what, measure.expected_seconds(d))
                    retrying = partial(self._retry_step, what, measure.expected_seconds(d))
                    measured[name][measure.name] = run_measure(
                        measure, tools, endpoint, d, self.options.max_steal, retrying
                    )
                    dead = [p.role for p in endpoint.proxies if not _alive(p.pid)]
                    if dead:
                        measured[name][measure.name].setdefault("error", f"proxy died: {', '.join(dead)}")
                        self._fail(
                            name, f"{', '.join(dead)} died in round {r + 1} (see {self.out / 'logs'})", rounds - r - 1
                        )
            for name in names:
                if measured[name]:
                    self.results["configs"][name]["rounds"].append(
                        {"round": r, "load_average": machine.load_average(), "measures": measured[name]}
                    )

    def _retry_step(self, what: str, expected_s: float, attempt: int, steal: float) -> None:
        """An extra attempt gets its own progress line and its own share of the estimate, so the time left grows
        instead of running below zero."""
        self.progress.add_expected(expected_s)
        self.progress.step(f"{what} attempt {attempt}/{MAX_ATTEMPTS} ({steal:.0%} stolen)", expected_s)

    def _memory(self, labs: BenchLabs) -> None:
        """Proxy RSS at the end of the rounds (after the work, when pools and buffers are at their largest), then
        the agent with 100 local workloads (full runs, and only when the mesh came up for the data-path runs)."""
        for name, endpoint in self.endpoints.items():
            self.results["configs"][name]["proxy_rss_mb"] = {
                p.role: round(rss_bytes(p.pid) / 1e6, 1) for p in endpoint.proxies
            }
        if self.options.quick:
            self.results["agent_rss"] = {"reason": "not measured in --quick runs (it needs a 101-pod mesh lab)"}
        elif not any(n in self.endpoints for n in AMBIT_MESH_CONFIGS):
            self.results["agent_rss"] = {"reason": "the mesh data path did not run in this invocation"}
        else:
            self.progress.step("agent RSS with 100 local workloads", RSS_ESTIMATE_S)
            self.results["agent_rss"] = agent_memory.measure(labs, self.out)

    def _config_scale(self) -> None:
        self.results["config_scale"] = config_scale.run(self.options.durations, self.progress, self.out / "logs")

    def _cleanup(self, labs: BenchLabs | None) -> None:
        for driver in self.drivers:
            try:
                driver.close()
            except Exception as exc:  # keep cleaning up
                self.progress.note(f"bench: closing {driver.name} failed: {exc}")
        self.group.stop_all()
        if labs is not None:
            labs.close()

    def _finish(self) -> None:
        for entry in self.results["configs"].values():
            entry["summary"] = stats.summarize(entry.get("rounds", []))
            errors = [
                f"round {rr['round'] + 1} {m}: {res['error']}"
                for rr in entry.get("rounds", [])
                for m, res in rr["measures"].items()
                if "error" in res
            ]
            entry["errors"] = errors
            stopped = self.results["meta"].get("interrupted") or self.results["meta"].get("error")
            if entry.get("status") == "ok" and not entry["summary"]:
                why = (
                    f"the run stopped ({stopped}) before it was measured" if stopped else "no measure produced a number"
                )
                entry["status"], entry["reason"] = "failed", "; ".join([why, *errors[:3]])
            elif entry.get("status") in ("pending", None):
                entry["status"], entry["reason"] = "failed", f"not run: the run stopped before it ({stopped})"
        self.results["targets"] = targets.evaluate(self.results)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        report.write(self.results, self.out)
        self.progress.note(f"bench: report {self.out / 'report.md'}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run(options: RunOptions) -> tuple[int, Path]:
    bench = Run(options)
    return bench.execute(), bench.out
