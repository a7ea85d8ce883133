"""Structured JSON logging for the agent and controller.

One JSON object per line so that `kubectl logs | jq` and log shippers work without parsing prose. Extra context
is passed with ``logger.info("msg", extra={"fields": {...}})`` or through :func:`kv`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "scope": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def kv(**fields: Any) -> dict[str, Any]:
    """Shorthand for ``extra=kv(a=1)`` so call sites stay readable."""
    return {"fields": fields}


def setup(level: str = "info", stream: Any = None) -> None:
    """Route the root logger to one JSON line per record; idempotent."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_ambit", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._ambit = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
