"""The body the search engines reached over a JSON API share (SearXNG, Brave, Tavily): one
request a search, a list of result objects in the answer. Each engine says only how its
request is made and where its results are."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import httpx2

from server.providers.search._http import as_dict, as_list, request_json
from server.providers.search._results import parse_results
from server.providers.search.base import SearchResult


@dataclass(frozen=True)
class SearchRequest:
    """One engine's request for a search; ``path`` is below the base URL."""

    method: str
    path: str
    params: dict[str, str] | None = None
    json_body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class JsonSearchEngine(ABC):
    """A search engine behind a JSON API, keyed by ``api_key`` where it needs one (empty
    where it does not)."""

    name: str
    # The result objects' field that holds the snippet.
    snippet_key: str

    def __init__(
        self, http: httpx2.AsyncClient, api_key: str, *, base_url: str, timeout: float
    ) -> None:
        self._http = http
        self._api_key = api_key
        self._base_url = base_url.rstrip("/")
        self._timeout = timeout

    @abstractmethod
    def request(self, query: str, count: int) -> SearchRequest:
        """The request that asks the engine for ``count`` results for ``query``."""

    def result_items(self, answer: Any) -> list[Any]:
        """The result objects in the engine's decoded answer (here: its ``results`` list);
        raises ``SearchError`` for an answer of another shape."""
        return as_list(
            as_dict(answer, self.name, "the answer").get("results"), self.name, "results"
        )

    async def search(self, query: str, count: int) -> list[SearchResult]:
        """Up to ``count`` results for ``query``; raises ``SearchError`` on failure.

        Cancelling it closes the connection to the search engine.
        """
        if count <= 0 or not query.strip():
            return []
        request = self.request(query, count)
        answer = await request_json(
            self._http,
            self.name,
            request.method,
            self._base_url + request.path,
            params=request.params,
            headers=request.headers,
            json_body=request.json_body,
            timeout=self._timeout,
        )
        return parse_results(self.result_items(answer), count, snippet_key=self.snippet_key)
