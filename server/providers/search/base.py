"""The search interface: a query in, a few results out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class SearchResult:
    url: str
    title: str
    snippet: str
    # Providers that already hold the document's text (the local index) fill this in, and
    # the pipeline then does not fetch the page.
    content: str | None = None


class SearchError(Exception):
    """The search provider failed (HTTP error, bad JSON, timeout)."""


class SearchProvider(Protocol):
    name: str

    async def search(self, query: str, count: int) -> list[SearchResult]:
        """Up to ``count`` results for ``query``; raises ``SearchError`` on failure.

        Cancelling it closes the connection to the search engine (or abandons the
        local index lookup running in a worker thread).
        """
        ...
