"""Protobuf messages as readable JSON for config dumps (controller /debug/config_dump, agent /config_dump).

``json_format`` renders ``bytes`` as base64, which makes the IP addresses of the workload API unreadable; the
dumps show them as IP text instead, like ztunnel's config_dump does.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

_IP_KEYS = frozenset({"address", "addresses"})


def _ip_text(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return value
    if len(raw) in (4, 16):
        return str(ipaddress.ip_address(raw))
    return value


def _render(obj: Any, key: str = "") -> Any:
    if isinstance(obj, dict):
        return {k: _render(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_render(v, key) for v in obj]
    if isinstance(obj, str) and key in _IP_KEYS:
        return _ip_text(obj)
    return obj


def message_to_json(msg: Message) -> dict[str, Any]:
    """camelCase dict of ``msg`` with IP-address bytes fields (``address``/``addresses``) shown as IP text."""
    out: dict[str, Any] = _render(json_format.MessageToDict(msg))
    return out
