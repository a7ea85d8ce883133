"""Config scale: placeholder until the controller's Translator lands (reported as FAILED with the reason)."""

from __future__ import annotations

from typing import Any

from bench.options import Durations
from bench.progress import Progress


def run(durations: Durations, progress: Progress) -> dict[str, Any]:
    return {"status": "failed", "reason": "controller.translate.Translator is not available yet"}
