"""The loader child reports a failure as its stage plus clang's/the verifier's words on stderr; the agent must turn
that into the exception type an operator acts on, with the diagnostics attached (the child's output is all there is:
the agent itself never runs BCC)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.redirect import _loader_error
from agent.redirect_errors import RedirectCompileError, RedirectError, RedirectKernelError, RedirectPinError

SRC = Path("/opt/ambit/bpf/redirect.bpf.c")


def _report(stage: str, error: str) -> str:
    return json.dumps({"stage": stage, "error": error}) + "\n"


@pytest.mark.parametrize(
    ("stage", "kind", "words"),
    [
        ("import", RedirectCompileError, "BCC is not importable"),
        ("compile", RedirectCompileError, f"BCC failed to compile {SRC}"),
        ("load", RedirectKernelError, "the kernel rejected ambit_tc_ingress"),
        ("pin", RedirectPinError, "cannot pin the program"),
    ],
)
def test_each_stage_maps_to_its_error_with_the_diagnostics(stage: str, kind: type[RedirectError], words: str) -> None:
    stderr = "noise\n\n/virtual/main.c:3:10: error: use of undeclared identifier 'undeclared_thing'\n"
    exc = _loader_error(SRC, 1, _report(stage, "Exception: boom"), stderr)
    assert type(exc) is kind
    assert words in str(exc) and "Exception: boom" in str(exc)
    assert "undeclared_thing" in str(exc) and "\n\n" not in str(exc)


def test_a_loader_that_died_without_a_report_is_a_compile_error_naming_its_status() -> None:
    exc = _loader_error(SRC, -9, "", "")
    assert isinstance(exc, RedirectCompileError)
    assert "status -9" in str(exc) and "(no diagnostics)" in str(exc)


def test_only_the_last_forty_diagnostic_lines_are_kept() -> None:
    stderr = "".join(f"line {i}\n" for i in range(100))
    exc = _loader_error(SRC, 1, "garbage that is not json\n", stderr)
    assert "line 99" in str(exc) and "line 60" in str(exc) and "line 59" not in str(exc)
