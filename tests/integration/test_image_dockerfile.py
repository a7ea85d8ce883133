"""The image's recipe against the code it packages, in the seconds `make test` can spare.

Building and running the image takes minutes (`make image-test`: scripts/build-image.sh --check, which starts a
Docker daemon, builds and runs the agent and controller from it); these checks catch, without a daemon, the drift
that breaks that build or the image later: a package the code grew that the Dockerfile does not copy, an entry point
the manifests name that the image lacks, a `# syntax=` line that needs a registry, and a build context carrying
local state (a virtualenv, caches, lab state) into the image.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "daemonset" / "Dockerfile"
IGNORE = ROOT / "daemonset" / "Dockerfile.dockerignore"


def _pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped, as the frontend reads them."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, args = line.partition(" ")
        out.append((word.upper(), args.strip()))
    return out


def _copied() -> set[str]:
    """Sources of COPY instructions (the build context is the repository root)."""
    sources: set[str] = set()
    for word, args in _instructions():
        if word == "COPY" and not args.startswith("--from"):
            sources.update(p.rstrip("/") for p in args.split()[:-1] if not p.startswith("--"))
    return sources


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether a context path is excluded, by the dockerignore rules: patterns relative to the root, `*` within one
    name, `**` across any number of directories, a pattern that matches a parent directory matches the path, `!`
    re-includes, and the last matching pattern wins."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts = path.split("/")
    prefixes = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:  # moby's patternmatcher: a pattern matching the path or a parent; the last one wins
        if any(regex(pattern.lstrip("!").strip("/")).match(prefix) for prefix in prefixes):
            excluded = not pattern.startswith("!")
    return excluded


def _ignore_patterns() -> list[str]:
    lines = (line.strip() for line in IGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_every_package_and_the_bpf_source_is_copied() -> None:
    """pyproject's packages (the console scripts import them) and bpf/ (agent/redirect.py compiles
    ../bpf/redirect.bpf.c at start) must all be in the image, or it starts with ModuleNotFoundError."""
    includes = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in includes}
    on_disk = {p for p in packages if (ROOT / p / "__init__.py").is_file()}
    assert on_disk == packages, f"pyproject names packages that do not exist: {sorted(packages - on_disk)}"
    missing = (packages | {"bpf", "pyproject.toml"}) - _copied()
    assert not missing, f"daemonset/Dockerfile does not COPY {sorted(missing)}"


def test_entry_points_are_console_scripts_of_the_image() -> None:
    """The ENTRYPOINT and the manifests' `command`s must be console scripts pyproject installs into the venv on the
    image's PATH."""
    scripts = set(_pyproject()["project"]["scripts"])
    entry = [args for word, args in _instructions() if word == "ENTRYPOINT"]
    assert entry == ['["ambit-agent"]']
    commands = []
    for manifest in (ROOT / "daemonset").rglob("*.yaml"):
        for doc in yaml.safe_load_all(manifest.read_text()):
            spec = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                if container.get("image") == "ambit" and "command" in container:
                    commands.append(container["command"][0])
    assert {"ambit-agent", "ambit-controller"} <= set(commands), commands
    # Besides the console scripts, the uninstall's idle container runs coreutils' sleep (Essential in Debian, so in
    # the slim base; scripts/image_check.py looks for it in the image).
    others = set(commands) - scripts
    assert others <= {"sleep"}, f"manifests run {sorted(others)}: neither console scripts nor in the base"
    env = [args for word, args in _instructions() if word == "ENV"]
    assert any("PATH=/opt/ambit/.venv/bin:" in args for args in env), env


def test_no_syntax_directive_and_a_local_base() -> None:
    """A `# syntax=` line makes BuildKit pull its frontend from a registry, which a closed network refuses; and
    scripts/build-image.sh makes exactly this base with debootstrap when no registry answers."""
    first = DOCKERFILE.read_text().splitlines()
    assert not any(re.match(r"#\s*syntax\s*=", line, re.I) for line in first if line.startswith("#"))
    stages: set[str] = set()
    external = []
    for word, args in _instructions():
        if word == "FROM":
            image, _, name = args.partition(" AS ")
            if image not in stages:
                external.append(image)
            stages.add(name.strip())
    assert external == ["debian:bookworm-slim"]
    assert "FROM debian:bookworm-slim AS system" in DOCKERFILE.read_text().splitlines()  # what build-image.sh reads


def test_build_context_leaves_out_local_state() -> None:
    """What a developer's tree holds beside the code must not reach the image through a COPY'd directory (stale
    bytecode, benchmark results, the lab's saved config) nor bloat the context (the venv, git history, caches)."""
    patterns = _ignore_patterns()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "ambit.egg-info/PKG-INFO",
        "agent/__pycache__/main.cpython-311.pyc",
        "controller/sources/__pycache__/kube.cpython-311.pyc",
        "lab/stray.pyc",
        "bench/results/run.json",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/x",
        ".hypothesis/examples/x",
        "examples/basic/.basic.ambit-state/objects.json",
        "build/lib/agent/main.py",
    ):
        assert _ignored(path, patterns), f"{path} would be in the build context"
    for path in ("agent/main.py", "bpf/redirect.bpf.c", "pyproject.toml", "README.md", "bench/main.py"):
        assert not _ignored(path, patterns), f"{path} is needed by the build but ignored"


def test_dockerignore_matcher() -> None:
    """The matcher above follows the dockerignore rules the assertions rely on."""
    assert _ignored("a/b/__pycache__/x.pyc", ["**/__pycache__"])
    assert _ignored("__pycache__", ["**/__pycache__"])
    assert not _ignored("agent/x.egg-info", ["*.egg-info"])  # anchored at the root, unlike .gitignore
    assert _ignored("x.egg-info/PKG-INFO", ["*.egg-info"])
    assert not _ignored("bench/results/x", ["bench/results", "!bench/results/x"])


def test_build_script_usage() -> None:
    """scripts/build-image.sh answers --help without root or a daemon, and refuses an unknown argument."""
    script = ROOT / "scripts" / "build-image.sh"
    ok = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "Usage: scripts/build-image.sh" in ok.stdout and "--base auto|registry|debootstrap" in ok.stdout
    bad = subprocess.run(["bash", str(script), "--nope"], capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode != 0 and "unknown argument: --nope" in bad.stderr


def test_missing_capabilities_names() -> None:
    """The image check names what this machine's bounding set lacks as Docker does (CAP_SYS_RESOURCE is 24 here),
    since it turns --privileged into --cap-add ALL less those."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import image_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    full = (1 << 41) - 1
    assert image_check.missing_capabilities(full, 40) == []
    assert image_check.missing_capabilities(0x1FFFEFFFFFF, 40) == ["SYS_RESOURCE"]
    assert image_check.missing_capabilities(full & ~(1 << 39) & ~(1 << 38), 40) == ["PERFMON", "BPF"]
    assert image_check.missing_capabilities(full, 41) == ["41"]  # a kernel newer than the table
