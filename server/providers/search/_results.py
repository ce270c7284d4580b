"""Turning a search engine's result objects into ``SearchResult``s."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from server.providers.search._http import text_field
from server.providers.search.base import SearchResult
from server.providers.web.text import fragment_text


def parse_results(items: list[Any], count: int, *, snippet_key: str) -> list[SearchResult]:
    """The first ``count`` usable results, in the engine's order.

    An item without an http(s) URL is skipped rather than failing the whole search: one
    odd entry (an image box, an answer card) should not cost the user the others.
    Snippets may carry highlighting markup and entities, which are reduced to text.
    """
    results: list[SearchResult] = []
    seen: set[str] = set()
    for item in items:
        if len(results) >= count:
            break
        if not isinstance(item, dict):
            continue
        url = text_field(item, "url")
        if not url or url in seen or not _is_web_url(url):
            continue
        seen.add(url)
        title = fragment_text(text_field(item, "title")) or url
        snippet = fragment_text(text_field(item, snippet_key))
        results.append(SearchResult(url=url, title=title, snippet=snippet))
    return results


def _is_web_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)
