"""`ambitctl bench [--quick] ...`: the node benchmarks of bench/ (same flags as `python -m bench run`)."""

from __future__ import annotations

from typing import Any

from bench.main import add_run_arguments, run_command


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="run the node benchmarks side by side with Envoy and write a report")
    add_run_arguments(parser)
    parser.set_defaults(func=run_command)
