"""common.runtime: the open-files limit a node agent starts with (container runtimes still give 1024)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_PROBE = """
import json, resource, sys
from pathlib import Path
from common.runtime import raise_open_files_limit
soft, hard = (int(x) if x != "inf" else resource.RLIM_INFINITY for x in sys.argv[1:3])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
result = raise_open_files_limit(Path(sys.argv[3]))
print(json.dumps([result, resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))
"""


def _probe(soft: int, hard: int | str, nr_open: Path) -> list[object]:
    """In a child: this process's own limits must not change, and lowering the hard limit cannot be undone."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(soft), str(hard), str(nr_open)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    result: list[object] = json.loads(out.stdout)
    return result


def test_soft_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    assert _probe(256, 4096, tmp_path / "absent") == [[256, 4096], 4096]


def test_a_soft_limit_already_at_the_hard_limit_is_left_alone(tmp_path: Path) -> None:
    assert _probe(512, 512, tmp_path / "absent") == [[512, 512], 512]
