"""Typed command-line configuration with ``AMBIT_<FLAG>`` environment fallbacks.

Each process describes its settings as a dataclass; :func:`parse` builds an argparse parser from the fields so
that defaults work in the lab and every flag can be set from the environment in a DaemonSet/Deployment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def doc(text: str) -> dict[str, str]:
    """Field metadata that :func:`parse` turns into the flag's ``--help`` text: ``field(..., metadata=doc("..."))``."""
    return {"help": text}


def _env_name(field: str) -> str:
    return "AMBIT_" + field.upper()


def _convert(tp: Any, raw: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(inner[0], raw) if raw != "" else None
    if tp is bool:
        return raw.lower() in ("1", "true", "yes", "on")
    if tp is int:
        return int(raw)
    if tp is float:
        return float(raw)
    return raw


def _converter(tp: Any) -> typing.Callable[[str], Any]:
    def convert(raw: str) -> Any:
        return _convert(tp, raw)

    convert.__name__ = getattr(tp, "__name__", str(tp))  # argparse's "invalid float value", not "<lambda>"
    return convert


def parse(cls: type[T], argv: Sequence[str] | None = None, description: str = "") -> T:
    """Flags win over ``AMBIT_*`` variables, which win over the dataclass defaults."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default: Any
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        env = os.environ.get(_env_name(f.name))
        if env is not None:
            try:
                default = _convert(tp, env)
            except ValueError:  # as a bad flag value: a usage error naming the variable, not a traceback
                parser.error(f"{_env_name(f.name)}: invalid {_converter(tp).__name__} value: {env!r}")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, default=default, type=_converter(tp), help=f"{help_text} [{default}]")
    ns = parser.parse_args(argv)
    try:
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
    except ValueError as e:  # a value the dataclass's __post_init__ refuses: a usage error, not a traceback
        parser.error(str(e))
