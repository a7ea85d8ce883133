"""The image's lock (daemonset/requirements.lock) against pyproject.toml, itself, and the Dockerfile installing it.

Why: the Dockerfile installs the lock with ``pip install --require-hashes --no-deps``, so pip neither resolves nor
adds anything: a dependency added to pyproject.toml without writing the lock again, a package the lock lost, or a
version edited by hand to one a dependent does not accept would reach the image silently (or fail only in a build).
These checks read the lock offline: the ``# requires:`` lines scripts/lock_image_deps.py records under each package
are its Requires-Dist that apply on Linux, and the walk below evaluates their markers itself for Debian bookworm's
CPython 3.11 on amd64 and arm64. Each checker returns the problems it finds, and is shown to find them in a lock
spoiled on purpose, so an empty list means something.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import InvalidVersion, Version

REPO = Path(__file__).resolve().parents[2]


def _lock_script() -> object:
    """scripts/lock_image_deps.py (not a package): its image interpreter's markers are the ones the lock is for."""
    spec = importlib.util.spec_from_file_location("lock_image_deps", REPO / "scripts" / "lock_image_deps.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_SCRIPT = _lock_script()
image_environment = _SCRIPT.image_environment  # type: ignore[attr-defined]
MACHINES: tuple[str, ...] = _SCRIPT.MACHINES  # type: ignore[attr-defined]
LOCK = REPO / "daemonset" / "requirements.lock"
DOCKERFILE = REPO / "daemonset" / "Dockerfile"
PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s\\]+)(?P<more> \\)?")
HASH = re.compile(r" {4}--hash=sha256:(?P<hex>[0-9a-f]{64})(?P<more> \\)?")


@dataclass
class Pin:
    version: str
    hashes: list[str] = field(default_factory=list)
    requires: list[Requirement] = field(default_factory=list)


def parse_lock(text: str) -> tuple[dict[NormalizedName, Pin], list[str]]:
    """The pins of a lock in pip-compile's layout, and every line pip would read otherwise (an option such as
    --index-url or --find-links, a range, a URL, a hash without its package): the layout is strict so that what
    this parser sees is what pip installs."""
    pins: dict[NormalizedName, Pin] = {}
    problems: list[str] = []
    current: Pin | None = None
    continued = False  # the previous line ended with a backslash: this one belongs to the same requirement
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            if continued:
                problems.append(f"line {number}: a requirement's continuation is cut by a comment")
            if current is not None and line.startswith("    # requires: "):
                current.requires.append(Requirement(line.removeprefix("    # requires: ")))
            continued = False
            continue
        if continued and current is not None and (hashed := HASH.fullmatch(line)):
            current.hashes.append(hashed["hex"])
            continued = hashed["more"] is not None
            continue
        pin = PIN.fullmatch(line)
        if continued or pin is None:
            problems.append(f"line {number}: not a `name==version \\` pin nor one of its hashes: {line!r}")
            current, continued = None, False
            continue
        name = canonicalize_name(pin["name"])
        if name in pins:
            problems.append(f"line {number}: {name} is pinned twice")
        current = pins[name] = Pin(pin["version"])
        continued = pin["more"] is not None
    return pins, problems


def pin_problems(pins: dict[NormalizedName, Pin]) -> list[str]:
    problems = []
    for name, pin in pins.items():
        try:
            Version(pin.version)
        except InvalidVersion:
            problems.append(f"{name}=={pin.version}: not an exact version")
        if not pin.hashes:
            problems.append(f"{name}=={pin.version} has no hash: pip's hash-checking mode refuses the whole lock")
        if len(set(pin.hashes)) != len(pin.hashes):
            problems.append(f"{name}=={pin.version} lists a hash twice")
    return problems


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [Requirement(r) for r in project["project"]["dependencies"] + project["build-system"]["requires"]]


def unmet(req: Requirement, pins: dict[NormalizedName, Pin], requirer: str) -> str | None:
    pin = pins.get(canonicalize_name(req.name))
    if pin is None:
        return f"{requirer} requires {req}: not in the lock"
    if not req.specifier.contains(pin.version, prereleases=True):
        return f"{requirer} requires {req}: the lock has {pin.version}"
    return None


def root_problems(pins: dict[NormalizedName, Pin], roots: list[Requirement]) -> list[str]:
    return [p for r in roots if (p := unmet(r, pins, "pyproject.toml"))]


def needed(req: Requirement, extra: str) -> bool:
    return req.marker is None or any(req.marker.evaluate(image_environment(m, extra)) for m in MACHINES)


def closure_problems(pins: dict[NormalizedName, Pin], roots: list[Requirement]) -> list[str]:
    """Walk the requirements from pyproject.toml through each locked package's own (with the extras asked of it):
    each must be locked at a version its specifier admits, and each locked package must be reached (one nothing
    requires is a leftover that --no-deps would install anyway)."""
    problems: list[str] = []
    reached: set[NormalizedName] = set()
    seen: set[tuple[NormalizedName, str]] = set()
    todo = [(r, "pyproject.toml") for r in roots if needed(r, "")]
    while todo:
        req, requirer = todo.pop()
        if problem := unmet(req, pins, requirer):
            problems.append(problem)
            continue
        name = canonicalize_name(req.name)
        reached.add(name)
        for extra in ("", *sorted(req.extras)):
            if (name, extra) not in seen:
                seen.add((name, extra))
                requirer = f"{name}=={pins[name].version}"
                todo += [(dep, requirer) for dep in pins[name].requires if needed(dep, extra)]
    for name in pins.keys() - reached:
        problems.append(f"{name}=={pins[name].version} is locked but nothing requires it")
    return sorted(set(problems))


def spoil(text: str, name: str, replacement: str | None) -> str:
    """`text` with `name`'s whole block (pin, hashes, comments) replaced."""
    block = re.compile(rf"^{re.escape(name)}==.*?\n(?=[^ ]|\Z)", re.M | re.S)
    assert block.search(text), name
    return block.sub(replacement or "", text, count=1)


@pytest.fixture(scope="module")
def lock_text() -> str:
    return LOCK.read_text()


def test_the_lock_is_pins_and_hashes_only(lock_text: str) -> None:
    pins, problems = parse_lock(lock_text)
    assert problems == []
    assert pin_problems(pins) == []
    # Spoiled: a hash dropped (the pin's line then ends without its continuation), a range, a redirected index.
    no_hash = re.sub(r"^(orjson==\S+) \\\n(    --hash=.*\n)+", r"\1\n", lock_text, flags=re.M)
    assert any("orjson" in p and "no hash" in p for p in pin_problems(parse_lock(no_hash)[0]))
    assert parse_lock(lock_text.replace("\norjson==", "\norjson>=", 1))[1]
    assert parse_lock("--index-url https://example.invalid/simple\n" + lock_text)[1]


def test_every_pyproject_requirement_is_locked_within_its_range(lock_text: str) -> None:
    pins, _ = parse_lock(lock_text)
    roots = pyproject_requirements()
    assert {"setuptools", "wheel", "grpcio", "kubernetes"} <= {canonicalize_name(r.name) for r in roots}
    assert root_problems(pins, roots) == []
    # A dependency added to pyproject.toml without writing the lock again, and a range raised past the pin:
    assert root_problems(pins, [*roots, Requirement("rich>=13")]) == [
        "pyproject.toml requires rich>=13: not in the lock"
    ]
    grpcio = pins[canonicalize_name("grpcio")].version
    raised = Requirement(f"grpcio>{grpcio}")
    assert root_problems(pins, [raised]) == [f"pyproject.toml requires {raised}: the lock has {grpcio}"]


def test_the_lock_is_the_closure_of_pyprojects_requirements_on_linux(lock_text: str) -> None:
    pins, _ = parse_lock(lock_text)
    roots = pyproject_requirements()
    assert closure_problems(pins, roots) == []
    # The walk goes below the first level (kubernetes -> requests -> urllib3, cryptography -> cffi -> pycparser,
    # wheel -> packaging), so it is not a restatement of pyproject.toml.
    assert {"urllib3", "pycparser", "packaging"} <= pins.keys() - {canonicalize_name(r.name) for r in roots}
    # Spoiled: a transitive package lost (multidict: aiohttp's and yarl's), a version a dependent refuses, a
    # leftover nothing requires.
    lost = closure_problems(parse_lock(spoil(lock_text, "multidict", None))[0], roots)
    assert lost and all("requires multidict" in p and "not in the lock" in p for p in lost)
    yarl = pins[canonicalize_name("yarl")]
    old = spoil(lock_text, "yarl", f"yarl==1.0.0 \\\n    --hash=sha256:{'0' * 64}\n")
    refused = closure_problems(parse_lock(old)[0], roots)
    assert any(p.endswith("the lock has 1.0.0") and "requires yarl" in p for p in refused), refused
    extra = lock_text + f"rich==13.0.0 \\\n    --hash=sha256:{'1' * 64}\n"
    assert closure_problems(parse_lock(extra)[0], roots) == ["rich==13.0.0 is locked but nothing requires it"]
    assert yarl.requires, "yarl's requirements are recorded"


def test_the_walk_evaluates_markers_for_the_image_on_both_architectures() -> None:
    pins = {
        canonicalize_name("a"): Pin(
            "1",
            ["0" * 64],
            [
                Requirement('b; platform_machine == "aarch64"'),
                Requirement('c; sys_platform == "win32"'),
                Requirement('d; extra == "x"'),
                Requirement('e; python_version >= "3.12"'),
            ],
        ),
    }
    # On arm64 only still counts; Windows, an extra nobody asks for and a later Python do not.
    assert closure_problems(pins, [Requirement("a")]) == [
        'a==1 requires b; platform_machine == "aarch64": not in the lock'
    ]
    assert 'a==1 requires d; extra == "x": not in the lock' in closure_problems(pins, [Requirement("a[x]")])


def _dockerfile_lines() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [line for line in text.splitlines() if not line.startswith("#")]


def test_the_dockerfile_installs_the_lock_in_hash_checking_mode() -> None:
    lines = _dockerfile_lines()
    # The requirements stage copies the lock and passes it through as /tmp/requirements.txt (after checking it
    # names pyproject.toml's requirements); the dependency layer installs that file alone.
    stage = lines[lines.index("FROM system AS requirements") :]
    stage = stage[: next(i for i, line in enumerate(stage) if line.startswith("FROM system") and i > 0)]
    (copy,) = [line for line in stage if line.startswith("COPY ")]
    assert "daemonset/requirements.lock" in copy.split()[1:-1], copy
    (written,) = [line for line in stage if line.rstrip().endswith("> /tmp/requirements.txt")]
    assert 'print(lock, end="")' in written and 'open("/tmp/requirements.lock")' in written, written
    installs = [line for line in lines if "pip install" in line]
    (in_place,) = [line for line in installs if re.search(r"pip install [^&]*-e \.", line)]
    (locked,) = [line for line in installs if line is not in_place]
    command = re.search(r"pip install [^&]*", locked)
    assert command is not None
    words = command[0].split()
    assert {"--require-hashes", "--no-deps"} <= set(words), locked
    assert words[words.index("--only-binary") + 1] == ":all:", locked
    assert words[words.index("-r") + 1] == "/tmp/requirements.txt", locked
    # The project itself: nothing fetched (no dependencies, no isolated build environment), then checked.
    assert {"--no-deps", "--no-build-isolation"} <= set(in_place.split()), in_place
    assert re.search(r"/opt/ambit/\.venv/bin/pip check\b", in_place), in_place
