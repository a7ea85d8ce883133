"""Command line of the benchmark: `python -m bench run ...` (what `make bench` and `ambitctl bench` call)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.options import ALL_CONFIGS, CONFIG_SCALE, RunOptions


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Shared by `python -m bench run` and `ambitctl bench`, so both accept exactly the same flags."""
    parser.add_argument("--quick", action="store_true", help="one round, ~1-2 s per measure: proves the harness works")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every configuration (default 3; quick 1)")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of: {', '.join((*ALL_CONFIGS, CONFIG_SCALE))} (default: all)",
    )
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results/<UTC time>)")
    parser.add_argument("--pin", action="store_true", help="taskset: node1 side on CPU 0, node2 side on CPU 1")
    parser.add_argument(
        "--max-steal",
        type=float,
        default=RunOptions.max_steal,
        help="re-measure (up to 2 more times, keeping the least stolen) a measure during which the hypervisor stole "
        "more than this fraction of all CPUs' time (default %(default)s)",
    )


def options_from(args: argparse.Namespace) -> RunOptions:
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in only if s not in (*ALL_CONFIGS, CONFIG_SCALE)]
    if unknown:
        raise SystemExit(
            f"bench: unknown configuration(s) {', '.join(unknown)}; known: {', '.join(ALL_CONFIGS)}, {CONFIG_SCALE}"
        )
    if args.rounds is not None and args.rounds < 1:
        raise SystemExit("bench: --rounds must be at least 1")
    if not 0.0 <= args.max_steal <= 1.0:
        raise SystemExit(f"bench: --max-steal is a fraction between 0 and 1, got {args.max_steal}")
    return RunOptions(
        quick=args.quick, rounds=args.rounds, only=only, out=args.out, pin=args.pin, max_steal=args.max_steal
    )


def run_command(args: argparse.Namespace) -> int:
    from bench.runner import run

    code, out = run(options_from(args))
    print(out / "report.md")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Ambit node-level benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run the configurations side by side and write a report")
    add_run_arguments(run_parser)
    run_parser.set_defaults(func=run_command)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
