"""Shared test fixtures.

Integration tests need root (network namespaces, eBPF, transparent sockets). CI runs as root; anywhere else they
fail loudly with the reason instead of skipping, so a missing capability can never pass as green.
"""

from __future__ import annotations

import os
import shutil

import pytest

# Fixtures several modules share: `echo` (an echo backend) and `pool` (an HBONE client pool).
pytest_plugins = ["tests.support.hbone_testbed"]


def _root_problem() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (network namespaces, eBPF); run `sudo make test`"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is missing; run `make setup`"
    return None


@pytest.fixture(scope="session")
def require_root() -> None:
    problem = _root_problem()
    if problem:
        pytest.fail(problem, pytrace=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/integration requires root, declared once here rather than per test."""
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.root)
            if isinstance(item, pytest.Function) and "require_root" not in item.fixturenames:
                item.fixturenames.insert(0, "require_root")
