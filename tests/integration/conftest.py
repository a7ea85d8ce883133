"""Integration fixtures: labs with names unique to the test run, always torn down (even when the test fails)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab import Lab, LabError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

LabFactory = Callable[..., Lab]


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    """``lab_factory(config_dir=examples/basic, mesh=False, name=None) -> Lab``; every lab is downed afterwards.

    Names are ``ambit-<4 hex>`` so concurrent runs (other engineers, CI) never share a namespace.
    """
    made: list[Lab] = []

    def make(config_dir: str | Path = EXAMPLES / "basic", mesh: bool = False, name: str | None = None) -> Lab:
        lab = Lab.up(config_dir, name=name or f"ambit-{secrets.token_hex(2)}", mesh=mesh)
        made.append(lab)
        return lab

    yield make
    errors = []
    for lab in reversed(made):
        try:
            lab.down()
        except LabError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("lab teardown failed:\n" + "\n".join(errors))


@pytest.fixture
def basic_lab(lab_factory: LabFactory) -> Lab:
    """The example cluster (examples/basic), fresh for one test."""
    return lab_factory()
