"""JSON on the hot path: orjson, with the standard library where orjson says no.

Every streamed token is decoded once (the upstream chunk) and encoded once (its event).
orjson does both several times faster than ``json``; it refuses a few things ``json``
takes (integers beyond 64 bits, NaN and Infinity on input), and those rare values fall
back to ``json`` so that the two never disagree on what is accepted.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(value: Any) -> str:
    """Compact JSON text (no spaces). A value orjson refuses (a lone surrogate from an
    upstream's ``\\ud800`` escape, a huge integer) is encoded by ``json`` with every
    non-ASCII character escaped, which any UTF-8 transport can carry."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(value, separators=(",", ":"))


def loads(raw: str | bytes) -> Any:
    """Parse JSON text; raises ``ValueError`` when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)
