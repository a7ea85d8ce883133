"""`python -m bench run --quick` end to end: every configuration is in the report, with numbers where it can run.

It asserts that numbers exist, never what they are (performance is judged by the report, not by tests).
Configurations whose components cannot run yet must still appear, as FAILED with a reason; NOT_YET_RUNNABLE
lists them with why, and shrinks as the data path lands.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.measures import MEASURES
from bench.options import ALL_CONFIGS

REPO = Path(__file__).resolve().parents[2]

# Configurations allowed to be FAILED in the quick run, with why (each entry names what is missing). Empty: every
# configuration, Ambit's mesh data path included, runs here and must produce numbers.
NOT_YET_RUNNABLE: dict[str, str] = {}


def test_quick_run_produces_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, f"bench exited {proc.returncode}\n{proc.stderr[-3000:]}"
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    for png in ("throughput.png", "latency.png", "cpu_per_gb.png"):
        assert (out / png).stat().st_size > 1000, png

    assert set(results["configs"]) == set(ALL_CONFIGS)
    for name in ALL_CONFIGS:
        entry = results["configs"][name]
        assert f"| {name} |" in report, f"{name} missing from report.md"
        if name in NOT_YET_RUNNABLE and entry["status"] == "failed":
            assert entry["reason"], f"{name} FAILED without a reason"
            assert "FAILED" in report
            continue
        assert entry["status"] == "ok", f"{name}: {entry['status']}: {entry.get('reason')} {entry.get('errors')}"
        for measure in MEASURES:
            summary = entry["summary"].get(measure.name, {})
            key = "MBps" if measure.kind == "throughput" else "p50"
            assert summary.get(key, {}).get("n", 0) >= 1, f"{name} {measure.name}: no {key} ({entry.get('errors')})"
        if entry["proxies"]:
            assert entry["summary"]["tput1"]["cpu_s_per_gb"]["n"] >= 1, f"{name}: no proxy CPU per GB"

    scale = results["config_scale"]
    assert scale["status"] == "ok", scale.get("reason")
    for key in ("build_s", "deliver_s", "change_p50_s", "change_p99_s"):
        assert isinstance(scale[key], float), key

    statuses = {t["status"] for t in results["targets"]}
    assert statuses <= {"met", "not met", "not measured"}
    assert len(results["targets"]) >= 10

    # Network hygiene: every namespace of the labs the run built is gone.
    assert results["meta"]["labs"], "the run recorded no lab"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    for lab in results["meta"]["labs"]:
        assert f"{lab}-" not in netns, f"netns of lab {lab} left behind"
