"""SearXNG: a self-hosted metasearch engine with a JSON API."""

from __future__ import annotations

import httpx2

from server.providers.search._http import as_dict, as_list, request_json
from server.providers.search._results import parse_results
from server.providers.search.base import SearchResult


class SearxngSearch:
    """``GET {base_url}/search?q=...&format=json`` → ``results[].url/title/content``."""

    name = "searxng"

    def __init__(self, http: httpx2.AsyncClient, base_url: str, *, timeout: float) -> None:
        self._http = http
        self._base_url = base_url.rstrip("/")
        self._timeout = timeout

    async def search(self, query: str, count: int) -> list[SearchResult]:
        """Up to ``count`` results for ``query``; raises ``SearchError`` on failure.

        Cancelling it closes the connection to SearXNG.
        """
        if count <= 0 or not query.strip():
            return []
        answer = await request_json(
            self._http,
            self.name,
            "GET",
            f"{self._base_url}/search",
            params={"q": query, "format": "json"},
            timeout=self._timeout,
        )
        items = as_list(
            as_dict(answer, self.name, "the answer").get("results"), self.name, "results"
        )
        return parse_results(items, count, snippet_key="content")
