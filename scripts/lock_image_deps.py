"""Write daemonset/requirements.lock: the image's Python packages, pinned, with the hash of every file PyPI has.

Why: daemonset/Dockerfile used to install pyproject.toml's open ranges (``project.dependencies`` and
``build-system.requires``), so two builds of one commit could install different packages, and nothing checked what
was downloaded. The image now installs this lock with ``pip install --require-hashes --no-deps --only-binary
:all:``: every version is fixed, every file is checked against a sha256 recorded here, and no build backend runs.

How:

1. pip's own resolver (``pip install --dry-run --ignore-installed --only-binary :all: --report``, run by a
   CPython 3.11 interpreter on Linux: the image's python3 is Debian bookworm's 3.11) picks the versions;
2. each package's requirements (its metadata's Requires-Dist, from pip's report) are walked from pyproject.toml's
   lists for Linux, CPython 3.11, on amd64 and on arm64: a requirement that applies only on arm64 (a marker on
   ``platform_machine``) is resolved too, and a resolved package nothing reaches is left out;
3. the hashes are the sha256 digests PyPI's simple index gives for every file of each version (what pip-compile
   ``--generate-hashes`` records), so the lock holds on any architecture;
4. the lock is checked before it replaces the old one: pip resolves it again without ``--no-deps`` in hash-checking
   mode (a dependency missing from the lock fails there), and ``pip download --require-hashes`` fetches the wheels
   the image would install on amd64 and on arm64 (glibc 2.36, bookworm's) and checks their hashes.

``--check`` runs step 4 alone on the committed lock. The lock's ``# requires:`` lines are step 2's requirements
that apply (tests/unit/test_lock_image_deps.py walks them offline); ``# via`` names who requires a package.

Usage: .venv/bin/python scripts/lock_image_deps.py [--python PYTHON3.11] [--check] [--no-verify] [--output FILE]
PyPI through a TLS-intercepting proxy: PIP_CERT (or SSL_CERT_FILE) names the CA bundle, as for pip itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import ssl
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    NormalizedName,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "daemonset" / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
INDEX = "https://pypi.org/simple"
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
# The image: Debian bookworm's python3 (3.11.2) and glibc (2.36), on the two architectures a cluster's nodes run.
PYTHON_VERSION = "3.11"
PYTHON_FULL_VERSION = "3.11.2"
GLIBC_MINOR = 36  # glibc 2.36
MACHINES = ("x86_64", "aarch64")
# Our pip options alone: a developer's pip.conf or PIP_* variables (an index of their own, find-links such as a
# local wheel directory, no-index) must not change what is locked. The CA bundle and the timeout are kept.
PIP_ENV_KEPT = ("PIP_CERT", "PIP_CLIENT_CERT", "PIP_DEFAULT_TIMEOUT")


class LockError(Exception):
    """The lock cannot be made or does not hold; the message says why."""


@dataclass
class Package:
    """One resolved distribution: its version, its requirements that apply in the image, and who requires it."""

    name: NormalizedName
    version: Version
    requires_dist: list[Requirement]
    requires: list[Requirement] = field(default_factory=list)
    via: set[str] = field(default_factory=set)
    hashes: list[str] = field(default_factory=list)


def image_environment(machine: str, extra: str) -> dict[str, str]:
    """PEP 508 marker values of the image's interpreter on `machine`: markers are evaluated for the image, not for
    the machine that writes the lock."""
    return {
        "implementation_name": "cpython",
        "implementation_version": PYTHON_FULL_VERSION,
        "os_name": "posix",
        "platform_machine": machine,
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": PYTHON_FULL_VERSION,
        "python_version": PYTHON_VERSION,
        "sys_platform": "linux",
        "extra": extra,
    }


def applies(req: Requirement, extras: Iterable[str]) -> bool:
    """Whether `req` is needed in the image on some architecture, given the extras asked of its requirer."""
    if req.marker is None:
        return True
    return any(
        req.marker.evaluate(image_environment(machine, extra)) for machine in MACHINES for extra in {"", *extras}
    )


def roots() -> list[Requirement]:
    """What the image installs: pyproject.toml's dependencies and its build backend (the project is installed
    in place with --no-build-isolation, from the packages installed here)."""
    project = tomllib.loads(PYPROJECT.read_text())
    return [Requirement(r) for r in project["project"]["dependencies"] + project["build-system"]["requires"]]


def pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in PIP_ENV_KEPT}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run_pip(python: str, args: list[str]) -> None:
    cmd = [python, "-m", "pip", *args]
    result = subprocess.run(cmd, env=pip_env(), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LockError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def check_interpreter(python: str) -> None:
    """Markers in the resolution are evaluated by the interpreter running pip: it has to be CPython 3.11 on
    Linux, as the image's is."""
    probe = "import sys, platform; print(sys.implementation.name, '%d.%d' % sys.version_info[:2], sys.platform)"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    if out != ["cpython", PYTHON_VERSION, "linux"]:
        raise LockError(f"{python} is {' '.join(out)}: resolve with CPython {PYTHON_VERSION} on Linux (--python)")


def resolve(python: str, requirements: list[Requirement], workdir: Path) -> dict[NormalizedName, Package]:
    """pip's resolution of `requirements`, newest versions with a wheel, with each one's Requires-Dist."""
    req_file = workdir / "requirements.in"
    req_file.write_text("".join(f"{r}\n" for r in requirements))
    report = workdir / "report.json"
    run_pip(
        python,
        [
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--only-binary",
            ":all:",
            "--index-url",
            INDEX,
            "--report",
            str(report),
            "-r",
            str(req_file),
        ],
    )
    packages: dict[NormalizedName, Package] = {}
    for item in json.loads(report.read_text())["install"]:
        meta = item["metadata"]
        name = canonicalize_name(meta["name"])
        packages[name] = Package(
            name, Version(meta["version"]), [Requirement(r) for r in meta.get("requires_dist", [])]
        )
    return packages


def walk(top: list[Requirement], packages: dict[NormalizedName, Package]) -> list[Requirement]:
    """Follow the requirements that apply in the image from `top` through `packages`, filling each reached
    package's `requires` and `via`; returns the applicable requirements `packages` lacks or does not satisfy."""
    for package in packages.values():
        package.requires, package.via = [], set()
    missing: list[Requirement] = []
    seen: set[tuple[NormalizedName, str]] = set()
    todo: list[tuple[Requirement, str]] = [(r, "pyproject.toml") for r in top if applies(r, ())]
    while todo:
        req, requirer = todo.pop()
        name = canonicalize_name(req.name)
        found = packages.get(name)
        if found is None or not req.specifier.contains(found.version, prereleases=True):
            missing.append(req)
            continue
        package = found
        package.via.add(requirer)
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            for dep in package.requires_dist:
                if applies(dep, (extra,) if extra else ()):
                    if dep not in package.requires:
                        package.requires.append(dep)
                    todo.append((dep, str(name)))
    return missing


def pypi_hashes(name: str, version: Version, context: ssl.SSLContext) -> list[str]:
    """sha256 of every file PyPI has for `name` `version` (wheels for every platform and the sdist), from its
    simple index in JSON (PEP 691), the page pip itself reads."""
    url = f"{INDEX}/{name}/"
    request = urllib.request.Request(url, headers={"Accept": SIMPLE_JSON})
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            files = json.load(response)["files"]
    except (urllib.error.URLError, TimeoutError, KeyError, ValueError) as exc:
        raise LockError(f"cannot read {url}: {exc}") from exc
    hashes = set()
    for file in files:
        if file_version(file["filename"], name) == version:
            hashes.add(file["hashes"]["sha256"])
    if not hashes:
        raise LockError(f"{url} lists no file of {name} {version}")
    return sorted(hashes)


def file_version(filename: str, name: str) -> Version | None:
    """The version a wheel's or an sdist's file name carries, if it is one of `name`'s."""
    try:
        if filename.endswith(".whl"):
            project, version, _, _ = parse_wheel_filename(filename)
        elif filename.endswith((".tar.gz", ".zip")):
            project, version = parse_sdist_filename(filename)
        else:
            return None  # an egg or an installer from another age: nothing pip would install
    except (InvalidWheelFilename, InvalidSdistFilename):
        return None
    return version if project == canonicalize_name(name) else None


def render(packages: list[Package]) -> str:
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    lines = [
        "# The container image's Python packages (daemonset/Dockerfile installs them with `pip install",
        "# --require-hashes --no-deps --only-binary :all:`): pyproject.toml's project.dependencies and",
        "# build-system.requires, and what they require on Linux, CPython 3.11 (Debian bookworm's python3),",
        "# amd64 and arm64. Each version carries the sha256 of every file PyPI has for it.",
        f"# Written by scripts/lock_image_deps.py from PyPI on {today}. Do not edit by hand: run",
        "# `.venv/bin/python scripts/lock_image_deps.py` after changing those lists, or to take newer versions.",
        "# `# requires:` lines are the package's own requirements that apply in the image (its Requires-Dist);",
        "# tests/unit/test_lock_image_deps.py checks from them that the lock is complete.",
    ]
    for package in packages:
        lines.append(f"{package.name}=={package.version} \\")
        lines.extend(f"    --hash=sha256:{h} \\" for h in package.hashes[:-1])
        lines.append(f"    --hash=sha256:{package.hashes[-1]}")
        lines.extend(f"    # requires: {r}" for r in package.requires)
        via = sorted(package.via, key=lambda v: (v != "pyproject.toml", v))
        lines.append(f"    # via {', '.join(via)}")
    return "\n".join(lines) + "\n"


def lock(python: str) -> str:
    check_interpreter(python)
    top = roots()
    wanted = list(top)
    with tempfile.TemporaryDirectory(prefix="ambit-lock-") as tmp:
        for _ in range(4):
            print(f"[lock] resolving {len(wanted)} requirements with {python}", file=sys.stderr)
            packages = resolve(python, wanted, Path(tmp))
            missing = walk(top, packages)
            if not missing:
                break
            # Needed in the image but not by pip's resolution here (a marker for arm64 or for bookworm's Python
            # 3.11.2): resolve them as if asked for directly, without their markers.
            print(f"[lock] also resolving {', '.join(map(str, missing))}", file=sys.stderr)
            for req in missing:
                plain = Requirement(str(req))
                plain.marker = None
                if str(plain) not in map(str, wanted):
                    wanted.append(plain)
        else:
            uncovered = ", ".join(map(str, missing))
            raise LockError(f"the resolution does not cover the image's requirements: {uncovered}")
    reached = [p for _, p in sorted(packages.items()) if p.via]
    for name in sorted(set(packages) - {p.name for p in reached}):
        print(f"[lock] {name} left out: nothing in the image requires it", file=sys.stderr)
    context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    for package in reached:
        package.hashes = pypi_hashes(package.name, package.version, context)
    return render(reached)


def manylinux_platforms(machine: str) -> list[str]:
    """The platform tags a glibc-2.36 system accepts on `machine`, newest first, with the legacy aliases, as pip
    computes them on bookworm itself: `pip download --platform` takes them literally, one by one."""
    oldest = 5 if machine == "x86_64" else 17  # manylinux1 (glibc 2.5) had x86_64 and i686 only
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(GLIBC_MINOR, oldest - 1, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    platforms += [f"{alias}_{machine}" for minor, alias in legacy.items() if minor >= oldest]
    return platforms


def verify(python: str, lock_file: Path) -> None:
    """The lock as the image uses it: complete for pip's resolver, and every wheel fetched on each architecture
    matches a hash."""
    common = ["--quiet", "--require-hashes", "--only-binary", ":all:", "--index-url", INDEX, "-r", str(lock_file)]
    print("[lock] checking: pip resolves the lock in hash-checking mode (without --no-deps)", file=sys.stderr)
    run_pip(python, ["install", "--dry-run", "--ignore-installed", *common])
    with tempfile.TemporaryDirectory(prefix="ambit-lock-wheels-") as tmp:
        for machine in MACHINES:
            print(f"[lock] checking: pip downloads the {machine} wheels (glibc 2.{GLIBC_MINOR})", file=sys.stderr)
            target = [arg for platform in manylinux_platforms(machine) for arg in ("--platform", platform)]
            target += ["--python-version", PYTHON_VERSION, "--implementation", "cp"]
            target += ["--abi", f"cp{PYTHON_VERSION.replace('.', '')}"]
            run_pip(python, ["download", "--no-deps", "--dest", str(Path(tmp) / machine), *target, *common])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--python", default=sys.executable, help="CPython 3.11 to resolve with (default: this one)")
    parser.add_argument("--output", type=Path, default=LOCK, help=f"the lock to write (default {LOCK})")
    parser.add_argument("--check", action="store_true", help="only check the existing lock (no resolution)")
    parser.add_argument("--no-verify", action="store_true", help="write the lock without checking it with pip")
    args = parser.parse_args()
    try:
        if args.check:
            verify(args.python, args.output)
            print(f"[lock] {args.output} holds", file=sys.stderr)
            return 0
        text = lock(args.python)
        with tempfile.NamedTemporaryFile("w", dir=args.output.parent, suffix=".lock", delete=False) as new:
            new.write(text)
        os.chmod(new.name, 0o644)  # a temporary file is the owner's alone; the lock is read by everyone
        try:
            if not args.no_verify:
                verify(args.python, Path(new.name))
            os.replace(new.name, args.output)
        finally:
            Path(new.name).unlink(missing_ok=True)
    except LockError as exc:
        print(f"[lock] error: {exc}", file=sys.stderr)
        return 1
    count = sum(1 for line in text.splitlines() if line[:1].isalnum())
    print(f"[lock] wrote {args.output}: {count} packages", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
