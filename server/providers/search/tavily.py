"""Tavily: a search API built for language models."""

from __future__ import annotations

from server.providers.search._json_search import JsonSearchEngine, SearchRequest

# Tavily refuses max_results above 20.
MAX_COUNT = 20


class TavilySearch(JsonSearchEngine):
    """``POST {base_url}/search`` JSON ``{"query", "max_results"}`` with a bearer key
    → ``results[].url/title/content``."""

    name = "tavily"
    snippet_key = "content"

    def request(self, query: str, count: int) -> SearchRequest:
        return SearchRequest(
            "POST",
            "/search",
            json_body={"query": query, "max_results": min(count, MAX_COUNT)},
            headers={"Authorization": f"Bearer {self._api_key}"},
        )
