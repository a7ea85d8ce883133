"""What every configuration driver provides: where the client connects, and which processes are the proxies.

A driver either yields an Endpoint or raises DriverUnavailable with the reason; the runner turns that reason into
a FAILED row, so a configuration is never silently missing from a report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class DriverUnavailable(RuntimeError):
    """This configuration cannot run here and now; str(exc) is shown in the report."""


@dataclass(frozen=True)
class Proxy:
    """One proxy process whose CPU and memory are charged to the configuration."""

    role: str
    pid: int


@dataclass
class Endpoint:
    """The client pod dials echo for latency and iperf for throughput; how they get there is the driver's job."""

    client_netns: str
    echo: tuple[str, int]
    iperf: tuple[str, int]
    proxies: list[Proxy] = field(default_factory=list)
    client_cpus: list[int] | None = None
    notes: list[str] = field(default_factory=list)

    def proxy_pids(self) -> list[int]:
        return [p.pid for p in self.proxies]


class Driver(Protocol):
    name: str
    title: str
    description: str

    def prepare(self) -> Endpoint:
        """Start whatever the configuration needs; raise DriverUnavailable with a reason when it cannot run."""
        ...

    def close(self) -> None:
        """Stop what prepare started (by PID); must be safe after a failed prepare."""
        ...
