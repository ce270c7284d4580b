"""SearXNG: a self-hosted metasearch engine with a JSON API."""

from __future__ import annotations

import httpx2

from server.providers.search._json_search import JsonSearchEngine, SearchRequest


class SearxngSearch(JsonSearchEngine):
    """``GET {base_url}/search?q=...&format=json`` → ``results[].url/title/content``."""

    name = "searxng"
    snippet_key = "content"

    def __init__(self, http: httpx2.AsyncClient, base_url: str, *, timeout: float) -> None:
        super().__init__(http, "", base_url=base_url, timeout=timeout)  # no key

    def request(self, query: str, count: int) -> SearchRequest:
        return SearchRequest("GET", "/search", params={"q": query, "format": "json"})
