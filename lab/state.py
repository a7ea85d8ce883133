"""The lab's persisted record: what it intends to create, written before creating it, so `down` can always clean up.

One JSON file per lab under /run/ambit/labs/<name>/ (tmpfs: a reboot wipes the namespaces and the record alike).
Writes are atomic (temp file + rename), so a crash mid-write leaves the previous, still-valid record.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lab.errors import LabStateError
from lab.plan import LabPlan

STATE_ROOT = Path("/run/ambit/labs")
STATE_FILE = "state.json"


@dataclass
class ProcessRecord:
    """A process the lab started; ``start_time`` guards against killing an unrelated process that reused the pid."""

    name: str
    netns: str
    argv: list[str]
    log: str
    role: str = "user"  # workload | controller | agent | user
    stop_timeout: float = 3.0  # seconds from SIGTERM to SIGKILL: an agent's is its drain time plus a margin
    pid: int = 0
    start_time: float = 0.0


@dataclass
class LabState:
    name: str
    source_dir: str
    config_dir: str  # the lab's own copy of source_dir; the controller watches it, so demos can edit it live
    mesh: bool
    plan: LabPlan
    drain_seconds: float = 5.0  # the mesh agents' --drain-seconds; stopping one waits that long plus a margin
    in_pod: bool = True  # the mesh agents connect passthrough from inside the pods' netns (agent/inpod.py)
    in_pod_hbone: bool = False  # and HBONE (--in-pod-hbone)
    phase: str = "creating"  # creating | up | deleting
    created_at: float = field(default_factory=time.time)
    netns: list[str] = field(default_factory=list)  # recorded before each `ip netns add`
    pin_dirs: list[str] = field(default_factory=list)  # bpffs directories of the lab's agents (bpffs is global)
    processes: list[ProcessRecord] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # mesh credentials and CA directory

    @property
    def dir(self) -> Path:
        return state_dir(self.name)

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["plan"] = self.plan.to_dict()
        tmp = self.dir / f".{STATE_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, self.dir / STATE_FILE)

    @classmethod
    def load(cls, name: str) -> LabState:
        path = state_dir(name) / STATE_FILE
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError as e:
            known = ", ".join(recorded_labs()) or "none"
            raise LabStateError(f"no lab named {name!r} (no {path}); recorded labs: {known}") from e
        except (OSError, ValueError) as e:
            raise LabStateError(f"cannot read {path}: {e}") from e
        data["plan"] = LabPlan.from_dict(data["plan"])
        data["processes"] = [ProcessRecord(**p) for p in data["processes"]]
        return cls(**data)


def state_dir(name: str) -> Path:
    return STATE_ROOT / name


def recorded_labs() -> list[str]:
    """Labs with a state record (directories holding only leftover logs of a failed `up` are not labs)."""
    if not STATE_ROOT.is_dir():
        return []
    return sorted(p.name for p in STATE_ROOT.iterdir() if (p / STATE_FILE).is_file())
