"""Brave Search API (web results)."""

from __future__ import annotations

import httpx2

from server.providers.search._http import as_dict, as_list, request_json
from server.providers.search._results import parse_results
from server.providers.search.base import SearchError, SearchResult

# Brave refuses a count above 20.
MAX_COUNT = 20


class BraveSearch:
    """``GET {base_url}/res/v1/web/search?q=&count=`` with ``X-Subscription-Token``
    → ``web.results[].url/title/description``."""

    name = "brave"

    def __init__(
        self, http: httpx2.AsyncClient, api_key: str, *, base_url: str, timeout: float
    ) -> None:
        self._http = http
        self._api_key = api_key
        self._base_url = base_url.rstrip("/")
        self._timeout = timeout

    async def search(self, query: str, count: int) -> list[SearchResult]:
        """Up to ``count`` results for ``query``; raises ``SearchError`` on failure.

        Cancelling it closes the connection to Brave.
        """
        if count <= 0 or not query.strip():
            return []
        answer = as_dict(
            await request_json(
                self._http,
                self.name,
                "GET",
                f"{self._base_url}/res/v1/web/search",
                params={"q": query, "count": str(min(count, MAX_COUNT))},
                headers={"X-Subscription-Token": self._api_key},
                timeout=self._timeout,
            ),
            self.name,
            "the answer",
        )
        if "web" not in answer:
            # Brave leaves the section out when nothing matched.
            if answer.get("type") == "search":
                return []
            raise SearchError(f"{self.name}: unexpected answer shape (no web results section)")
        web = as_dict(answer["web"], self.name, "web")
        items = as_list(web.get("results", []), self.name, "web.results")
        return parse_results(items, count, snippet_key="description")
