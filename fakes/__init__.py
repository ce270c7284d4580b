"""Loopback HTTP/1.1 fakes (trio + h11) for Tether's tests and benchmarks.

Names are imported lazily so that ``python -m fakes.model`` does not load
the module twice (once as ``__main__``, once via this package).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import AbortConnection, ConnRecord, Exchange, FakeServer, RequestRecord
    from .model import (
        DieMidwayReply,
        EchoReply,
        ErrorReply,
        FakeModel,
        HangReply,
        Reply,
        TextReply,
        ToolCallReply,
        reply_from_json,
    )
    from .pages import JUNK_MARKERS, FakePages, page_html
    from .search import FakeSearxng

_WHERE = {
    "AbortConnection": "base",
    "ConnRecord": "base",
    "Exchange": "base",
    "FakeServer": "base",
    "RequestRecord": "base",
    "DieMidwayReply": "model",
    "EchoReply": "model",
    "ErrorReply": "model",
    "FakeModel": "model",
    "HangReply": "model",
    "Reply": "model",
    "TextReply": "model",
    "ToolCallReply": "model",
    "reply_from_json": "model",
    "JUNK_MARKERS": "pages",
    "FakePages": "pages",
    "page_html": "pages",
    "FakeSearxng": "search",
}

__all__ = [
    "JUNK_MARKERS",
    "AbortConnection",
    "ConnRecord",
    "DieMidwayReply",
    "EchoReply",
    "ErrorReply",
    "Exchange",
    "FakeModel",
    "FakePages",
    "FakeSearxng",
    "FakeServer",
    "HangReply",
    "Reply",
    "RequestRecord",
    "TextReply",
    "ToolCallReply",
    "page_html",
    "reply_from_json",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
