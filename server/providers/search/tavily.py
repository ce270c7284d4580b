"""Tavily: a search API built for language models."""

from __future__ import annotations

import httpx2

from server.providers.search._http import as_dict, as_list, request_json
from server.providers.search._results import parse_results
from server.providers.search.base import SearchResult

# Tavily refuses max_results above 20.
MAX_COUNT = 20


class TavilySearch:
    """``POST {base_url}/search`` JSON ``{"query", "max_results"}`` with a bearer key
    → ``results[].url/title/content``."""

    name = "tavily"

    def __init__(
        self, http: httpx2.AsyncClient, api_key: str, *, base_url: str, timeout: float
    ) -> None:
        self._http = http
        self._api_key = api_key
        self._base_url = base_url.rstrip("/")
        self._timeout = timeout

    async def search(self, query: str, count: int) -> list[SearchResult]:
        """Up to ``count`` results for ``query``; raises ``SearchError`` on failure.

        Cancelling it closes the connection to Tavily.
        """
        if count <= 0 or not query.strip():
            return []
        answer = await request_json(
            self._http,
            self.name,
            "POST",
            f"{self._base_url}/search",
            json_body={"query": query, "max_results": min(count, MAX_COUNT)},
            headers={"Authorization": f"Bearer {self._api_key}"},
            timeout=self._timeout,
        )
        items = as_list(
            as_dict(answer, self.name, "the answer").get("results"), self.name, "results"
        )
        return parse_results(items, count, snippet_key="content")
