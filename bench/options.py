"""What a bench run was asked to do, and how long each measure runs.

Kept separate from the command line so `ambitctl bench`, `python -m bench run` and the integration test build the
same options the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ALL_CONFIGS: tuple[str, ...] = (
    "nomesh",
    "nomesh-same",
    "envoy",
    "pytls",
    "ambit-tunnel",
    "ambit-cross",
    "ambit-same",
    "ambit-attached",
)
"""Every data-path configuration, in report order. `config-scale` is separate (see config_scale.py)."""

CONFIG_SCALE = "config-scale"


@dataclass(frozen=True)
class Durations:
    """Per-measure budgets. Quick mode keeps every measure around 1-2 s so the whole run proves the harness works."""

    iperf_seconds: int
    iperf_omit: int
    pingpong_samples: int
    pingpong_warmup: int
    pingpong_max_seconds: float
    conn_samples: int
    conn_warmup: int
    conn_max_seconds: float
    scale_workloads: int
    scale_services: int
    scale_policies: int
    scale_clients: int
    scale_changes: int

    @property
    def iperf_wall(self) -> float:
        return float(self.iperf_seconds + self.iperf_omit)


FULL = Durations(
    iperf_seconds=5,
    iperf_omit=1,
    pingpong_samples=10000,
    pingpong_warmup=1000,
    pingpong_max_seconds=8.0,
    conn_samples=1000,
    conn_warmup=50,
    conn_max_seconds=6.0,
    scale_workloads=10000,
    scale_services=1000,
    scale_policies=1000,
    scale_clients=50,
    scale_changes=100,
)

QUICK = Durations(
    iperf_seconds=1,
    iperf_omit=0,
    pingpong_samples=2000,
    pingpong_warmup=100,
    pingpong_max_seconds=1.5,
    conn_samples=300,
    conn_warmup=10,
    conn_max_seconds=1.5,
    scale_workloads=10000,
    scale_services=1000,
    scale_policies=1000,
    scale_clients=50,
    scale_changes=20,
)


@dataclass
class RunOptions:
    quick: bool = False
    rounds: int | None = None
    only: tuple[str, ...] = ()
    out: Path | None = None
    pin: bool = False
    max_steal: float = 0.10
    """A measure during which the hypervisor stole more than this share of all CPUs' time is run again."""

    @property
    def durations(self) -> Durations:
        return QUICK if self.quick else FULL

    @property
    def effective_rounds(self) -> int:
        if self.rounds is not None:
            return self.rounds
        return 1 if self.quick else 3

    def selected(self) -> list[str]:
        """Data-path configurations to run, in report order (unknown names are rejected by the CLI)."""
        chosen = self.only or ALL_CONFIGS
        return [c for c in ALL_CONFIGS if c in chosen]

    def wants_config_scale(self) -> bool:
        return not self.only or CONFIG_SCALE in self.only
