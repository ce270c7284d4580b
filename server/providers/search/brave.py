"""Brave Search API (web results)."""

from __future__ import annotations

from typing import Any

from server.providers.search._http import as_dict, as_list
from server.providers.search._json_search import JsonSearchEngine, SearchRequest
from server.providers.search.base import SearchError

# Brave refuses a count above 20.
MAX_COUNT = 20


class BraveSearch(JsonSearchEngine):
    """``GET {base_url}/res/v1/web/search?q=&count=`` with ``X-Subscription-Token``
    → ``web.results[].url/title/description``."""

    name = "brave"
    snippet_key = "description"

    def request(self, query: str, count: int) -> SearchRequest:
        return SearchRequest(
            "GET",
            "/res/v1/web/search",
            params={"q": query, "count": str(min(count, MAX_COUNT))},
            headers={"X-Subscription-Token": self._api_key},
        )

    def result_items(self, answer: Any) -> list[Any]:
        answer = as_dict(answer, self.name, "the answer")
        if "web" not in answer:
            # Brave leaves the section out when nothing matched.
            if answer.get("type") == "search":
                return []
            raise SearchError(f"{self.name}: unexpected answer shape (no web results section)")
        web = as_dict(answer["web"], self.name, "web")
        return as_list(web.get("results", []), self.name, "web.results")
