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

# One encoder for every record: json.dumps with non-default arguments builds a new JSONEncoder per call, which
# was most of the cost of a line (the agent writes one access-log line per connection).
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # strftime once per second, not per line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        out: dict[str, Any] = {
            "time": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "scope": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return _ENCODER.encode(out)


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
