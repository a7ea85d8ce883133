"""The live progress line: which configuration, round and measure is running, elapsed time and time left.

On a terminal it rewrites one line; otherwise (CI logs, pipes) it prints a plain line per step, so the log still
tells where a run was when it stopped.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total_expected_s: float, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._start = time.monotonic()
        self._total = max(total_expected_s, 1.0)
        self._done_expected = 0.0
        self._width = 0

    def add_expected(self, seconds: float) -> None:
        self._total += seconds

    def step(self, what: str, expected_s: float) -> None:
        """Announce the next step; the estimate scales what is left by how fast the finished steps went."""
        elapsed = time.monotonic() - self._start
        left_expected = max(self._total - self._done_expected, 0.0)
        pace = elapsed / self._done_expected if self._done_expected > 5.0 else 1.0
        line = f"bench {what}  elapsed {_clock(elapsed)}  left ~{_clock(left_expected * pace)}"
        if self._tty:
            pad = max(self._width - len(line), 0)
            self._stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
        self._done_expected += expected_s

    def note(self, message: str) -> None:
        """A message that must stay visible (a configuration failed, where the report went)."""
        if self._tty and self._width:
            self._stream.write("\n")
            self._width = 0
        self._stream.write(message + "\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()
        self._width = 0
