"""Regenerate the Python modules for Ambit's .proto files (`make proto`, i.e. `python -m api.build`).

The import root is the repository root, so a proto at api/istio/workload/workload.proto becomes the module
`api.istio.workload.workload_pb2` and imports between our protos resolve as `api.istio...`. The generated files
are checked in; tests/unit/test_api_protos.py regenerates into a temporary directory and fails when they differ.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent

# Paths relative to the repository root.
PROTOS = (
    "api/istio/workload/workload.proto",
    "api/istio/security/authorization.proto",
    "api/istio/v1/auth/ca.proto",
)
# Only these declare gRPC services, so only they get a *_pb2_grpc.py module.
SERVICE_PROTOS = ("api/istio/v1/auth/ca.proto",)


class ProtocError(RuntimeError):
    """protoc rejected a .proto file (its diagnostics went to stderr)."""


def _well_known_include() -> str:
    return str(resources.files("grpc_tools") / "_proto")


def _run(args: list[str]) -> None:
    # protoc.main takes argv including the program name.
    rc = protoc.main(["grpc_tools.protoc", f"-I{REPO_ROOT}", f"-I{_well_known_include()}", *args])
    if rc != 0:
        raise ProtocError(f"protoc failed with exit code {rc} for {args[-1]}")


def generated_files(out_dir: Path) -> list[Path]:
    """The files `generate(out_dir)` writes, relative to nothing (absolute under out_dir)."""
    files: list[Path] = []
    for proto in PROTOS:
        stem = proto.removesuffix(".proto")
        files += [out_dir / f"{stem}_pb2.py", out_dir / f"{stem}_pb2.pyi"]
    for proto in SERVICE_PROTOS:
        files.append(out_dir / f"{proto.removesuffix('.proto')}_pb2_grpc.py")
    return files


def generate(out_dir: Path) -> list[Path]:
    """Generate all modules under out_dir (mirroring the repository layout) and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _run([f"--python_out={out_dir}", f"--pyi_out={out_dir}", *(str(REPO_ROOT / p) for p in PROTOS)])
    _run([f"--grpc_python_out={out_dir}", *(str(REPO_ROOT / p) for p in SERVICE_PROTOS)])
    return generated_files(out_dir)


def main() -> int:
    for path in generate(REPO_ROOT):
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
