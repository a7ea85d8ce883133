"""Run a test module on both event loops the agent lets operators pick (asyncio and uvloop, which has its own
transports). A module opts in with ``pytestmark = BOTH_LOOPS`` and by importing :func:`event_loop_policy`."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

# pytest-asyncio 1.x wants a conftest hook for this; a module-local override keeps it to the modules that opt in.
BOTH_LOOPS = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture:DeprecationWarning')


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()
